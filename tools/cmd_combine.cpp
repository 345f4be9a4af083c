// lora combine: PEFT's add_weighted_adapter (svd, cat, linear) on adapter folders.
#include <lora/analysis/combine.hpp>
#include <lora/io/peft.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

int run_combine(const std::vector<std::string>& argv) {
  cli::Args args(argv, {}, {"adapter", "weights", "type", "rank", "out", "dtype"}, "combine");
  if (!args.positional().empty())
    lora::detail::fail("unexpected argument '{}': give adapters with --adapter (see 'lora combine --help')",
                       args.positional()[0]);
  const auto folders = args.all("adapter");
  if (folders.empty()) lora::detail::fail("missing --adapter (give one per input adapter)");
  std::vector<double> weights;
  for (const auto& w : cli::Args::split(args.required("weights"))) weights.push_back(cli::Args::parse_number(w, "--weights"));
  if (weights.size() != folders.size())
    lora::detail::fail("--weights has {} values for {} adapters; give one weight per --adapter", weights.size(),
                       folders.size());
  const auto type = analysis::parse_combination_type(args.get("type").value_or("svd"));
  Index rank = 0;
  if (args.has("rank")) {
    if (type != analysis::combination_type::svd) lora::detail::fail("--rank applies to --type svd only");
    const double k = args.number("rank", 0);
    if (k < 1 || k != std::floor(k)) lora::detail::fail("--rank must be a whole number ≥ 1, got {}", *args.get("rank"));
    rank = static_cast<Index>(k);
  }
  const std::string out = args.required("out");
  std::vector<io::PeftAdapter> loaded;
  for (const auto& f : folders) loaded.push_back(io::load_peft_adapter(f));
  std::vector<const io::PeftAdapter*> ptrs;
  for (const auto& a : loaded) ptrs.push_back(&a);
  const auto combined = analysis::combine_adapters(ptrs, weights, type, rank);
  io::dtype dt = loaded.front().modules.front().stored_dtype;
  if (auto d = args.get("dtype")) dt = io::parse_dtype(*d, "--dtype");
  io::save_peft_adapter(out, combined, dt);
  fmt::print("combined {} adapters ({}), r = {}, {} modules; wrote {}\n", folders.size(), analysis::to_string(type),
             combined.config.r, combined.modules.size(), out);
  return 0;
}

const lora::cli::Register reg{{"combine", "weighted combination of PEFT adapters (PEFT's add_weighted_adapter)",
                               R"(usage: lora combine --adapter A --adapter B ... --weights w1,w2,... --type svd|cat|linear
                    [--rank k] --out <folder> [--dtype F32|BF16|F16]

The same adapter as PEFT's add_weighted_adapter (the new adapter has r = lora_alpha =
new rank, so scaling 1):
  svd     best rank-k approximation of Σ w_i·ΔW_i (k = --rank, default the largest r);
          computed from the factors exactly, never forming ΔW
  cat     A = [w_i·s_i·A_i stacked], B = [B_i side by side]: exactly Σ w_i·ΔW_i, r = Σ r_i
  linear  A = Σ sign·√|w_i·s_i|·A_i, B = Σ √|w_i·s_i|·B_i (equal ranks; has cross terms)
)",
                               run_combine}};

}  // namespace
