// Replays a recorded PEFT AdaLoRA trace (tests/data/peft/adalora_trace layout) through
// lora::RankAllocator and prints, per step, the budget and the surviving singular values:
//
//   adalora_replay <trace folder>
//   {"steps": [{"step": 0, "budget": 24, "kept": {"model.layers.0.self_attn.q_proj": [true, ...]}}, ...]}
#include <lora/adalora/replay.hpp>

#include <cstdio>
#include <exception>
#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: adalora_replay <trace folder>\n");
    return 2;
  }
  try {
    const auto replay = lora::replay_adalora_trace(argv[1]);
    std::cout << lora::replay_to_json(replay).dump(1) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adalora_replay: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
