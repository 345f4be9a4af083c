// lora combine: PEFT's add_weighted_adapter (all combination types) on adapter folders.
#include <lora/analysis/combine.hpp>
#include <lora/io/peft.hpp>

#include "cli.hpp"
#include "progress.hpp"

namespace {

using namespace lora;

int run_combine(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"progress", "quiet"},
                 {"adapter", "weights", "type", "rank", "out", "dtype", "density", "majority-sign", "space", "svd-clamp",
                  "seed"},
                 "combine");
  if (!args.positional().empty())
    lora::fail("unexpected argument '{}': give adapters with --adapter (see 'lora combine --help')",
                       args.positional()[0]);
  const auto folders = args.all("adapter");
  if (folders.empty()) lora::fail("missing --adapter (give one per input adapter)");
  std::vector<double> weights;
  for (const auto& w : cli::Args::split(args.required("weights"))) weights.push_back(cli::Args::parse_number(w, "--weights"));
  if (weights.size() != folders.size())
    lora::fail("--weights has {} values for {} adapters; give one weight per --adapter", weights.size(),
                       folders.size());
  analysis::CombineOptions opt;
  opt.type = analysis::parse_combination_type(args.get("type").value_or("svd"));
  if (auto s = args.get("space")) opt.space = analysis::parse_combine_space(*s);
  const bool pruning = opt.type != analysis::combination_type::svd && opt.type != analysis::combination_type::cat &&
                       opt.type != analysis::combination_type::linear;
  if (args.has("rank")) {
    if (!analysis::is_svd_type(opt.type) && opt.space != analysis::combine_space::delta)
      lora::fail("--rank applies to the *svd types and to --space delta only (type {})",
                         analysis::to_string(opt.type));
    const double k = args.number("rank", 0);
    if (k < 1 || k != std::floor(k)) lora::fail("--rank must be a whole number ≥ 1, got {}", *args.get("rank"));
    opt.rank = static_cast<Index>(k);
  }
  if (args.has("density")) {
    if (!pruning) lora::fail("--density applies to ties, dare_* and magnitude_prune* only");
    opt.density = args.number("density", 1.0);
    if (!(opt.density > 0.0 && opt.density <= 1.0))
      lora::fail("--density must be in (0, 1], got {}", *args.get("density"));
  } else if (pruning) {
    lora::fail("--type {} needs --density (the fraction of entries kept, in (0, 1])",
                       analysis::to_string(opt.type));
  }
  if (auto m = args.get("majority-sign")) opt.majority_sign = analysis::parse_majority_sign(*m);
  if (args.has("svd-clamp")) opt.svd_clamp = args.number("svd-clamp", 1.0);
  if (args.has("seed")) opt.seed = static_cast<std::uint64_t>(args.number("seed", 0));
  const std::string out = args.required("out");
  std::vector<std::filesystem::path> inputs(folders.begin(), folders.end());
  cli::guard_output(args, out, inputs, io::output_kind::folder);
  std::vector<io::PeftAdapter> loaded;
  for (const auto& f : folders) loaded.push_back(io::load_peft_adapter(f));
  std::vector<const io::PeftAdapter*> ptrs;
  for (const auto& a : loaded) ptrs.push_back(&a);
  // Progress per module when the adapters are big (≥ 64 modules) or asked for.
  cli::Progress progress("combine", !args.has("quiet") && (args.has("progress") || loaded.front().modules.size() >= 64));
  opt.on_module = [&](std::size_t done, std::size_t total, const std::string& name) {
    progress.update(done, total, fmt::format("{}/{} modules ({})", done, total, name));
  };
  const auto combined = analysis::combine_adapters(ptrs, weights, opt);
  const auto type = opt.type;
  io::dtype dt = loaded.front().modules.front().stored_dtype;
  if (auto d = args.get("dtype")) dt = io::parse_float_dtype(*d, "--dtype");
  io::save_peft_adapter(out, combined, dt);
  fmt::print("combined {} adapters ({}, {} space), r = {}, scaling {:.6g}{}, {} modules; wrote {}\n", folders.size(),
             analysis::to_string(type), opt.space == analysis::combine_space::peft ? "PEFT" : "ΔW", combined.config.r,
             combined.modules.front().adapter.scaling(), combined.config.use_rslora ? " (rsLoRA, from the first adapter)" : "",
             combined.modules.size(), out);
  return 0;
}

const lora::cli::Register reg_combine{{"combine", "weighted combination of PEFT adapters (PEFT's add_weighted_adapter)",
                               R"(usage: lora combine --adapter A --adapter B ... --weights w1,w2,... --type TYPE
                    [--density d] [--majority-sign total|frequency] [--rank k]
                    [--space peft|delta] [--svd-clamp q] [--seed n] --out <folder> [--dtype F32|BF16|F16]
                    [--progress | --quiet]

The same adapter as PEFT 0.21's add_weighted_adapter (r = lora_alpha = new rank; use_rslora
is inherited from the first adapter, as PEFT does, so the scaling is 1 or sqrt(r)):
  svd     best rank-k approximation of Σ w_i·ΔW_i (k = --rank, default the largest r);
          computed from the factors exactly, never forming ΔW
  cat     A = [w_i·s_i·A_i stacked], B = [B_i side by side]: exactly Σ w_i·ΔW_i, r = Σ r_i
  linear  A = Σ sign·√|w_i·s_i|·A_i, B = Σ √|w_i·s_i|·B_i (equal ranks; has cross terms)
  ties, dare_linear, dare_ties, magnitude_prune
          the rule on the A_i and on the B_i separately, weights as linear (equal ranks)
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
          the rule on the dense ΔW_i with weights w_i, then the rank-k SVD
--density is the fraction kept (magnitude: the largest |x|; DARE: Bernoulli, rescaled 1/d,
drawn from --seed); --majority-sign elects TIES' sign by Σ t_i (total) or Σ sign(t_i).
--space delta applies every rule to the ΔW_i and stores the best rank-k factors for the new
scaling, so the result is what the rule means rather than what PEFT computes
(docs/analysis.md, "Combining adapters").
Adapters with lora_B biases, modules_to_save copies or trainable-token rows are refused
(add_weighted_adapter combines only lora_A/lora_B; merge them one after the other instead).
Progress goes to stderr for adapters of 64 modules or more (--progress: always; --quiet: never).
)",
                               run_combine}};

}  // namespace
