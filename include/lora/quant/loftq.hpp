#pragma once
// LoftQ initialisation (Li et al. 2023; PEFT's init_lora_weights = "loftq"): alternate
// NF4 quantisation of the residual and a rank-r SVD of what it misses,
//
//   res₀ = W;  for t = 1..T:  Q_t = deq(NF4(res_{t-1})),  L_t·R_t = best rank-r of (W − Q_t),
//                             res_t = W − L_t·R_t
//
// so that Q_T + L_T·R_T ≈ W better than Q = deq(NF4(W)) alone (plain QLoRA, B = 0).
// PEFT then stores base := Q_T, lora_A := R_T, lora_B := L_T with L = U_r·√Σ_r,
// R = √Σ_r·V_rᵀ, NOT divided by the adapter's scaling alpha/r: for alpha ≠ r the
// model starts at Q_T + s·L·R, not at ≈ W. `divide_by_scaling` gives the intended start.
//
// Compile time: the non-template functions here are `template <class = void>` (see
// docs/reliability.md, "Sanitizers").

#include <lora/analysis/intruder.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/quant/nf4.hpp>

#include <Eigen/SVD>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lora::quant {

/// Options of loftq_init.
struct LoftQOptions {
  Index rank = 8;                 ///< r of the adapter
  int iterations = 1;             ///< PEFT's loftq_iter (1…5 in practice)
  std::int64_t blocksize = 64;    ///< NF4 block size (PEFT: bitsandbytes' default 64)
  double scaling = 1.0;           ///< the adapter's alpha/r (or alpha/√r), used by divide_by_scaling
  bool divide_by_scaling = false; ///< false: as PEFT (B·A = L·R); true: s·B·A = L·R
  bool randomized = false;        ///< top-r by randomized SVD (large weights) instead of a full SVD
  analysis::RandomizedSVDOptions svd = {.oversample = 16, .power_iterations = 4, .seed = 0x5eed};
};

/// The result for one weight W [out × in].
struct LoftQResult {
  Matrix<float> residual_weight;     ///< Q_T = deq(NF4(res_{T-1})), the new base weight
  std::vector<std::uint8_t> packed;  ///< its NF4 codes, row-major, two per byte (bitsandbytes' order)
  std::vector<float> absmax;         ///< one per block
  Matrix<float> A;                   ///< lora_A [r × in]
  Matrix<float> B;                   ///< lora_B [out × r]
  std::vector<double> error;         ///< ‖W − Q_t − L_t·R_t‖_F for t = 1..T
  std::vector<double> quant_error;   ///< ‖W − Q_t‖_F for t = 1..T (t = 1: plain QLoRA's error)
};

namespace detail {
template <class = void>
inline void nf4_round_trip(const Matrix<float>& x, std::int64_t bs, std::vector<std::uint8_t>& packed,
                           std::vector<float>& absmax, Matrix<float>& deq) {
  const std::int64_t n = x.size();
  packed.assign(static_cast<std::size_t>(packed_bytes(n)), 0);
  absmax.assign(static_cast<std::size_t>(num_blocks(n, bs)), 0.0f);
  nf4_quantize(x.data(), n, bs, packed.data(), absmax.data());
  deq.resize(x.rows(), x.cols());
  nf4_dequantize(packed.data(), absmax.data(), n, bs, deq.data());
}
}  // namespace detail

/// LoftQ on a float32 weight W [out × in], quantised with our bit-exact NF4
/// (bitsandbytes' blockwise rule, no double quantisation). The SVD is computed in
/// double; the residual res_t = W − L_t·R_t is rounded to float32 before quantising,
/// as PEFT's float32 tensors are.
template <class = void>
inline LoftQResult loftq_init(const Matrix<float>& W, const LoftQOptions& opt) {
  const Index full = std::min(W.rows(), W.cols());
  if (opt.rank < 1 || opt.rank > full)
    lora::detail::fail("loftq_init: rank {} outside [1, min(out, in) = {}] for a [{} x {}] weight", opt.rank, full,
                       W.rows(), W.cols());
  if (opt.iterations < 1) lora::detail::fail("loftq_init: loftq_iter must be ≥ 1, got {}", opt.iterations);
  if (opt.divide_by_scaling && !(std::isfinite(opt.scaling) && opt.scaling > 0))
    lora::detail::fail("loftq_init: scaling must be finite and > 0 to divide by it, got {}", opt.scaling);
  const Eigen::MatrixXd Wd = W.cast<double>();
  LoftQResult out;
  Matrix<float> res = W;
  Eigen::MatrixXd L, R;
  for (int t = 0; t < opt.iterations; ++t) {
    detail::nf4_round_trip(res, opt.blocksize, out.packed, out.absmax, out.residual_weight);
    const Eigen::MatrixXd E = Wd - out.residual_weight.cast<double>();
    analysis::LowRankSVD<double> svd;
    if (opt.randomized) {
      svd = analysis::randomized_svd(E, opt.rank, opt.svd);
    } else {
      Eigen::BDCSVD<Eigen::MatrixXd> s(E, Eigen::ComputeThinU | Eigen::ComputeThinV);
      svd = {s.matrixU().leftCols(opt.rank), s.singularValues().head(opt.rank), s.matrixV().leftCols(opt.rank)};
    }
    const Eigen::VectorXd root = svd.singular_values.head(opt.rank).cwiseSqrt();
    L = svd.U.leftCols(opt.rank) * root.asDiagonal();
    R = root.asDiagonal() * svd.V.leftCols(opt.rank).transpose();
    const Eigen::MatrixXd LR = L * R;
    out.quant_error.push_back(E.norm());
    out.error.push_back((E - LR).norm());
    if (t + 1 < opt.iterations) res = (Wd - LR).cast<float>();
  }
  const double c = opt.divide_by_scaling ? 1.0 / std::sqrt(opt.scaling) : 1.0;
  out.B = (c * L).cast<float>();
  out.A = (c * R).cast<float>();
  return out;
}

}  // namespace lora::quant
