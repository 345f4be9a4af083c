// libFuzzer target: a sharded checkpoint's model.safetensors.index.json
// (lora::io::parse_checkpoint_index): bounded JSON, weight_map order, shard names.
#include <lora/io/checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <set>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto idx = lora::io::parse_checkpoint_index(
        std::string_view(reinterpret_cast<const char*>(data), size), "model.safetensors.index.json");
    std::set<std::string> names;
    for (const auto& [name, shard] : idx.weight_map) {
      if (!names.insert(name).second) __builtin_trap();  // duplicates are refused
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos) __builtin_trap();
      for (char c : shard)
        if (static_cast<unsigned char>(c) < 0x20) __builtin_trap();
    }
    if (!idx.metadata.is_object()) __builtin_trap();
    (void)idx.metadata.dump();  // bounded depth: no deep recursion here
  } catch (const lora::error&) {
  }
  return 0;
}
