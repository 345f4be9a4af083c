// lora intruders: PEFT's reduce_intruder_dimension on an adapter folder.
#include <lora/analysis/intruder.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

int run_intruders(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"quiet"}, {"base", "out", "top-k", "epsilon", "lambda", "dtype"}, "intruders");
  if (args.positional().size() != 1)
    lora::fail("expected one PEFT adapter folder, got {} arguments (see 'lora intruders --help')",
                       args.positional().size());
  const std::string folder = args.positional()[0], base_path = args.required("base"), out = args.required("out");
  analysis::IntruderMitigationOptions opt;
  const double k = args.number("top-k", 10);
  if (k < 1 || k != std::floor(k)) lora::fail("--top-k must be a whole number ≥ 1, got {}", k);
  opt.detect.top_k = static_cast<Index>(k);
  opt.detect.epsilon = args.number("epsilon", 0.5);
  opt.lambda = args.number("lambda", 0.75);
  if (!std::isfinite(opt.lambda)) lora::fail("--lambda must be finite, got {}", opt.lambda);
  cli::guard_output(args, out, {folder, base_path}, io::output_kind::folder);
  const auto adapter = io::load_peft_adapter(folder);
  const auto base = io::Checkpoint::open(base_path);
  const bool quiet = args.has("quiet");
  std::size_t changed = 0;
  const auto result = analysis::reduce_intruder_dimension_adapter(
      adapter, base, opt, nullptr, [&](const analysis::NamedMitigation& m) {
        changed += m.changed;
        if (quiet) return;
        if (m.report.intruders.empty()) {
          fmt::print("{}: no intruders\n", m.name);
        } else {
          fmt::print("{}: {} intruder(s) at", m.name, m.report.intruders.size());
          for (auto j : m.report.intruders) fmt::print(" {} (max |cos| {:.3f})", j, m.report.max_cosine(j));
          fmt::print("\n");
        }
      });
  io::dtype dt = adapter.modules.front().stored_dtype;
  if (auto d = args.get("dtype")) dt = io::parse_float_dtype(*d, "--dtype");
  io::save_peft_adapter(out, result, dt);
  fmt::print("{} of {} modules had intruders (λ = {}); wrote {}\n", changed, result.modules.size(), opt.lambda, out);
  return 0;
}

const lora::cli::Register reg_intruders{{"intruders", "reduce intruder dimensions of an adapter (PEFT's reduce_intruder_dimension)",
                               R"(usage: lora intruders <peft folder> --base <checkpoint> --out <folder>
                       [--top-k 10] [--epsilon 0.5] [--lambda 0.75] [--dtype F32|BF16|F16] [--quiet]

For every module: the top-k left singular vectors of W + ΔW whose largest |cosine| with all
of W's left singular vectors is below ε are intruders (Shuttleworth et al. 2024); ΔW gets
(λ − 1)·σ'·u'·v'ᵀ of each added and is stored as its rank-r truncation, B = U·√Σ, A = √Σ·Vᵀ,
same r and alpha. PEFT's semantics and defaults, with W + ΔW's top-k by randomized SVD and
the last SVD exact from factors (docs/analysis.md).
)",
                               run_intruders}};

}  // namespace
