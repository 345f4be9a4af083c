// lora similarity: subspace similarity φ(i, j) of two adapters (LoRA paper §7).
#include <lora/analysis/similarity.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/peft.hpp>

#include <nlohmann/json.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

nlohmann::ordered_json grid(const Eigen::MatrixXd& m) {
  auto g = nlohmann::ordered_json::array();
  for (Index i = 0; i < m.rows(); ++i) {
    std::vector<double> row(static_cast<std::size_t>(m.cols()));
    for (Index j = 0; j < m.cols(); ++j) row[static_cast<std::size_t>(j)] = m(i, j);
    g.push_back(row);
  }
  return g;
}

int run_similarity(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"json"}, {}, "similarity");
  if (args.positional().size() != 2)
    lora::fail("expected two PEFT adapter folders, got {} arguments (see 'lora similarity --help')",
                       args.positional().size());
  // GGUF adapters too; φ compares right singular vectors, which llama.cpp's q/k row order does not change.
  const auto a = io::load_adapter(args.positional()[0], io::gguf_options_near(std::nullopt));
  const auto b = io::load_adapter(args.positional()[1], io::gguf_options_near(std::nullopt));
  const auto sims = analysis::adapter_similarity(a, b);
  if (sims.empty())
    lora::fail("the adapters share no module ({} has e.g. '{}', {} has e.g. '{}')", args.positional()[0],
                       a.modules.front().name, args.positional()[1], b.modules.front().name);
  double mean_a = 0, mean_d = 0;
  for (const auto& s : sims) {
    mean_a += analysis::mean_similarity(s.similarity.phi_A);
    mean_d += analysis::mean_similarity(s.similarity.phi_delta);
  }
  mean_a /= double(sims.size());
  mean_d /= double(sims.size());
  if (args.has("json")) {
    nlohmann::ordered_json j, mods = nlohmann::ordered_json::array();
    for (const auto& s : sims) {
      mods.push_back({{"name", s.name},
                      {"rank_1", s.rank1},
                      {"rank_2", s.rank2},
                      {"phi_A", grid(s.similarity.phi_A)},
                      {"phi_delta", grid(s.similarity.phi_delta)},
                      {"mean_phi_A", analysis::mean_similarity(s.similarity.phi_A)},
                      {"mean_phi_delta", analysis::mean_similarity(s.similarity.phi_delta)}});
    }
    j["modules"] = std::move(mods);
    j["summary"] = {{"modules", sims.size()}, {"mean_phi_A", mean_a}, {"mean_phi_delta", mean_d}};
    fmt::print("{}\n", j.dump(1));
    return 0;
  }
  std::size_t w = 6;
  for (const auto& s : sims) w = std::max(w, s.name.size());
  fmt::print("{:<{}}  {:>3}  {:>3}  {:>9}  {:>9}  {:>11}  {:>11}\n", "module", w, "r1", "r2", "φ_A(1,1)", "mean φ_A",
             "φ_ΔW(1,1)", "mean φ_ΔW");
  for (const auto& s : sims)
    fmt::print("{:<{}}  {:>3}  {:>3}  {:>9.4f}  {:>9.4f}  {:>11.4f}  {:>11.4f}\n", s.name, w, s.rank1, s.rank2,
               s.similarity.phi_A(0, 0), analysis::mean_similarity(s.similarity.phi_A), s.similarity.phi_delta(0, 0),
               analysis::mean_similarity(s.similarity.phi_delta));
  fmt::print("\n{} shared modules; mean φ over the grids: A {:.4f}, ΔW {:.4f} (1 = same subspaces; random "
             "subspaces of dimension k in n give ≈ k/n)\n",
             sims.size(), mean_a, mean_d);
  return 0;
}

const lora::cli::Register reg_similarity{{"similarity", "subspace similarity of two PEFT adapters (LoRA paper, §7)",
                               R"(usage: lora similarity <folder A> <folder B> [--json]

For every module both adapters have: φ(i, j) = ‖U₁^(i)ᵀ·U₂^(j)‖_F² / min(i, j), where
U^(i) are the top-i right singular vectors, once of lora_A (as in the LoRA paper) and
once of ΔW = s·B·A. The table shows φ(1, 1) and the mean over the grid; --json gives
the whole grids ("phi_A", "phi_delta", rows i = 1..r1, columns j = 1..r2).
)",
                               run_similarity}};

}  // namespace
