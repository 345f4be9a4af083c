#pragma once
// Weighted combination of LoRA modules, equal to PEFT's
// LoraModel.add_weighted_adapter for combination_type "svd", "cat" and "linear".
//
// PEFT gives the new adapter r = new_rank, lora_alpha = new_rank and (since
// PEFT 0.21) use_rslora = false, so its scaling is 1, and stores the factors
// below as they are: ΔW_new = B·A.
//
// Compile time: the non-template functions here are `template <class = void>`, so the
// decompositions (and JSON code) they use are compiled only in files that call them, not in
// every file that includes this header (docs/reliability.md, "Sanitizers").

#include <lora/analysis/compress.hpp>
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/core/random.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lora::analysis {

enum class combination_type {
  svd,
  cat,
  linear,
  ties,
  ties_svd,
  dare_linear,
  dare_ties,
  dare_linear_svd,
  dare_ties_svd,
  magnitude_prune,
  magnitude_prune_svd
};

inline constexpr combination_type all_combination_types[] = {
    combination_type::svd,           combination_type::cat,
    combination_type::linear,        combination_type::ties,
    combination_type::ties_svd,      combination_type::dare_linear,
    combination_type::dare_ties,     combination_type::dare_linear_svd,
    combination_type::dare_ties_svd, combination_type::magnitude_prune,
    combination_type::magnitude_prune_svd};

inline std::string_view to_string(combination_type t) {
  switch (t) {
    case combination_type::svd: return "svd";
    case combination_type::cat: return "cat";
    case combination_type::linear: return "linear";
    case combination_type::ties: return "ties";
    case combination_type::ties_svd: return "ties_svd";
    case combination_type::dare_linear: return "dare_linear";
    case combination_type::dare_ties: return "dare_ties";
    case combination_type::dare_linear_svd: return "dare_linear_svd";
    case combination_type::dare_ties_svd: return "dare_ties_svd";
    case combination_type::magnitude_prune: return "magnitude_prune";
    case combination_type::magnitude_prune_svd: return "magnitude_prune_svd";
  }
  return "?";
}
inline combination_type parse_combination_type(std::string_view s) {
  for (auto t : all_combination_types)
    if (to_string(t) == s) return t;
  lora::detail::fail(
      "combination type must be one of svd, cat, linear, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, "
      "dare_ties_svd, magnitude_prune, magnitude_prune_svd; got '{}'",
      s);
}

/// True for the types PEFT computes on the dense Σ ΔW and then factorises by SVD.
inline bool is_svd_type(combination_type t) {
  return t == combination_type::svd || t == combination_type::ties_svd || t == combination_type::dare_linear_svd ||
         t == combination_type::dare_ties_svd || t == combination_type::magnitude_prune_svd;
}
/// True for the types that need every adapter to have the same r in PEFT.
inline bool needs_equal_ranks(combination_type t) {
  return t == combination_type::linear || t == combination_type::ties || t == combination_type::dare_linear ||
         t == combination_type::dare_ties || t == combination_type::magnitude_prune;
}

/// TIES' sign election: the sign of Σ_i t_i (total) or of Σ_i sign(t_i) (frequency).
enum class majority_sign_method { total, frequency };
inline majority_sign_method parse_majority_sign(std::string_view s) {
  if (s == "total") return majority_sign_method::total;
  if (s == "frequency") return majority_sign_method::frequency;
  lora::detail::fail("majority sign method must be total or frequency, got '{}'", s);
}

/// Where the pruning rules act: `peft` reproduces add_weighted_adapter (A and B
/// pruned and summed separately in the non-SVD types, factors stored as computed
/// whatever the new adapter's scaling); `delta` applies the same element-wise rule to
/// the ΔW_i = s_i·B_i·A_i and stores the best rank-k factorisation of the result for
/// the new adapter's scaling, so that s_new·B·A is exactly that truncation.
enum class combine_space { peft, delta };
inline combine_space parse_combine_space(std::string_view s) {
  if (s == "peft") return combine_space::peft;
  if (s == "delta") return combine_space::delta;
  lora::detail::fail("combine space must be peft or delta, got '{}'", s);
}

/// The tensor a DARE mask is drawn for: lora_A or lora_B of an adapter (non-SVD
/// types in PEFT space) or its ΔW (SVD types, and every type in ΔW space).
enum class dare_part { A, B, delta };

/// DARE's keep-mask for one tensor of input adapter `index` in `module` (empty for a
/// single-module combine): 1 keeps, 0 drops. Called in PEFT's order (all adapters' A,
/// then all adapters' B; or each adapter's ΔW).
using DareMask = Eigen::Array<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic>;
using DareMaskFn =
    std::function<DareMask(std::string_view module, std::size_t index, dare_part part, Index rows, Index cols)>;

/// Options of combine(); `rank` is the new rank of the SVD types and of ΔW space
/// (0: the largest input r), `density` the fraction kept by pruning (≥ 1: none).
struct CombineOptions {
  combination_type type = combination_type::svd;
  Index rank = 0;
  double density = 1.0;
  majority_sign_method majority_sign = majority_sign_method::total;
  std::optional<double> svd_clamp;  ///< PEFT's svd_clamp quantile (SVD types, PEFT space)
  combine_space space = combine_space::peft;
  DareMaskFn dare_mask;              ///< empty: Bernoulli(density) drawn from `seed`
  std::uint64_t seed = 0x5eed;
  /// Called after each module of combine_adapters with (modules done, modules in all, name);
  /// for progress reports on big adapters. Empty: not called.
  std::function<void(std::size_t, std::size_t, const std::string&)> on_module;
};

/// One input module: ΔW_i = scaling·B·A, entering with `weight`.
struct WeightedFactors {
  Matrix<double> B;  ///< [out × r_i]
  Matrix<double> A;  ///< [r_i × in]
  double scaling = 1;
  double weight = 1;
};

namespace detail {
inline void check_inputs(const std::vector<WeightedFactors>& in, const char* who) {
  if (in.empty()) lora::detail::fail("{}: no adapters to combine", who);
  for (std::size_t i = 0; i < in.size(); ++i) {
    const auto& f = in[i];
    if (f.B.cols() != f.A.rows())
      lora::detail::fail("{}: adapter {}: lora_B is [{} x {}] and lora_A is [{} x {}]", who, i, f.B.rows(), f.B.cols(),
                         f.A.rows(), f.A.cols());
    if (f.B.rows() != in[0].B.rows() || f.A.cols() != in[0].A.cols())
      lora::detail::fail("{}: adapter {} has ΔW [{} x {}], adapter 0 has [{} x {}]", who, i, f.B.rows(), f.A.cols(),
                         in[0].B.rows(), in[0].A.cols());
    if (!std::isfinite(f.weight) || !std::isfinite(f.scaling))
      lora::detail::fail("{}: adapter {}: weight and scaling must be finite (got {} and {})", who, i, f.weight,
                         f.scaling);
  }
}
}  // namespace detail

/// "cat": A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …], zero-padded to new_rank rows/columns
/// (PEFT's new_rank is Σ of the adapters' r). ΔW = s_new·Σ w_i·s_i·B_i·A_i.
template <class = void>
inline Factors combine_cat(const std::vector<WeightedFactors>& in, Index new_rank) {
  detail::check_inputs(in, "combine (cat)");
  Index total = 0;
  for (const auto& f : in) total += f.A.rows();
  if (new_rank < total) lora::detail::fail("combine (cat): new rank {} is less than the sum of ranks {}", new_rank, total);
  Factors out;
  out.A = Matrix<double>::Zero(new_rank, in[0].A.cols());
  out.B = Matrix<double>::Zero(in[0].B.rows(), new_rank);
  Index at = 0;
  for (const auto& f : in) {
    out.A.middleRows(at, f.A.rows()) = (f.weight * f.scaling) * f.A;
    out.B.middleCols(at, f.B.cols()) = f.B;
    at += f.A.rows();
  }
  return out;
}

/// "linear": with c_i = w_i·s_i, A = Σ sign(c_i)·√|c_i|·A_i and B = Σ √|c_i|·B_i (all r_i
/// equal). Note ΔW = s_new·B·A has cross terms B_i·A_j: it is not Σ c_i·B_i·A_i.
template <class = void>
inline Factors combine_linear(const std::vector<WeightedFactors>& in) {
  detail::check_inputs(in, "combine (linear)");
  for (std::size_t i = 1; i < in.size(); ++i)
    if (in[i].A.rows() != in[0].A.rows())
      lora::detail::fail("combine (linear): all adapters must have the same r; adapter 0 has r = {}, adapter {} has {}",
                         in[0].A.rows(), i, in[i].A.rows());
  Factors out;
  out.A = Matrix<double>::Zero(in[0].A.rows(), in[0].A.cols());
  out.B = Matrix<double>::Zero(in[0].B.rows(), in[0].B.cols());
  for (const auto& f : in) {
    const double c = f.weight * f.scaling;
    const double root = std::sqrt(std::abs(c));
    out.A += (c >= 0 ? root : -root) * f.A;
    out.B += root * f.B;
  }
  return out;
}

/// "svd": the best rank-new_rank approximation of D = Σ w_i·ΔW_i = Σ w_i·s_i·B_i·A_i,
/// as B = U_k·Σ_k, A = V_kᵀ (the scaling enters once, as PEFT 0.21.0 computes it:
/// see tests/data/peft/weighted_combos; the same D that "cat" represents exactly).
/// D is never formed: it is the low-rank product [B₁ … B_n]·[w₁s₁A₁; …], so its SVD
/// is exact (lowrank_svd). Singular vectors may differ from PEFT's in sign; ΔW does not.
template <class = void>
inline Factors combine_svd(const std::vector<WeightedFactors>& in, Index new_rank) {
  detail::check_inputs(in, "combine (svd)");
  if (new_rank < 1) lora::detail::fail("combine (svd): rank must be ≥ 1, got {}", new_rank);
  Index total = 0;
  for (const auto& f : in) total += f.A.rows();
  WeightedFactors cat;
  Matrix<double> Bc(in[0].B.rows(), total), Ac(total, in[0].A.cols());
  Index at = 0;
  for (const auto& f : in) {
    Ac.middleRows(at, f.A.rows()) = (f.weight * f.scaling) * f.A;
    Bc.middleCols(at, f.B.cols()) = f.B;
    at += f.A.rows();
  }
  const LowRankSVD<double> svd = lowrank_svd(Bc, Ac, 1.0);
  const Index k = std::min(new_rank, svd.size());
  Factors out;
  out.B = Matrix<double>::Zero(Bc.rows(), new_rank);
  out.A = Matrix<double>::Zero(new_rank, Ac.cols());
  out.B.leftCols(k) = svd.U.leftCols(k) * svd.singular_values.head(k).asDiagonal();
  out.A.topRows(k) = svd.V.leftCols(k).transpose();
  return out;
}

// ---- element-wise merge rules (PEFT's merge_utils) ---------------------------

namespace detail {
using Mask = DareMask;

/// Keeps the k = ⌊density·numel⌋ entries of largest |t| (PEFT's magnitude_based_pruning;
/// density ≥ 1 keeps all).
template <class = void>
inline Matrix<double> prune_magnitude(const Matrix<double>& t, double density) {
  if (density >= 1.0) return t;
  const Index n = t.size();
  const auto k = static_cast<Index>(density * static_cast<double>(n));
  Matrix<double> out = Matrix<double>::Zero(t.rows(), t.cols());
  if (k <= 0) return out;
  std::vector<Index> idx(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) idx[static_cast<std::size_t>(i)] = i;
  const double* d = t.data();
  std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(),
                   [&](Index a, Index b) { return std::abs(d[a]) > std::abs(d[b]); });
  for (Index j = 0; j < k; ++j) out.data()[idx[static_cast<std::size_t>(j)]] = d[idx[static_cast<std::size_t>(j)]];
  return out;
}

/// DARE's random pruning with rescale: t·mask/density (density ≥ 1: t, no mask drawn).
template <class = void>
inline Matrix<double> prune_random(const Matrix<double>& t, double density, const Mask& mask, std::size_t index) {
  if (mask.rows() != t.rows() || mask.cols() != t.cols())
    lora::detail::fail("DARE mask for adapter {} is [{} x {}], the tensor is [{} x {}]", index, mask.rows(),
                       mask.cols(), t.rows(), t.cols());
  Matrix<double> out(t.rows(), t.cols());
  for (Index j = 0; j < t.cols(); ++j)
    for (Index i = 0; i < t.rows(); ++i) out(i, j) = mask(i, j) ? t(i, j) / density : 0.0;
  return out;
}

/// Σ_i w_i·t_i over the entries whose sign agrees with the elected sign of the
/// (unweighted) t_i, divided by how many agree (at least 1): TIES' disjoint merge.
template <class = void>
inline Matrix<double> disjoint_merge(const std::vector<Matrix<double>>& t, const std::vector<double>& w,
                                     majority_sign_method method) {
  Matrix<double> out = Matrix<double>::Zero(t[0].rows(), t[0].cols());
  const Index n = t[0].size();
  for (Index e = 0; e < n; ++e) {
    double elect = 0;
    for (const auto& ti : t) {
      const double v = ti.data()[e];
      elect += method == majority_sign_method::total ? v : static_cast<double>((v > 0) - (v < 0));
    }
    const int major = elect >= 0 ? 1 : -1;
    double sum = 0;
    int count = 0;
    for (std::size_t i = 0; i < t.size(); ++i) {
      const double v = t[i].data()[e];
      if ((v > 0) - (v < 0) == major) {
        sum += w[i] * v;
        ++count;
      }
    }
    out.data()[e] = sum / std::max(count, 1);
  }
  return out;
}

/// A DARE mask source: the caller's, or Bernoulli(density) from one generator.
struct DareMasks {
  const CombineOptions& opt;
  std::string_view module;
  const std::vector<std::size_t>* index_map = nullptr;  ///< input i → index among all adapters
  std::optional<Generator> gen;
  Mask operator()(std::size_t index, dare_part part, Index rows, Index cols) {
    if (opt.dare_mask) {
      Mask m = opt.dare_mask(module, index_map ? (*index_map)[index] : index, part, rows, cols);
      if (m.rows() != rows || m.cols() != cols)
        lora::detail::fail("DARE mask for adapter {} is [{} x {}], expected [{} x {}]", index, m.rows(), m.cols(), rows,
                           cols);
      return m;
    }
    if (!gen) gen.emplace(opt.seed);
    Mask m(rows, cols);
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < rows; ++i) m(i, j) = gen->uniform() < opt.density ? 1 : 0;
    return m;
  }
};

