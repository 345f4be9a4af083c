// lora diff: per-module difference of two adapters from their factors.
#include <lora/analysis/diff.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/peft.hpp>

#include <nlohmann/json.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

int run_diff(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"json"}, {"svg"}, "diff");
  if (args.positional().size() != 2)
    lora::fail("expected two PEFT adapter folders, got {} arguments (see 'lora diff --help')",
                       args.positional().size());
  const std::string pa = args.positional()[0], pb = args.positional()[1];
  if (auto svg = args.get("svg")) cli::guard_output(args, *svg, {pa, pb}, io::output_kind::file, "--svg");
  const auto a = io::load_peft_adapter(pa);
  const auto b = io::load_peft_adapter(pb);
  const auto d = analysis::adapter_diff(a, b);
  if (auto svg = args.get("svg")) {
    const std::string doc = analysis::diff_heatmap_svg(d, fmt::format("‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F: {} vs {}", pa, pb));
    io::write_file_atomically(*svg, [&](const std::filesystem::path& tmp) { io::write_bytes(tmp, doc); });
  }
  if (args.has("json")) {
    nlohmann::ordered_json j, mods = nlohmann::ordered_json::array();
    for (const auto& m : d.modules)
      mods.push_back({{"name", m.name},
                      {"rank_a", m.rank_a},
                      {"rank_b", m.rank_b},
                      {"norm_a", m.norm_a},
                      {"norm_b", m.norm_b},
                      {"diff_fro", m.diff_fro},
                      {"diff_spectral", m.diff_spectral},
                      {"rel_fro", std::isfinite(m.rel_fro) ? nlohmann::ordered_json(m.rel_fro) : nullptr},
                      {"similarity", m.similarity}});
    j["modules"] = std::move(mods);
    j["only_a"] = d.only_a;
    j["only_b"] = d.only_b;
    fmt::print("{}\n", j.dump(1));
    return 0;
  }
  std::size_t w = 6;
  for (const auto& m : d.modules) w = std::max(w, m.name.size());
  fmt::print("{:<{}}  {:>3}  {:>3}  {:>10}  {:>10}  {:>12}  {:>7}\n", "module", w, "rA", "rB", "‖ΔW_A‖_F", "‖ΔW_B‖_F",
             "rel Frob diff", "φ_ΔW");
  double worst = 0;
  for (const auto& m : d.modules) {
    fmt::print("{:<{}}  {:>3}  {:>3}  {:>10.4g}  {:>10.4g}  {:>12.4e}  {:>7.4f}\n", m.name, w, m.rank_a, m.rank_b,
               m.norm_a, m.norm_b, m.rel_fro, m.similarity);
    worst = std::max(worst, m.rel_fro);
  }
  for (const auto& n : d.only_a) fmt::print("only in A: {}\n", n);
  for (const auto& n : d.only_b) fmt::print("only in B: {}\n", n);
  fmt::print("\n{} shared modules, largest relative difference {:.4e}; {} only in A, {} only in B\n", d.modules.size(),
             worst, d.only_a.size(), d.only_b.size());
  return 0;
}

const lora::cli::Register reg_diff{{"diff", "per-module difference of two PEFT adapters (from the factors)",
                               R"(usage: lora diff <folder A> <folder B> [--json] [--svg heatmap.svg]

For every module both adapters have: ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F, computed exactly from the
factors (the spectrum of [B_A, −B_B]·[s_A·A_A; s_B·A_B]; ΔW is never formed), and φ_ΔW,
the subspace similarity of the top-min(r_A, r_B) right singular vectors of the two ΔW
(1: same subspace). Modules present on one side only are listed. --svg writes a heatmap
(module type × layer) of the relative difference.
)",
                               run_diff}};

}  // namespace
