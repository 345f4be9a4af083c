#pragma once
// Randomized SVD (Halko, Martinsson & Tropp 2011) and intruder dimensions
// (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
// Equivalence"): top singular vectors of W + ΔW that resemble none of W's.
//
// Compile time: the non-template functions here are `template <class = void>`, so the
// decompositions (and JSON code) they use are compiled only in files that call them, not in
// every file that includes this header (docs/reliability.md, "Sanitizers").

#include <lora/analysis/compress.hpp>
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/core/random.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <vector>

namespace lora::analysis {

/// Options of randomized_svd.
struct RandomizedSVDOptions {
  Index oversample = 10;   ///< extra random directions beyond k
  int power_iterations = 2;  ///< (M·Mᵀ)^q sharpens a slowly decaying spectrum
  std::uint64_t seed = 0x5eed;
};

namespace detail {
template <class = void>
inline Eigen::MatrixXd orthonormal_basis(const Eigen::MatrixXd& Y) {
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(Y);
  return qr.householderQ() * Eigen::MatrixXd::Identity(Y.rows(), std::min(Y.rows(), Y.cols()));
}
}  // namespace detail

/// Top-k thin SVD of an operator M [rows × cols] given by apply(X) = M·X and
/// apply_t(Y) = Mᵀ·Y on column blocks: Y = (M·Mᵀ)^q·M·Ω with Gaussian Ω
/// [cols × (k + p)], Q = orth(Y), then the exact SVD of the small Qᵀ·M.
template <class Apply, class ApplyT>
LowRankSVD<double> randomized_svd(Index rows, Index cols, Apply&& apply, ApplyT&& apply_t, Index k,
                                  const RandomizedSVDOptions& opt = {}) {
  const Index full = std::min(rows, cols);
  if (k < 1 || k > full) lora::detail::fail("randomized_svd: k = {} outside [1, {}]", k, full);
  const Index l = std::min(full, k + std::max<Index>(opt.oversample, 0));
  Generator gen(opt.seed);
  Eigen::MatrixXd omega(cols, l);
  for (Index j = 0; j < l; ++j)
    for (Index i = 0; i < cols; ++i) omega(i, j) = gen.normal(0.0, 1.0);
  Eigen::MatrixXd Q = detail::orthonormal_basis(apply(omega));
  for (int q = 0; q < opt.power_iterations; ++q) {
    const Eigen::MatrixXd Z = detail::orthonormal_basis(apply_t(Q));
    Q = detail::orthonormal_basis(apply(Z));
  }
  const Eigen::MatrixXd Bt = apply_t(Q);  // Mᵀ·Q = (Qᵀ·M)ᵀ, cols × l
  Eigen::BDCSVD<Eigen::MatrixXd> svd(Bt, Eigen::ComputeThinU | Eigen::ComputeThinV);
  LowRankSVD<double> r;
  r.singular_values = svd.singularValues().head(k);
  r.V = svd.matrixU().leftCols(k);
  r.U = Q * svd.matrixV().leftCols(k);
  return r;
}

/// Top-k randomized SVD of a dense matrix W.
template <class Derived>
LowRankSVD<double> randomized_svd(const Eigen::MatrixBase<Derived>& W, Index k, const RandomizedSVDOptions& opt = {}) {
  const Eigen::MatrixXd Wd = W.template cast<double>();
  return randomized_svd(
      Wd.rows(), Wd.cols(), [&](const Eigen::MatrixXd& X) -> Eigen::MatrixXd { return Wd * X; },
      [&](const Eigen::MatrixXd& Y) -> Eigen::MatrixXd { return Wd.transpose() * Y; }, k, opt);
}

/// Options of intruder_dimensions.
struct IntruderOptions {
  Index top_k = 10;       ///< singular vectors of W + ΔW that are checked
  Index base_rank = 128;  ///< top singular vectors of W they are compared with (clamped; ≤ 0: all, dense SVD)
  double epsilon = 0.5;   ///< an intruder's largest |cos| with W's vectors is below this
  RandomizedSVDOptions svd = {};
};

/// The result for one module.
struct IntruderReport {
  std::vector<Index> intruders;      ///< indices j (0-based, by singular value of W + ΔW) that are intruders
  Eigen::VectorXd max_cosine;        ///< max_i |u'_jᵀ·u_i| for each checked j
  Eigen::VectorXd singular_values;   ///< σ_j of W + ΔW for the checked j
  Index checked = 0, base_rank = 0;
  double epsilon = 0;
};

namespace detail {
/// The two SVDs intruder detection needs: W's top base_rank left singular vectors
/// (base_rank = min(out, in): a dense SVD, as PEFT) and W + s·B·A's top k (randomized,
/// ΔW applied as s·B·(A·X)), and the report built from them.
template <class DW, class DB, class DA>
std::pair<IntruderReport, LowRankSVD<double>> intruder_svds(const Eigen::MatrixBase<DW>& W,
                                                             const Eigen::MatrixBase<DB>& B,
                                                             const Eigen::MatrixBase<DA>& A, double scaling,
                                                             const IntruderOptions& opt) {
  if (W.rows() != B.rows() || W.cols() != A.cols() || B.cols() != A.rows())
    lora::detail::fail("intruder_dimensions: base weight is [{} x {}] but ΔW = B·A is [{} x {}] (B [{} x {}], A [{} x {}])",
                       W.rows(), W.cols(), B.rows(), A.cols(), B.rows(), B.cols(), A.rows(), A.cols());
  if (!(opt.epsilon > 0.0 && opt.epsilon <= 1.0))
    lora::detail::fail("intruder_dimensions: epsilon must be in (0, 1], got {}", opt.epsilon);
  const Index full = std::min(W.rows(), W.cols());
  const Index k = std::clamp<Index>(opt.top_k, 1, full);
  const Index m = opt.base_rank <= 0 ? full : std::clamp<Index>(opt.base_rank, 1, full);
  const Eigen::MatrixXd Wd = W.template cast<double>();
  const Eigen::MatrixXd Bd = B.template cast<double>();
  const Eigen::MatrixXd Ad = A.template cast<double>();
  Eigen::MatrixXd Ubase;
  if (m == full) {
    Eigen::BDCSVD<Eigen::MatrixXd> svd(Wd, Eigen::ComputeThinU);
    Ubase = svd.matrixU();
  } else {
    Ubase = randomized_svd(Wd, m, opt.svd).U;
  }
  LowRankSVD<double> tuned = randomized_svd(
      Wd.rows(), Wd.cols(),
      [&](const Eigen::MatrixXd& X) -> Eigen::MatrixXd {
        Eigen::MatrixXd Y = Wd * X;
        Y.noalias() += scaling * (Bd * (Ad * X));
        return Y;
      },
      [&](const Eigen::MatrixXd& Y) -> Eigen::MatrixXd {
        Eigen::MatrixXd X = Wd.transpose() * Y;
        X.noalias() += scaling * (Ad.transpose() * (Bd.transpose() * Y));
        return X;
      },
      k, opt.svd);
  IntruderReport rep;
  rep.checked = k;
  rep.base_rank = m;
  rep.epsilon = opt.epsilon;
  rep.singular_values = tuned.singular_values;
  rep.max_cosine = (tuned.U.transpose() * Ubase).cwiseAbs().rowwise().maxCoeff();
  for (Index j = 0; j < k; ++j)
    if (rep.max_cosine(j) < opt.epsilon) rep.intruders.push_back(j);
  return {std::move(rep), std::move(tuned)};
}
}  // namespace detail

/// Intruder dimensions of W + s·B·A: left singular vectors u'_j (j < top_k) of
/// the fine-tuned W + ΔW whose largest |cosine| with W's top base_rank left
/// singular vectors u_i is below ε (base_rank ≤ 0: all of them, by a dense SVD of W,
/// as PEFT). The SVD of W + ΔW is randomized; ΔW is applied as s·B·(A·X), never formed.
template <class DW, class DB, class DA>
IntruderReport intruder_dimensions(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DB>& B,
                                   const Eigen::MatrixBase<DA>& A, double scaling, const IntruderOptions& opt = {}) {
  return detail::intruder_svds(W, B, A, scaling, opt).first;
}

/// Options of reduce_intruder_dimension (PEFT's defaults: top_k 10, ε 0.5, λ 0.75, every
/// left singular vector of W compared).
struct IntruderMitigationOptions {
  IntruderOptions detect{.top_k = 10, .base_rank = 0, .epsilon = 0.5, .svd = {.oversample = 10, .power_iterations = 4, .seed = 0x5eed}};
  double lambda = 0.75;  ///< the fraction of each intruder direction that is kept
};

/// A module after mitigation: factors for the module's own scaling s and rank r.
struct MitigatedModule {
  Factors factors;  ///< s·B·A = best rank-r of ΔW + (λ − 1)·Σ_{j ∈ I} σ'_j·u'_j·v'_jᵀ
  IntruderReport report;
  bool changed = false;  ///< false: no intruders, factors are the input's
};

/// PEFT's reduce_intruder_dimension on one module: with u'_j, σ'_j, v'_j the intruders of
/// W + ΔW (intruder_dimensions), ΔW' = ΔW + (λ − 1)·Σ_{j∈I} σ'_j·u'_j·v'_jᵀ, stored as the
/// rank-r truncation of ΔW'/s split B = U·√Σ, A = √Σ·Vᵀ. PEFT takes three dense SVDs
/// (W, W + ΔW, ΔW'); here W + ΔW's top-k is randomized and ΔW' — rank ≤ r + |I| — has
/// its SVD from factors (lowrank_svd), exact. Without intruders the factors are returned as given.
template <class DW, class DB, class DA>
MitigatedModule reduce_intruder_dimension(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<DB>& B,
                                          const Eigen::MatrixBase<DA>& A, double scaling,
                                          const IntruderMitigationOptions& opt = {}) {
  if (!(std::isfinite(scaling) && scaling != 0.0))
    lora::detail::fail("reduce_intruder_dimension: scaling must be finite and non-zero, got {}", scaling);
  auto [rep, tuned] = detail::intruder_svds(W, B, A, scaling, opt.detect);
  MitigatedModule out;
  out.report = std::move(rep);
  const Index r = A.rows();
  if (out.report.intruders.empty()) {
    out.factors.B = B.template cast<double>();
    out.factors.A = A.template cast<double>();
    return out;
  }
  const Index ni = static_cast<Index>(out.report.intruders.size());
  // ΔW'/s = [B, (λ−1)/s·U_I·Σ_I]·[A; V_Iᵀ]
  Eigen::MatrixXd P(B.rows(), r + ni), Q(r + ni, A.cols());
  P.leftCols(r) = B.template cast<double>();
  Q.topRows(r) = A.template cast<double>();
  for (Index t = 0; t < ni; ++t) {
    const Index j = out.report.intruders[static_cast<std::size_t>(t)];
    P.col(r + t) = (opt.lambda - 1.0) / scaling * tuned.singular_values(j) * tuned.U.col(j);
    Q.row(r + t) = tuned.V.col(j).transpose();
  }
  out.factors = factors_from_svd(lowrank_svd(P, Q, 1.0), 1.0, r);
  out.changed = true;
  return out;
}

}  // namespace lora::analysis

