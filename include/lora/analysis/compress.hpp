#pragma once
// Compression of a LoRA module to its best rank-k approximation
// (Eckart–Young): the top-k part of the exact thin SVD of s·B·A.
//
// Compile time: the non-template functions here are `template <class = void>`, so the
// decompositions (and JSON code) they use are compiled only in files that call them, not in
// every file that includes this header (docs/reliability.md, "Sanitizers").

#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/metrics.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <cmath>
#include <functional>

namespace lora::analysis {

/// LoRA factors B [out × k], A [k × in] meant to be used with a known scaling s:
/// ΔW = s·B·A.
struct Factors {
  Matrix<double> B;
  Matrix<double> A;
  Index rank() const { return A.rows(); }
};

/// Splits a thin SVD into balanced factors for a target scaling s_new:
/// B = U·diag(√σ)/√|s_new|, A = sign(s_new)·diag(√σ)·Vᵀ/√|s_new|, so
/// s_new·B·A = U·diag(σ)·Vᵀ. Zero columns pad the result up to `rank`
/// (when the spectrum has fewer values than the rank asked for).
template <class = void>
inline Factors factors_from_svd(const LowRankSVD<double>& svd, double new_scaling, Index rank = -1) {
  if (!(std::isfinite(new_scaling) && new_scaling != 0.0))
    lora::detail::fail("factors_from_svd: the new scaling must be finite and non-zero, got {}", new_scaling);
  const Index p = svd.size();
  if (rank < 0) rank = p;
  const Index k = std::min(rank, p);
  const double c = 1.0 / std::sqrt(std::abs(new_scaling));
  const double sign = new_scaling < 0 ? -1.0 : 1.0;
  Factors f;
  f.B = Matrix<double>::Zero(svd.U.rows(), rank);
  f.A = Matrix<double>::Zero(rank, svd.V.rows());
  const Eigen::VectorXd root = svd.singular_values.head(k).cwiseSqrt() * c;
  f.B.leftCols(k) = svd.U.leftCols(k) * root.asDiagonal();
  f.A.topRows(k) = sign * (root.asDiagonal() * svd.V.leftCols(k).transpose());
  return f;
}

/// The best rank-k approximation of s·B·A in Frobenius and spectral norm
/// (Eckart–Young), as factors for a new scaling s_new: s_new·B'·A' = U_k·Σ_k·V_kᵀ.
/// The error is ‖s·B·A − s_new·B'·A'‖_F = sqrt(Σ_{i>k} σ_i²).
template <class DB, class DA>
Factors best_rank_k(const Eigen::MatrixBase<DB>& B, const Eigen::MatrixBase<DA>& A, double scaling, Index k,
                    double new_scaling) {
  if (k < 1 || k > B.cols())
    lora::detail::fail("best_rank_k: rank k = {} outside [1, r = {}]", k, B.cols());
  return factors_from_svd(lowrank_svd(B, A, scaling), new_scaling, k);
}

/// How a compression picks k for a module.
struct CompressionTarget {
  Index rank = 0;       ///< fixed k (used when > 0), clamped to the module's r
  double energy = 0.0;  ///< otherwise the smallest k keeping this fraction of Σσ² (energy_rank)

  /// k for a module of rank r with spectrum sigma.
  Index rank_for(const Vector<double>& sigma, Index r) const {
    if (rank > 0) return std::min(rank, r);
    if (!(energy > 0.0 && energy <= 1.0))
      lora::detail::fail("compression target: give a rank ≥ 1 or an energy in (0, 1]; got rank {} and energy {}", rank,
                         energy);
    return std::clamp<Index>(energy_rank(sigma, energy), 1, r);
  }
};

}  // namespace lora::analysis

// ---- whole PEFT adapters -----------------------------------------------------
#include <lora/io/peft.hpp>

#include <map>

namespace lora::analysis {

/// The adapter with every module replaced by its best rank-k approximation
/// (k from `target` per module), alpha kept, so that each new module's scaling
/// s' = policy(alpha, k) times its new factors equals U_k·Σ_k·V_kᵀ of the old ΔW.
/// The config's r becomes the most common k; save_peft_adapter writes the rest as
/// rank_pattern. DoRA magnitudes, embedding LoRA and lora_B biases stay with their modules;
/// whole tensors (modules_to_save copies, saved tables) and trainable-token rows are not
/// low-rank and are carried over unchanged, as PEFT would load them. `on_module(done, total, name)`, if
/// given, is called after each module (progress reports on big adapters).
template <class = void>
inline io::PeftAdapter compress_adapter(
    const io::PeftAdapter& in, const CompressionTarget& target,
    const std::function<void(std::size_t, std::size_t, const std::string&)>& on_module = {}) {
  io::require_modules_only(in, "compress");
  io::PeftAdapter out;
  out.config = in.config;
  out.config.rank_pattern.clear();
  out.saved = in.saved;
  out.trainable_tokens = in.trainable_tokens;
  std::map<Index, int> count;
  for (const auto& m : in.modules) {
    const auto& a = m.adapter;
    const LowRankSVD<double> svd = lowrank_svd(a.B(), a.A(), a.scaling());
    const Index k = target.rank_for(svd.singular_values, a.rank());
    const double alpha = a.alpha() * a.multiplier();
    const double s_new = a.policy().factor(alpha, static_cast<int>(k));
    const Factors f = factors_from_svd(svd, s_new, k);
    AdapterOptions opts;
    opts.fan_in_fan_out = a.fan_in_fan_out();
    opts.dropout = a.dropout();
    opts.name = m.name;
    out.modules.push_back(io::PeftModule{
        m.name,
        a.with_lora(LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(f.A.cast<float>(), f.B.cast<float>(),
                                                                              alpha, opts, a.policy())),
        m.stored_dtype, m.kind, m.lora_bias});
    ++count[k];
    if (on_module) on_module(out.modules.size(), in.modules.size(), m.name);
  }
  Index best = 0;
  int n = -1;
  for (auto [k, c] : count)
    if (c > n) best = k, n = c;
  if (best > 0) out.config.r = static_cast<int>(best);
  return out;
}

}  // namespace lora::analysis
