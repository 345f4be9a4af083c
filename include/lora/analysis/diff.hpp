#pragma once
// Module-by-module difference of two adapters, from their factors only:
// ‖ΔW_A − ΔW_B‖ is the spectrum of [B_A, −B_B]·[s_A·A_A; s_B·A_B] (lowrank_svd: thin QRs,
// no ΔW formed, no Gram cancellation), and the subspace similarity of the two ΔW's
// right singular vectors (LoRA paper's φ). Plus a heatmap SVG (module type × layer).
//
// Compile time: the non-template functions here are `template <class = void>` (see
// docs/reliability.md, "Sanitizers").

#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/plot.hpp>
#include <lora/analysis/similarity.hpp>
#include <lora/io/peft.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <string>
#include <vector>

namespace lora::analysis {

/// One module both adapters have.
struct ModuleDiff {
  std::string name;
  Index rank_a = 0, rank_b = 0;
  double norm_a = 0, norm_b = 0;  ///< ‖ΔW_A‖_F, ‖ΔW_B‖_F
  double diff_fro = 0;            ///< ‖ΔW_A − ΔW_B‖_F
  double diff_spectral = 0;       ///< ‖ΔW_A − ΔW_B‖₂
  double rel_fro = 0;             ///< diff_fro / ‖ΔW_A‖_F (∞ when ΔW_A = 0 ≠ ΔW_B)
  double similarity = 0;          ///< φ(k, k), k = min(r_A, r_B), of the ΔW's right singular vectors
};

/// The difference of two adapters: shared modules (by name), and those on one side only.
struct AdapterDiff {
  std::vector<ModuleDiff> modules;
  std::vector<std::string> only_a, only_b;
};

/// ‖s_a·B_a·A_a − s_b·B_b·A_b‖ (Frobenius and spectral) and φ(k, k) of one module pair.
template <class BA, class AA, class BB, class AB>
ModuleDiff module_diff(const Eigen::MatrixBase<BA>& Ba, const Eigen::MatrixBase<AA>& Aa, double sa,
                       const Eigen::MatrixBase<BB>& Bb, const Eigen::MatrixBase<AB>& Ab, double sb) {
  if (Ba.rows() != Bb.rows() || Aa.cols() != Ab.cols())
    lora::detail::fail("diff: ΔW is [{} x {}] in the first adapter and [{} x {}] in the second", Ba.rows(), Aa.cols(),
                       Bb.rows(), Ab.cols());
  const Index ra = Aa.rows(), rb = Ab.rows();
  Eigen::MatrixXd P(Ba.rows(), ra + rb), Q(ra + rb, Aa.cols());
  P.leftCols(ra) = Ba.template cast<double>();
  P.rightCols(rb) = -Bb.template cast<double>();
  Q.topRows(ra) = sa * Aa.template cast<double>();
  Q.bottomRows(rb) = sb * Ab.template cast<double>();
  const auto d = lowrank_svd(P, Q, 1.0);
  const auto a = lowrank_svd(Ba, Aa, sa), b = lowrank_svd(Bb, Ab, sb);
  ModuleDiff m;
  m.rank_a = ra;
  m.rank_b = rb;
  m.norm_a = a.singular_values.norm();
  m.norm_b = b.singular_values.norm();
  m.diff_fro = d.singular_values.norm();
  m.diff_spectral = d.size() ? d.singular_values(0) : 0.0;
  m.rel_fro = m.norm_a > 0 ? m.diff_fro / m.norm_a : (m.diff_fro > 0 ? INFINITY : 0.0);
  const Index k = std::min(a.size(), b.size());
  if (k > 0) m.similarity = subspace_similarity(a.V, b.V)(k - 1, k - 1);
  return m;
}

/// module_diff for every module two PEFT adapters share; the others listed per side.
template <class = void>
inline AdapterDiff adapter_diff(const io::PeftAdapter& a, const io::PeftAdapter& b) {
  io::require_modules_only(a, "diff");
  io::require_modules_only(b, "diff");
  AdapterDiff out;
  for (const auto& m : a.modules) {
    const io::PeftModule* n = b.find(m.name);
    if (!n) {
      out.only_a.push_back(m.name);
      continue;
    }
    try {
      ModuleDiff d = module_diff(m.adapter.B(), m.adapter.A(), m.adapter.scaling(), n->adapter.B(), n->adapter.A(),
                                 n->adapter.scaling());
      d.name = m.name;
      out.modules.push_back(std::move(d));
    } catch (const lora::error& e) {
      lora::detail::fail("module '{}': {}", m.name, e.what());
    }
  }
  for (const auto& m : b.modules)
    if (!a.find(m.name)) out.only_b.push_back(m.name);
  return out;
}

namespace detail {
/// "model.layers.12.self_attn.q_proj" → (12, "self_attn.q_proj"); no layer index → (-1, name).
inline std::pair<long, std::string> layer_and_type(const std::string& name) {
  for (std::size_t p = name.find("layers."); p != std::string::npos; p = name.find("layers.", p + 1)) {
    std::size_t q = p + 7, e = q;
    while (e < name.size() && std::isdigit(static_cast<unsigned char>(name[e]))) ++e;
    if (e > q && e < name.size() && name[e] == '.') return {std::stol(name.substr(q, e - q)), name.substr(e + 1)};
  }
  return {-1, name};
}
}  // namespace detail

/// A heatmap of rel_fro (colour, log scale from 1e-4 to ≥ 1) with one row per module type
/// and one column per layer; modules without a layer index get a column "—".
inline std::string diff_heatmap_svg(const AdapterDiff& d, const std::string& title = "") {
  std::map<std::string, std::map<long, double>> grid;
  long max_layer = -1;
  bool unlayered = false;
  for (const auto& m : d.modules) {
    auto [layer, type] = detail::layer_and_type(m.name);
    grid[type][layer] = m.rel_fro;
    max_layer = std::max(max_layer, layer);
    unlayered = unlayered || layer < 0;
  }
  const int cols = static_cast<int>(max_layer + 1) + (unlayered ? 1 : 0);
  const int rows = static_cast<int>(grid.size());
  const int cell = 16, left = 170, top = 40, legend = 60;
  const int width = left + std::max(cols, 1) * cell + 20, height = top + rows * cell + legend;
  auto colour = [](double v) {  // white (≤ 1e-4) → red (≥ 1), log scale
    if (!std::isfinite(v)) return std::string("#400000");
    const double t = std::clamp((std::log10(std::max(v, 1e-12)) + 4.0) / 4.0, 0.0, 1.0);
    const int g = static_cast<int>(std::lround(255 * (1 - t)));
    return fmt::format("#ff{:02x}{:02x}", g, g);
  };
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" "
      "font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"18\" font-size=\"13\">{}</text>\n",
      width, height, left, detail::svg_escape(title.empty() ? "‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F" : title));
  int row = 0;
  for (const auto& [type, cells] : grid) {
    const int y = top + row * cell;
    s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", left - 6, y + 12,
                     detail::svg_escape(type));
    for (const auto& [layer, v] : cells) {
      const int c = layer < 0 ? static_cast<int>(max_layer + 1) : static_cast<int>(layer);
      s += fmt::format(
          "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\" stroke=\"#ccc\"><title>{} layer {}: "
          "{:.3g}</title></rect>\n",
          left + c * cell, y, cell, cell, colour(v), detail::svg_escape(type), layer < 0 ? std::string("—") : std::to_string(layer), v);
    }
    ++row;
  }
  const int ly = top + rows * cell + 16;
  s += fmt::format("<text x=\"{}\" y=\"{}\">layer 0 … {} →</text>\n", left, ly, max_layer);
  for (int i = 0; i <= 4; ++i)
    s += fmt::format(
        "<rect x=\"{}\" y=\"{}\" width=\"28\" height=\"12\" fill=\"{}\" stroke=\"#ccc\"/><text x=\"{}\" y=\"{}\">1e{}</text>\n",
        left + i * 44, ly + 10, colour(std::pow(10.0, i - 4)), left + i * 44, ly + 36, i - 4);
  s += "</svg>\n";
  return s;
}

}  // namespace lora::analysis