// ---- whole PEFT adapters -----------------------------------------------------
#include <lora/io/checkpoint.hpp>
#include <lora/io/peft.hpp>

#include <functional>
#include <string>

namespace lora::analysis {

/// One module's outcome in reduce_intruder_dimension_adapter.
struct NamedMitigation {
  std::string name;
  IntruderReport report;
  bool changed = false;
};

/// PEFT's reduce_intruder_dimension on a whole adapter: every module's base weight
/// `<name>.weight` is read from `base` (float dtypes), each module is mitigated as above and
/// keeps its rank, alpha and config; modules without intruders are copied. Plain linear LoRA
/// modules only (DoRA and embedding modules are refused, naming the module).
template <class = void>
inline io::PeftAdapter reduce_intruder_dimension_adapter(const io::PeftAdapter& adapter, const io::Checkpoint& base,
                                                         const IntruderMitigationOptions& opt = {},
                                                         std::vector<NamedMitigation>* report = nullptr,
                                                         const std::function<void(const NamedMitigation&)>& progress = {}) {
  io::require_modules_only(adapter, "intruder-dimension reduction");
  io::PeftAdapter out = adapter;
  for (auto& m : out.modules) {
    if (m.is_dora() || m.is_embedding())
      lora::detail::fail("reduce_intruder_dimension: module '{}' is {}; only plain linear LoRA modules are supported",
                         m.name, m.is_dora() ? "DoRA" : "an embedding LoRA");
    const std::string key = m.name + ".weight";
    if (!base.contains(key))
      lora::detail::fail("reduce_intruder_dimension: base checkpoint {} has no '{}' for module '{}'",
                         base.path().string(), key, m.name);
    const Matrix<double> W = base.tensor(key).to_matrix<double>();
    const auto& a = m.adapter;
    Matrix<double> B = a.B().template cast<double>(), A = a.A().template cast<double>();
    if (a.fan_in_fan_out()) lora::detail::fail("reduce_intruder_dimension: module '{}' is fan_in_fan_out; not supported", m.name);
    MitigatedModule r;
    try {
      r = reduce_intruder_dimension(W, B, A, a.scaling(), opt);
    } catch (const lora::error& e) {
      lora::detail::fail("module '{}': {}", m.name, e.what());
    }
    if (r.changed) {
      AdapterOptions ao;
      ao.name = m.name;
      ao.dropout = a.dropout();
      m.adapter = LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
          r.factors.A.cast<float>(), r.factors.B.cast<float>(), a.alpha(), ao, a.policy());
    }
    NamedMitigation nm{m.name, std::move(r.report), r.changed};
    if (progress) progress(nm);
    if (report) report->push_back(std::move(nm));
  }
  return out;
}

}  // namespace lora::analysis
