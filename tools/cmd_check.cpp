// lora check: what an inference engine would mis-scale, ignore or reject in an adapter.
#include <lora/io/engines.hpp>

#include <nlohmann/json.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

int run_check(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"json"}, {"engine"}, "check");
  if (args.positional().size() != 1)
    lora::fail("expected one adapter (PEFT folder or .gguf file), got {} arguments (see 'lora check --help')",
                       args.positional().size());
  const std::string path = args.positional()[0];
  const io::engine e = io::parse_engine(args.required("engine"));
  const auto findings = io::check_engine(path, e);
  if (args.has("json")) {
    auto j = nlohmann::ordered_json::array();
    for (const auto& f : findings)
      j.push_back({{"kind", f.kind}, {"feature", f.feature}, {"modules", f.modules}, {"factor", f.factor},
                   {"detail", f.detail}, {"source", f.source}, {"fixed_by_normalize", f.fixed_by_normalize}});
    fmt::print("{}\n", nlohmann::ordered_json{{"engine", io::engine_name(e)}, {"findings", j}}.dump(1));
    return 0;
  }
  if (findings.empty()) {
    fmt::print("{}: {} computes what PEFT computes (nothing mis-scaled, ignored or rejected)\n", path, io::engine_name(e));
    return 0;
  }
  for (const auto& f : findings) {
    fmt::print("{:<10} {}: {}\n", f.kind, f.feature, f.detail);
    const std::size_t show = std::min<std::size_t>(f.modules.size(), 4);
    if (!f.modules.empty())
      fmt::print("           {} module(s): {}{}\n", f.modules.size(),
                 fmt::join(f.modules.begin(), f.modules.begin() + static_cast<std::ptrdiff_t>(show), ", "),
                 f.modules.size() > show ? ", …" : "");
    fmt::print("           source: {}{}\n", f.source,
               f.fixed_by_normalize ? (e == io::engine::llama_cpp ? "; fixed by 'lora normalize' or 'lora convert --to gguf'"
                                                                  : "; fixed by 'lora normalize'")
                                    : "");
  }
  return 0;
}

const lora::cli::Register reg_check{{"check", "what llama.cpp / vLLM / TGI would mis-scale, ignore or reject in an adapter",
                               R"(usage: lora check <peft folder | x.gguf> --engine llama.cpp|vllm|tgi|peft [--json]

Compares what the engine would compute with PEFT's forward, module by module, from the
engine's own loading rules (each finding names the source file it comes from):
  mis-scaled  the engine's alpha/r differs from PEFT's scaling (rsLoRA, alpha_pattern,
              rank_pattern), with the factor engine/PEFT
  ignored     tensors the engine drops without an error (e.g. TGI: DoRA magnitudes)
  rejected    the engine (or its converter) refuses the adapter
  added       tensors the engine applies and PEFT does not
'lora normalize' removes every mis-scaling; 'lora convert --to gguf' folds them for llama.cpp.
Exit status 0 whether or not something is found (1 on errors).
)",
                               run_check}};

}  // namespace