/// The element-wise rule of `type` on task tensors t_i with weights w_i (PEFT's
/// task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune).
template <class = void>
inline Matrix<double> merge_tensors(std::vector<Matrix<double>> t, const std::vector<double>& w, combination_type type,
                                    const CombineOptions& opt, DareMasks& masks, dare_part part) {
  using ct = combination_type;
  const bool dare = type == ct::dare_linear || type == ct::dare_ties || type == ct::dare_linear_svd ||
                    type == ct::dare_ties_svd;
  const bool magnitude = type == ct::ties || type == ct::ties_svd || type == ct::magnitude_prune ||
                         type == ct::magnitude_prune_svd;
  const bool ties = type == ct::ties || type == ct::ties_svd || type == ct::dare_ties || type == ct::dare_ties_svd;
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (magnitude) t[i] = prune_magnitude(t[i], opt.density);
    if (dare && opt.density < 1.0) t[i] = prune_random(t[i], opt.density, masks(i, part, t[i].rows(), t[i].cols()), i);
  }
  if (ties) return disjoint_merge(t, w, opt.majority_sign);
  Matrix<double> out = Matrix<double>::Zero(t[0].rows(), t[0].cols());
  for (std::size_t i = 0; i < t.size(); ++i) out += w[i] * t[i];
  return out;
}

