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
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

namespace lora::analysis {

enum class combination_type { svd, cat, linear };

inline std::string_view to_string(combination_type t) {
  switch (t) {
    case combination_type::svd: return "svd";
    case combination_type::cat: return "cat";
    case combination_type::linear: return "linear";
  }
  return "?";
}
inline combination_type parse_combination_type(std::string_view s) {
  if (s == "svd") return combination_type::svd;
  if (s == "cat") return combination_type::cat;
  if (s == "linear") return combination_type::linear;
  lora::detail::fail("combination type must be svd, cat or linear, got '{}'", s);
}

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

/// Dispatch on the type; new_rank is used by svd and cat.
template <class = void>
inline Factors combine(const std::vector<WeightedFactors>& in, combination_type type, Index new_rank) {
  switch (type) {
    case combination_type::svd: return combine_svd(in, new_rank);
    case combination_type::cat: return combine_cat(in, new_rank);
    case combination_type::linear: return combine_linear(in);
  }
  lora::detail::fail("combine: unknown combination type");
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
/// the common r (linear), Σ r (cat) or svd_rank (svd; 0: the largest r); the new
/// config is the first adapter's with r = lora_alpha = new rank, use_rslora = false
/// and no patterns, so every new module has scaling 1.
template <class = void>
inline io::PeftAdapter combine_adapters(const std::vector<const io::PeftAdapter*>& adapters,
                                        const std::vector<double>& weights, combination_type type, Index svd_rank = 0) {
  if (adapters.empty()) lora::detail::fail("combine: no adapters given");
  if (weights.size() != adapters.size())
    lora::detail::fail("combine: {} adapters but {} weights; give one weight per adapter", adapters.size(),
                       weights.size());
  if (adapters.size() == 1) type = combination_type::linear;  // as PEFT
  Index new_rank = 0;
  switch (type) {
    case combination_type::linear:
      new_rank = detail::peft_max_rank(*adapters[0]);
      for (std::size_t i = 1; i < adapters.size(); ++i)
        if (detail::peft_max_rank(*adapters[i]) != new_rank)
          lora::detail::fail("combine (linear): all adapters must have the same r; adapter 1 has r = {}, adapter {} has {}",
                             new_rank, i + 1, detail::peft_max_rank(*adapters[i]));
      break;
    case combination_type::cat:
      for (auto* a : adapters) new_rank += detail::peft_max_rank(*a);
      break;
    case combination_type::svd:
      if (svd_rank < 0) lora::detail::fail("combine (svd): rank must be ≥ 1, got {}", svd_rank);
      for (auto* a : adapters) new_rank = std::max(new_rank, detail::peft_max_rank(*a));
      if (svd_rank > 0) new_rank = svd_rank;
      break;
  }
  std::set<std::string> names;
  for (auto* a : adapters) {
    for (const auto& m : a->modules) {
      if (m.is_dora()) lora::detail::fail("combine: module '{}' is DoRA; combining DoRA adapters is not supported", m.name);
      names.insert(m.name);
    }
  }
  io::PeftAdapter out;
  out.config = adapters[0]->config;
  out.config.r = static_cast<int>(new_rank);
  out.config.lora_alpha = static_cast<double>(new_rank);
  out.config.use_rslora = false;
  out.config.use_dora = false;
  out.config.rank_pattern.clear();
  out.config.alpha_pattern.clear();
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
  for (const auto& name : names) {
    std::vector<WeightedFactors> in;
    const io::PeftModule* first = nullptr;
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const io::PeftModule* m = adapters[i]->find(name);
      if (!m) continue;
      if (!first) first = m;
      in.push_back({m->adapter.B().cast<double>(), m->adapter.A().cast<double>(), m->adapter.scaling(), weights[i]});
    }
    Factors f;
    try {
      f = combine(in, type, new_rank);
    } catch (const lora::error& e) {
      lora::detail::fail("module '{}': {}", name, e.what());
    }
    AdapterOptions opts;
    opts.fan_in_fan_out = first->adapter.fan_in_fan_out();
    opts.name = name;
    out.modules.push_back(io::PeftModule{name,
                                         LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                                             f.A.cast<float>(), f.B.cast<float>(), static_cast<double>(new_rank), opts,
                                             dynamic_scaling{false}),
                                         std::nullopt, first->stored_dtype});
  }
  return out;
}

}  // namespace lora::analysis
