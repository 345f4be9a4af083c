// lora compress: the best rank-k approximation of every module of a PEFT adapter.
#include <lora/analysis/compress.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/peft.hpp>

#include "cli.hpp"
#include "progress.hpp"

namespace {

using namespace lora;

int run_compress(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"progress", "quiet"}, {"rank", "energy", "out", "dtype"}, "compress");
  if (args.positional().size() != 1)
    lora::fail("expected one PEFT adapter folder, got {} arguments (see 'lora compress --help')",
                       args.positional().size());
  if (args.has("rank") == args.has("energy")) lora::fail("give exactly one of --rank k and --energy τ");
  analysis::CompressionTarget target;
  if (args.has("rank")) {
    target.rank = static_cast<Index>(args.integer("rank", 0, 1, std::int64_t{1} << 30));
  } else {
    target.energy = args.number("energy", 0);
    if (!(target.energy > 0 && target.energy <= 1)) lora::fail("--energy must be in (0, 1], got {}", *args.get("energy"));
  }
  const std::string out = args.required("out");
  cli::guard_output(args, out, {args.positional()[0]}, io::output_kind::folder);
  const auto in = io::load_adapter(args.positional()[0]);  // a GGUF adapter too (llama q/k: convert it with --base first)
  if (in.modules.empty())
    lora::fail("{}: has no LoRA modules to compress (only whole tensors or token rows)", args.positional()[0]);
  // Progress per module when the adapter is big (≥ 64 modules) or asked for.
  cli::Progress progress("compress", !args.has("quiet") && (args.has("progress") || in.modules.size() >= 64));
  auto small = analysis::compress_adapter(in, target, [&](std::size_t done, std::size_t total, const std::string& name) {
    progress.update(done, total, fmt::format("{}/{} modules ({})", done, total, name));
  });
  io::dtype type = in.modules.front().stored_dtype;
  if (auto d = args.get("dtype")) type = io::parse_float_dtype(*d, "--dtype");
  io::save_peft_adapter(out, small, type);
  Index before = 0, after = 0;
  for (const auto& m : in.modules) before += m.adapter.trainable_parameters();
  for (const auto& m : small.modules) after += m.adapter.trainable_parameters();
  fmt::print("{}: {} modules, {} → {} parameters; wrote {}\n", args.positional()[0], small.modules.size(), before, after,
             out);
  if (!small.saved.empty() || !small.trainable_tokens.empty())
    fmt::print("carried over unchanged: {} whole tensors (modules_to_save copies, saved tables), {} trainable-token tables\n",
               small.saved.size(), small.trainable_tokens.size());
  for (const auto& sk : in.skipped) fmt::print(stderr, "lora compress: warning: not carried over: '{}': {}\n", sk.key, sk.reason);
  return 0;
}

const lora::cli::Register reg_compress{{"compress", "best rank-k approximation of a PEFT adapter (fixed k or by energy)",
                               R"(usage: lora compress <peft folder> (--rank k | --energy τ) --out <folder> [--dtype F32|BF16|F16]
                     [--progress | --quiet]

Replaces every module's ΔW = s·B·A by its best rank-k approximation (Eckart–Young:
the top k singular triplets of the exact SVD of s·B·A). With --rank, k = min(k, r);
with --energy, the smallest k that keeps τ of the module's Σσ² (so k differs per
module and is written as rank_pattern). alpha is kept; the factors are rescaled for
the new scaling alpha/k (alpha/√k with rsLoRA). Embedding LoRA and lora_B biases are
kept with their modules; whole tensors (modules_to_save copies) and trainable-token rows
are carried over unchanged; tensors PEFT would not load are dropped with a warning.
Written atomically as a PEFT adapter folder (dtype: the input's unless --dtype).
Progress goes to stderr for adapters of 64 modules or more (--progress: always; --quiet: never).
)",
                               run_compress}};

}  // namespace