/// torch.quantile(x, q) (linear interpolation between order statistics).
template <class = void>
inline double quantile(std::vector<double> x, double q) {
  std::sort(x.begin(), x.end());
  const double pos = q * static_cast<double>(x.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, x.size() - 1);
  return x[lo] + (pos - static_cast<double>(lo)) * (x[hi] - x[lo]);
}

template <class = void>
inline void check_density(const CombineOptions& opt, const char* who) {
  if (!(opt.density >= 0.0) || !std::isfinite(opt.density))
    lora::detail::fail("{}: density must be ≥ 0 (the fraction of entries kept), got {}", who, opt.density);
  const auto t = opt.type;
  if ((t == combination_type::dare_linear || t == combination_type::dare_ties || t == combination_type::dare_linear_svd ||
       t == combination_type::dare_ties_svd) &&
      opt.density == 0.0)
    lora::detail::fail("{}: DARE with density 0 divides by zero (PEFT returns NaN); give a density in (0, 1]", who);
}
}  // namespace detail

/// PEFT's svd_clamp: with d = [B.flatten(), A.flatten()] of the SVD factors (B = U·Σ,
/// A = Vᵀ), clamps every entry of both to [−h, h], h = quantile(d, q). It depends on
/// the signs of the singular vectors, which LAPACK does not fix.
template <class = void>
inline void clamp_factors(Factors& f, double q) {
  if (!(q >= 0.0 && q <= 1.0)) lora::detail::fail("svd_clamp must be a quantile in [0, 1], got {}", q);
  std::vector<double> d(f.B.data(), f.B.data() + f.B.size());
  d.insert(d.end(), f.A.data(), f.A.data() + f.A.size());
  const double hi = detail::quantile(std::move(d), q);
  f.B = f.B.cwiseMax(-hi).cwiseMin(hi);
  f.A = f.A.cwiseMax(-hi).cwiseMin(hi);
}

