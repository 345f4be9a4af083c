// lora normalize: the adapter with every module's scaling folded into B (alpha = r, s = 1).
#include <lora/io/normalize.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

int run_normalize(const std::vector<std::string>& argv) {
  cli::Args args(argv, {}, {"out"}, "normalize");
  if (args.positional().size() != 1)
    lora::fail("expected one PEFT adapter folder, got {} arguments (see 'lora normalize --help')",
                       args.positional().size());
  const std::string in = args.positional()[0], out = args.required("out");
  cli::guard_output(args, out, {in}, io::output_kind::folder);
  const auto rep = io::normalize_peft_folder(in, out);
  std::size_t padded = 0;
  for (const auto& m : rep.modules) {
    if (m.rank != rep.rank) ++padded;
    if (m.scaling != 1.0) fmt::print("folded into B: {}: scaling {:g}{}\n", m.name, m.scaling,
                                     m.rank != rep.rank ? fmt::format(" (rank {} padded to {})", m.rank, rep.rank) : "");
  }
  fmt::print("{}: {} modules, r = alpha = {} (scaling 1), no patterns, no rsLoRA{}; wrote {}\n", in, rep.modules.size(),
             rep.rank, padded ? fmt::format(", {} module(s) zero-padded to r {}", padded, rep.rank) : "", out);
  return 0;
}

const lora::cli::Register reg_normalize{{"normalize", "fold every module's scaling into B (alpha = r, no patterns, no rsLoRA)",
                               R"(usage: lora normalize <peft folder> --out <folder>

Writes the same adapter with each module's PEFT scaling s (alpha/r, alpha/√r with rsLoRA,
alpha and r from the patterns) multiplied into lora_B (and into lora_B.bias), every module at
one rank R = the largest r (smaller ones padded with zero rows of A and columns of B, which
leaves B·A unchanged), lora_alpha = R, no rank_pattern/alpha_pattern and use_rslora false.
PEFT's forward is unchanged (up to float rounding of s·B), and llama.cpp, vLLM and TGI,
which scale by alpha/r, all compute it. Written atomically; the input is not touched.
)",
                               run_normalize}};

}  // namespace
