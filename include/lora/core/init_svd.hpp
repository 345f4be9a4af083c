#pragma once
// Initialisers that read the base weight W and move part of it into the adapter,
// as PEFT's pissa_init and olora_init do (init_lora_weights = "pissa", "pissa_niter_k",
// "olora"). The base weight becomes the residual W − s·B·A, so the adapted layer starts
// out equal to the original one.
//
// Compile time: the non-template functions here are `template <class = void>`, so the
// decompositions (and JSON code) they use are compiled only in files that call them, not in
// every file that includes this header (docs/reliability.md, "Sanitizers").

#include <lora/core/random.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <optional>

namespace lora {

/// Factors and residual of an SVD/QR initialisation (float64 before rounding to S).
template <class S>
struct SvdInit {
  Matrix<S> A;         ///< [r × in]
  Matrix<S> B;         ///< [out × r]
  Matrix<S> residual;  ///< W − s·B·A, in W's orientation
};

namespace detail {
using MatD = Matrix<double>;

// Thin QR, Q only, with LAPACK's Householder sign convention (as torch.linalg.qr).
template <class = void>
inline MatD thin_q(const MatD& X) {
  Eigen::HouseholderQR<MatD> qr(X);
  return qr.householderQ() * MatD::Identity(X.rows(), std::min(X.rows(), X.cols()));
}

struct LowRankSvd {
  MatD U;          // [m × q]
  Eigen::VectorXd S;  // [q]
  MatD V;          // [n × q]
};

// torch.svd_lowrank(A, q, niter) (Halko et al. 2011, algorithm 4.4): a Gaussian sketch
// A·Ω, niter power iterations with re-orthogonalisation, then the SVD of Qᵀ·A.
template <class = void>
inline LowRankSvd svd_lowrank(const MatD& A0, Index q, int niter, Generator& gen) {
  const bool tall = A0.rows() >= A0.cols();
  const MatD A = tall ? A0 : MatD(A0.transpose());
  MatD R(A.cols(), q);
  for (Index i = 0; i < R.size(); ++i) R.data()[i] = gen.normal();
  MatD Q = thin_q(A * R);
  for (int i = 0; i < niter; ++i) {
    Q = thin_q(A.transpose() * Q);
    Q = thin_q(A * Q);
  }
  const MatD Bm = Q.transpose() * A;
  Eigen::JacobiSVD<MatD> svd(Bm, Eigen::ComputeThinU | Eigen::ComputeThinV);
  LowRankSvd out;
  out.S = svd.singularValues();
  MatD U = Q * svd.matrixU();
  MatD V = svd.matrixV();
  if (tall) {
    out.U = std::move(U);
    out.V = std::move(V);
  } else {
    out.U = std::move(V);
    out.V = std::move(U);
  }
  return out;
}

template <class S>
SvdInit<S> finish_init(const MatD& W, const MatD& A, const MatD& B, double scaling) {
  SvdInit<S> out;
  out.A = A.cast<S>();
  out.B = B.cast<S>();
  // The residual is taken against the rounded factors, so residual + s·B·A reproduces W
  // as closely as the storage type allows.
  const MatD delta = scaling * (out.B.template cast<double>() * out.A.template cast<double>());
  out.residual = (W - delta).cast<S>();
  return out;
}

inline void check_init_rank(const char* who, Index r, Index out, Index in) {
  if (r < 1 || r > std::min(out, in))
    detail::fail("{}: rank r = {} must be in [1, min(out, in)] = [1, {}] for a [{} x {}] weight", who, r,
                 std::min(out, in), out, in);
}
}  // namespace detail

/// PiSSA (Meng et al. 2024; PEFT's init_lora_weights="pissa"): with W = U·Σ·Vᵀ ([out × in]),
/// A = diag(√(σ₁..ᵣ/s))·V₁..ᵣᵀ, B = U₁..ᵣ·diag(√(σ₁..ᵣ/s)), residual = W − s·B·A. `niter` ≥ 0 uses
/// torch.svd_lowrank's randomised SVD with that many power iterations ("pissa_niter_k"), drawn from gen.
/// Signs of singular-vector pairs are arbitrary (LAPACK's may differ from ours).
template <class S>
SvdInit<S> pissa_factors(const MatrixRef<S>& W, Index r, double scaling, std::optional<int> niter = std::nullopt,
                         Generator* gen = nullptr) {
  detail::check_init_rank("pissa", r, W.rows(), W.cols());
  if (!(scaling > 0) || !std::isfinite(scaling))
    detail::fail("pissa: scaling must be positive and finite, got {}", scaling);
  const detail::MatD Wd = W.template cast<double>();
  detail::MatD Ur, Vr;
  Eigen::VectorXd sr;
  if (!niter) {
    Eigen::BDCSVD<detail::MatD> svd(Wd, Eigen::ComputeThinU | Eigen::ComputeThinV);
    Ur = svd.matrixU().leftCols(r);
    Vr = svd.matrixV().leftCols(r);
    sr = svd.singularValues().head(r);
  } else {
    if (*niter < 0) detail::fail("pissa: niter must be >= 0, got {}", *niter);
    if (!gen) detail::fail("pissa: the randomised SVD (niter = {}) needs a Generator", *niter);
    auto low = detail::svd_lowrank(Wd, r, *niter, *gen);
    Ur = low.U;
    Vr = low.V;
    sr = low.S;
  }
  const Eigen::VectorXd root = (sr / scaling).cwiseSqrt();
  const detail::MatD A = root.asDiagonal() * Vr.transpose();
  const detail::MatD B = Ur * root.asDiagonal();
  return detail::finish_init<S>(Wd, A, B, scaling);
}

/// OLoRA (Büyükakyüz 2024; PEFT's init_lora_weights="olora"): with the thin QR W = Q·R
/// (Householder, R's diagonal signs as LAPACK), B = Q[:, :r], A = R[:r, :], residual = W − s·B·A.
template <class S>
SvdInit<S> olora_factors(const MatrixRef<S>& W, Index r, double scaling) {
  detail::check_init_rank("olora", r, W.rows(), W.cols());
  if (!std::isfinite(scaling)) detail::fail("olora: scaling must be finite, got {}", scaling);
  const detail::MatD Wd = W.template cast<double>();
  Eigen::HouseholderQR<detail::MatD> qr(Wd);
  const Index k = std::min(Wd.rows(), Wd.cols());
  const detail::MatD Q = qr.householderQ() * detail::MatD::Identity(Wd.rows(), k);
  const detail::MatD R = qr.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
  return detail::finish_init<S>(Wd, R.topRows(r), Q.leftCols(r), scaling);
}

/// Sets the adapter's A and B by PiSSA and replaces W (the base weight, [out × in], or
/// [in × out] with fan_in_fan_out) by the residual, using the adapter's scaling().
///
///   lora::initialize_pissa(adapter, W);  // adapter.apply(W, X) is unchanged up to rounding
template <class Adapter>
void initialize_pissa(Adapter& ad, Eigen::Ref<typename Adapter::matrix> W, std::optional<int> niter = std::nullopt,
                      Generator* gen = nullptr) {
  using S = typename Adapter::scalar_type;
  const bool t = ad.fan_in_fan_out();
  const Index rows = t ? ad.in_features() : ad.out_features(), cols = t ? ad.out_features() : ad.in_features();
  if (W.rows() != rows || W.cols() != cols)
    detail::fail("pissa: base weight W has shape [{} x {}], expected [{} x {}]", W.rows(), W.cols(), rows, cols);
  const Matrix<S> Wo = t ? Matrix<S>(W.transpose()) : Matrix<S>(W);
  auto f = pissa_factors<S>(Wo, ad.rank(), ad.scaling(), niter, gen);
  ad.set_A(f.A);
  ad.set_B(f.B);
  if (t)
    W = f.residual.transpose();
  else
    W = f.residual;
}

/// Sets A and B by OLoRA and replaces W by the residual (PEFT's olora_init; no fan_in_fan_out).
template <class Adapter>
void initialize_olora(Adapter& ad, Eigen::Ref<typename Adapter::matrix> W) {
  using S = typename Adapter::scalar_type;
  if (ad.fan_in_fan_out()) detail::fail("olora: fan_in_fan_out weights are not supported (PEFT's olora_init neither)");
  if (W.rows() != ad.out_features() || W.cols() != ad.in_features())
    detail::fail("olora: base weight W has shape [{} x {}], expected [{} x {}]", W.rows(), W.cols(), ad.out_features(),
                 ad.in_features());
  auto f = olora_factors<S>(Matrix<S>(W), ad.rank(), ad.scaling());
  ad.set_A(f.A);
  ad.set_B(f.B);
  W = f.residual;
}

}  // namespace lora