/// Truncated SVD of a dense D as PEFT stores it: B = U_k·Σ_k, A = V_kᵀ (zero-padded to k).
template <class = void>
inline Factors svd_factors(const Matrix<double>& D, Index k) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Index p = std::min(k, static_cast<Index>(svd.singularValues().size()));
  Factors f;
  f.B = Matrix<double>::Zero(D.rows(), k);
  f.A = Matrix<double>::Zero(k, D.cols());
  f.B.leftCols(p) = svd.matrixU().leftCols(p) * svd.singularValues().head(p).asDiagonal();
  f.A.topRows(p) = svd.matrixV().leftCols(p).transpose();
  return f;
}

/// One module's combination, as `opt` says. `new_scaling` is the scaling the new
/// adapter will have (PEFT: 1, or √r when the first adapter uses rsLoRA); PEFT space
/// ignores it (PEFT does), ΔW space divides it out so s_new·B·A is the intended result.
///
/// PEFT space, for c_i = w_i·s_i:
///   svd types   D = rule_i(w_i, s_i·B_i·A_i), then B = U_k·Σ_k, A = V_kᵀ (optionally clamped)
///   the others  A = rule_i(sign(c_i)·√|c_i|, A_i), B = rule_i(√|c_i|, B_i) (equal r; cross terms)
///   cat         exact stacking
/// ΔW space: D = rule_i(w_i, s_i·B_i·A_i) for every type, then the best rank-k factors.
template <class = void>
inline Factors combine(const std::vector<WeightedFactors>& in, const CombineOptions& opt, double new_scaling = 1.0,
                       std::string_view module = {}, const std::vector<std::size_t>* index_map = nullptr) {
  using ct = combination_type;
  const std::string who = fmt::format("combine ({})", to_string(opt.type));
  detail::check_inputs(in, who.c_str());
  detail::check_density(opt, who.c_str());
  Index max_r = 0, sum_r = 0;
  for (const auto& f : in) max_r = std::max<Index>(max_r, f.A.rows()), sum_r += f.A.rows();
  const Index k = opt.rank > 0 ? opt.rank : max_r;
  detail::DareMasks masks{opt, module, index_map, std::nullopt};
  if (opt.space == combine_space::delta && opt.type != ct::cat) {
    if (opt.svd_clamp) lora::detail::fail("{}: svd_clamp applies to PEFT space only", who);
    std::vector<Matrix<double>> t;
    std::vector<double> w;
    for (const auto& f : in) t.push_back(f.scaling * f.B * f.A), w.push_back(f.weight);
    const ct rule = opt.type == ct::svd || opt.type == ct::linear ? ct::svd : opt.type;
    if (rule == ct::svd) {  // no pruning: Σ w_i·ΔW_i is low rank, its SVD exact from the factors
      const Factors stacked = combine_cat(in, sum_r);
      return factors_from_svd(lowrank_svd(stacked.B, stacked.A, 1.0), new_scaling, k);
    }
    const Matrix<double> D = detail::merge_tensors(std::move(t), w, rule, opt, masks, dare_part::delta);
    Eigen::BDCSVD<Eigen::MatrixXd> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
    LowRankSVD<double> s{svd.matrixU(), svd.singularValues(), svd.matrixV()};
    return factors_from_svd(s, new_scaling, k);
  }
  if (opt.type == ct::cat) return combine_cat(in, sum_r);
  if (is_svd_type(opt.type)) {
    Factors f;
    if (opt.type == ct::svd) {
      f = combine_svd(in, k);
    } else {
      std::vector<Matrix<double>> t;
      std::vector<double> w;
      for (const auto& x : in) t.push_back(x.scaling * x.B * x.A), w.push_back(x.weight);
      f = svd_factors(detail::merge_tensors(std::move(t), w, opt.type, opt, masks, dare_part::delta), k);
    }
    if (opt.svd_clamp) clamp_factors(f, *opt.svd_clamp);
    return f;
  }
  for (std::size_t i = 1; i < in.size(); ++i)
    if (in[i].A.rows() != in[0].A.rows())
      lora::detail::fail(
          "{}: all adapters must have the same r (PEFT refuses linear, ties, dare_ties, dare_linear and "
          "magnitude_prune on unequal ranks); adapter 0 has r = {}, adapter {} has {}",
          who, in[0].A.rows(), i, in[i].A.rows());
  if (opt.type == ct::linear) return combine_linear(in);
  std::vector<Matrix<double>> tA, tB;
  std::vector<double> wA, wB;
  for (const auto& f : in) {
    const double c = f.weight * f.scaling, root = std::sqrt(std::abs(c));
    tA.push_back(f.A), tB.push_back(f.B);
    wA.push_back(c >= 0 ? root : -root), wB.push_back(root);
  }
  Factors out;
  out.A = detail::merge_tensors(std::move(tA), wA, opt.type, opt, masks, dare_part::A);
  out.B = detail::merge_tensors(std::move(tB), wB, opt.type, opt, masks, dare_part::B);
  return out;
}

