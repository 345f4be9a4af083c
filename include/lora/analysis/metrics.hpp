#pragma once
// Spectral metrics of one ΔW from its singular values, and rank
// recommendations for a module and for a whole adapter.

#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace lora::analysis {

/// The energy thresholds reported when none are given.
inline const std::vector<double> default_energy_thresholds = {0.9, 0.99};

namespace detail {
inline void check_tau(double tau) {
  if (!(tau > 0.0 && tau <= 1.0)) lora::detail::fail("energy threshold must be in (0, 1], got {}", tau);
}
inline void check_sigma(const Vector<double>& s) {
  for (Index i = 0; i < s.size(); ++i) {
    if (!(s(i) >= 0.0) || !std::isfinite(s(i)))
      lora::detail::fail("singular values must be finite and ≥ 0; σ[{}] = {}", i, s(i));
    if (i > 0 && s(i) > s(i - 1) * (1 + 1e-12) + 1e-300)
      lora::detail::fail("singular values must be descending; σ[{}] = {} > σ[{}] = {}", i, s(i), i - 1, s(i - 1));
  }
}
}  // namespace detail

/// ‖ΔW‖_F = sqrt(Σ σ_i²).
inline double frobenius_norm(const Vector<double>& sigma) { return sigma.norm(); }

/// ‖ΔW‖_2 = σ₁.
inline double spectral_norm(const Vector<double>& sigma) { return sigma.size() ? sigma(0) : 0.0; }

/// Smallest k with Σ_{i≤k} σ_i² ≥ τ·Σ σ_i² (0 for ΔW = 0). τ in (0, 1].
/// Relative rounding of 1e-12 is forgiven so that τ = 1 gives the numerical support.
inline Index energy_rank(const Vector<double>& sigma, double tau) {
  detail::check_tau(tau);
  const double total = sigma.squaredNorm();
  if (total <= 0.0) return 0;
  double acc = 0.0;
  for (Index k = 0; k < sigma.size(); ++k) {
    acc += sigma(k) * sigma(k);
    if (acc >= tau * total * (1.0 - 1e-12)) return k + 1;
  }
  return sigma.size();
}

/// Fraction of Σσ² kept by the top k singular values.
inline double energy_kept(const Vector<double>& sigma, Index k) {
  const double total = sigma.squaredNorm();
  if (total <= 0.0) return 1.0;
  k = std::clamp<Index>(k, 0, sigma.size());
  return sigma.head(k).squaredNorm() / total;
}

/// Roy & Vetterli's effective rank exp(−Σ p_i·ln p_i), p_i = σ_i / Σσ (terms with
/// p_i = 0 count 0). 1 for a rank-one ΔW, k for k equal singular values; 0 for ΔW = 0.
inline double entropy_rank(const Vector<double>& sigma) {
  const double total = sigma.sum();
  if (total <= 0.0) return 0.0;
  double h = 0.0;
  for (Index i = 0; i < sigma.size(); ++i) {
    const double p = sigma(i) / total;
    if (p > 0.0) h -= p * std::log(p);
  }
  return std::exp(h);
}

/// Stable rank ‖ΔW‖_F² / ‖ΔW‖_2² (0 for ΔW = 0).
inline double stable_rank(const Vector<double>& sigma) {
  if (sigma.size() == 0 || sigma(0) <= 0.0) return 0.0;
  return sigma.squaredNorm() / (sigma(0) * sigma(0));
}

/// Number of σ_i > tol.
inline Index numerical_rank(const Vector<double>& sigma, double tol) {
  if (!(tol >= 0.0)) lora::detail::fail("numerical_rank: tolerance must be ≥ 0, got {}", tol);
  Index k = 0;
  for (Index i = 0; i < sigma.size(); ++i) k += sigma(i) > tol ? 1 : 0;
  return k;
}

/// numpy.linalg.matrix_rank's default tolerance for a ΔW of shape out × in
/// stored with machine epsilon eps: σ₁·max(out, in)·eps.
inline double default_rank_tolerance(const Vector<double>& sigma, Index out, Index in,
                                     double eps = std::numeric_limits<float>::epsilon()) {
  return spectral_norm(sigma) * static_cast<double>(std::max(out, in)) * eps;
}

/// Everything `lora inspect` reports about one module.
struct SpectrumMetrics {
  double frobenius_norm = 0;
  double spectral_norm = 0;
  double stable_rank = 0;
  double entropy_rank = 0;
  Index numerical_rank = 0;
  std::vector<double> thresholds;     ///< τ values
  std::vector<Index> energy_ranks;    ///< energy_rank(σ, τ) per threshold
};

/// All metrics of one ΔW [out × in] from its singular values.
inline SpectrumMetrics spectrum_metrics(const Vector<double>& sigma, Index out, Index in,
                                        const std::vector<double>& thresholds = default_energy_thresholds) {
  detail::check_sigma(sigma);
  SpectrumMetrics m;
  m.frobenius_norm = frobenius_norm(sigma);
  m.spectral_norm = spectral_norm(sigma);
  m.stable_rank = stable_rank(sigma);
  m.entropy_rank = entropy_rank(sigma);
  m.numerical_rank = numerical_rank(sigma, default_rank_tolerance(sigma, out, in));
  m.thresholds = thresholds;
  for (double t : thresholds) m.energy_ranks.push_back(energy_rank(sigma, t));
  return m;
}

/// A rank that keeps τ of the energy: per module, or uniform over an adapter.
struct RankRecommendation {
  double tau = 0.99;
  Index rank = 0;           ///< recommended r
  Index current_rank = 0;   ///< r of the adapter (largest r over modules)
  double energy_kept = 1;   ///< Σσ² kept over Σσ² of all modules with `rank` everywhere
  double min_module_energy = 1;  ///< smallest per-module fraction kept with `rank`
  Index parameters_now = 0;      ///< Σ (in + out)·r_m
  Index parameters_after = 0;    ///< Σ (in + out)·min(rank, r_m) (uniform rank)
  Index parameters_per_module = 0;  ///< Σ (in + out)·energy_rank_m(τ) (rank_pattern)
  std::string text;              ///< "r = 8 keeps 99% of the energy of this r = 64 adapter"
};

/// One module's spectrum as recommend_rank needs it.
struct ModuleSpectrum {
  Vector<double> sigma;
  Index out = 0, in = 0, rank = 0;
};

/// Recommendation for a whole adapter: the smallest uniform r such that every
/// module keeps at least τ of its energy (r = max over modules of energy_rank(σ_m, τ)),
/// with the total energy kept and the parameter counts of both ways to compress.
inline RankRecommendation recommend_rank(const std::vector<ModuleSpectrum>& modules, double tau) {
  detail::check_tau(tau);
  RankRecommendation rec;
  rec.tau = tau;
  for (const auto& m : modules) {
    rec.rank = std::max(rec.rank, energy_rank(m.sigma, tau));
    rec.current_rank = std::max(rec.current_rank, m.rank);
  }
  rec.rank = std::max<Index>(rec.rank, modules.empty() ? 0 : 1);
  double kept = 0, total = 0;
  for (const auto& m : modules) {
    kept += m.sigma.head(std::min(rec.rank, m.sigma.size())).squaredNorm();
    total += m.sigma.squaredNorm();
    rec.min_module_energy = std::min(rec.min_module_energy, energy_kept(m.sigma, rec.rank));
    rec.parameters_now += (m.in + m.out) * m.rank;
    rec.parameters_after += (m.in + m.out) * std::min(rec.rank, m.rank);
    rec.parameters_per_module += (m.in + m.out) * std::max<Index>(1, energy_rank(m.sigma, tau));
  }
  rec.energy_kept = total > 0 ? kept / total : 1.0;
  const std::string pct = fmt::format("{:g}%", tau * 100.0);
  if (rec.rank >= rec.current_rank)
    rec.text = fmt::format("every rank is needed: r = {} is the smallest rank that keeps {} of the energy of each module",
                           rec.current_rank, pct);
  else
    rec.text = fmt::format("r = {} keeps {} of the energy of this r = {} adapter (in every module; {:.2f}% overall); "
                           "{} instead of {} parameters",
                           rec.rank, pct, rec.current_rank, rec.energy_kept * 100.0, rec.parameters_after,
                           rec.parameters_now);
  return rec;
}

/// Recommendation for one module: energy_rank(σ, τ) of its r.
inline RankRecommendation recommend_rank(const ModuleSpectrum& m, double tau) { return recommend_rank(std::vector{m}, tau); }

}  // namespace lora::analysis