/// Dispatch on the type with default options; new_rank is used by the SVD types.
template <class = void>
inline Factors combine(const std::vector<WeightedFactors>& in, combination_type type, Index new_rank) {
  if (type == combination_type::cat) {
    Index total = 0;
    for (const auto& f : in) total += f.A.rows();
    if (new_rank != total) return combine_cat(in, new_rank);
  }
  CombineOptions opt;
  opt.type = type;
  opt.rank = new_rank;
  return combine(in, opt);
}

}  // namespace lora::analysis

// ---- whole PEFT adapters -----------------------------------------------------
#include <lora/io/peft.hpp>

#include <set>

namespace lora::analysis {

namespace detail {
/// PEFT's rank of an adapter in add_weighted_adapter: r, or the largest rank_pattern value.
inline Index peft_max_rank(const io::PeftAdapter& a) {
  Index r = a.config.r;
  for (const auto& [k, v] : a.config.rank_pattern) r = std::max<Index>(r, v);
  return r;
}
}  // namespace detail

/// PEFT's add_weighted_adapter on whole adapters: modules are the union of the
/// inputs' modules (an adapter without a module is skipped there); the new rank is
/// the common r (linear, ties, dare_*, magnitude_prune: unequal ranks are refused as
/// PEFT does), Σ r (cat) or opt.rank (SVD types and ΔW space; 0: the largest r). The
/// new config is the first adapter's with r = lora_alpha = new rank and no patterns;
/// use_rslora is inherited from it (as PEFT does), so the new scaling is 1 or √r.
template <class = void>
inline io::PeftAdapter combine_adapters(const std::vector<const io::PeftAdapter*>& adapters,
                                        const std::vector<double>& weights, CombineOptions opt) {
  using ct = combination_type;
  if (adapters.empty()) lora::detail::fail("combine: no adapters given");
  for (const auto* a : adapters)
    if (a) io::require_modules_only(*a, "combine");
  if (weights.size() != adapters.size())
    lora::detail::fail("combine: {} adapters but {} weights; give one weight per adapter", adapters.size(),
                       weights.size());
  if (adapters.size() == 1) opt.type = ct::linear;  // as PEFT
  if (opt.rank < 0) lora::detail::fail("combine ({}): rank must be ≥ 1, got {}", to_string(opt.type), opt.rank);
  Index new_rank = 0;
  if (opt.type == ct::cat) {
    for (auto* a : adapters) new_rank += detail::peft_max_rank(*a);
  } else if (needs_equal_ranks(opt.type) && opt.space == combine_space::peft) {
    new_rank = detail::peft_max_rank(*adapters[0]);
    for (std::size_t i = 1; i < adapters.size(); ++i)
      if (detail::peft_max_rank(*adapters[i]) != new_rank)
        lora::detail::fail(
            "combine ({}): all adapters must have the same r (PEFT refuses linear, ties, dare_ties, dare_linear and "
            "magnitude_prune on unequal ranks); adapter 1 has r = {}, adapter {} has {}",
            to_string(opt.type), new_rank, i + 1, detail::peft_max_rank(*adapters[i]));
  } else {
    for (auto* a : adapters) new_rank = std::max(new_rank, detail::peft_max_rank(*a));
    if (opt.rank > 0) new_rank = opt.rank;
  }
  opt.rank = new_rank;
  std::set<std::string> names;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const auto* a = adapters[i];
    for (const auto& m : a->modules) {
      if (m.is_dora()) lora::detail::fail("combine: module '{}' is DoRA; combining DoRA adapters is not supported", m.name);
      // add_weighted_adapter combines lora_A/lora_B only: a bias, whole tensors or token rows
      // would be dropped from the result, so they are refused rather than lost.
      if (m.lora_bias)
        lora::detail::fail("combine: adapter {} module '{}' has a lora_B.bias (lora_bias = true); PEFT's "
                           "add_weighted_adapter combines only lora_A and lora_B, so the bias would be dropped: "
                           "not supported",
                           i + 1, m.name);
      names.insert(m.name);
    }
    if (!a->saved.empty())
      lora::detail::fail("combine: adapter {} carries {} whole tensor(s) (modules_to_save copies or saved tables, "
                         "e.g. '{}'); add_weighted_adapter does not combine them and PEFT refuses a module saved by "
                         "more than one adapter: not supported (merge the adapters one after the other instead)",
                         i + 1, a->saved.size(), a->saved.front().key);
    if (!a->trainable_tokens.empty())
      lora::detail::fail("combine: adapter {} carries trainable token rows for '{}'; add_weighted_adapter does not "
                         "combine them: not supported (merge the adapters one after the other instead)",
                         i + 1, a->trainable_tokens.front().module);
  }
  io::PeftAdapter out;
  out.config = adapters[0]->config;
  out.config.r = static_cast<int>(new_rank);
  out.config.lora_alpha = static_cast<double>(new_rank);
  out.config.use_dora = false;
  out.config.rank_pattern.clear();
  out.config.alpha_pattern.clear();
  const dynamic_scaling policy = adapters[0]->config.scaling_policy();
  const double new_scaling = policy.factor(static_cast<double>(new_rank), static_cast<int>(new_rank));  // alpha = r
  std::set<std::string> targets;
  bool lists = true;
  for (auto* a : adapters) {
    if (a->config.target_modules_regex) lists = false;
    targets.insert(a->config.target_modules.begin(), a->config.target_modules.end());
  }
  if (lists) {
    out.config.target_modules.assign(targets.begin(), targets.end());
    out.config.target_modules_regex.reset();
  } else {
    std::string re;
    for (auto* a : adapters) {
      std::string one = a->config.target_modules_regex.value_or("");
      if (one.empty())
        for (const auto& t : a->config.target_modules) one += (one.empty() ? "" : "|") + std::string("(.*\\.)?") + t;
      re += (re.empty() ? "" : "|") + std::string("(") + one + ")";
    }
    out.config.target_modules_regex = re;
    out.config.target_modules.clear();
  }
  std::size_t module_index = 0;
  for (const auto& name : names) {
    std::vector<WeightedFactors> in;
    std::vector<std::size_t> which;
    const io::PeftModule* first = nullptr;
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const io::PeftModule* m = adapters[i]->find(name);
      if (!m) continue;
      if (!first) first = m;
      which.push_back(i);
      in.push_back({m->adapter.B().cast<double>(), m->adapter.A().cast<double>(), m->adapter.scaling(), weights[i]});
    }
    CombineOptions mo = opt;
    mo.seed = opt.seed + 0x9e3779b97f4a7c15ULL * ++module_index;  // independent draws per module
    Factors f;
    try {
      f = combine(in, mo, new_scaling, name, &which);
    } catch (const lora::error& e) {
      lora::detail::fail("module '{}': {}", name, e.what());
    }
    AdapterOptions opts;
    opts.fan_in_fan_out = first->adapter.fan_in_fan_out();
    opts.name = name;
    io::PeftModule mod{name,
                       LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                           f.A.cast<float>(), f.B.cast<float>(), static_cast<double>(new_rank), opts,
                           policy),
                       first->stored_dtype};
    mod.kind = first->kind;
    out.modules.push_back(std::move(mod));
    if (opt.on_module) opt.on_module(module_index, names.size(), name);
  }
  return out;
}

/// The same with default options for `type` (svd_rank: the SVD types' rank, 0 the largest r).
template <class = void>
inline io::PeftAdapter combine_adapters(const std::vector<const io::PeftAdapter*>& adapters,
                                        const std::vector<double>& weights, combination_type type, Index svd_rank = 0) {
  CombineOptions opt;
  opt.type = type;
  opt.rank = svd_rank;
  return combine_adapters(adapters, weights, opt);
}

}  // namespace lora::analysis
