#pragma once
// QLoRA on the CPU: a frozen NF4 base weight W [out × in] plus a trainable
// LoRA adapter, y = X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ. Small batches (tokens ≤ 16)
// multiply straight from the 4-bit codes, one decoded chunk of a row at a
// time, so W is never materialised; larger batches dequantise row panels and
// use Eigen's GEMM.

#include <lora/core/adapter.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/quant/nf4.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lora {

namespace quant::detail {

/// Elements of a row decoded at a time (4 KiB of floats: stays in L1).
inline constexpr std::int64_t decode_chunk = 1024;

#if defined(__AVX512F__)
using fvec = __m512;
inline constexpr int fvec_width = 16;
inline fvec fv_zero() { return _mm512_setzero_ps(); }
inline fvec fv_load(const float* p) { return _mm512_loadu_ps(p); }
inline fvec fv_fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
inline fvec fv_add(fvec a, fvec b) { return _mm512_add_ps(a, b); }
inline float fv_sum(fvec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
using fvec = __m256;
inline constexpr int fvec_width = 8;
inline fvec fv_zero() { return _mm256_setzero_ps(); }
inline fvec fv_load(const float* p) { return _mm256_loadu_ps(p); }
inline fvec fv_fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
inline fvec fv_add(fvec a, fvec b) { return _mm256_add_ps(a, b); }
inline float fv_sum(fvec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
struct fvec {
  float v[4];
};
inline constexpr int fvec_width = 4;
inline fvec fv_zero() { return {{0, 0, 0, 0}}; }
inline fvec fv_load(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline fvec fv_fma(fvec a, fvec b, fvec c) {
  for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline fvec fv_add(fvec a, fvec b) {
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  return a;
}
inline float fv_sum(fvec a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
#endif

/// out[g] += Σ_k w[k]·x_g[k] for G token rows x_g = x + g·ldx, k < n.
template <int G>
inline void dot_tokens(const float* w, const float* x, std::int64_t ldx, std::int64_t n, float* out) {
  constexpr int U = G == 1 ? 4 : (G == 2 ? 2 : 1);  // independent accumulators per token
  fvec acc[G][U];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) acc[g][u] = fv_zero();
  std::int64_t k = 0;
  for (; k + U * fvec_width <= n; k += U * fvec_width) {
    for (int u = 0; u < U; ++u) {
      const fvec wv = fv_load(w + k + u * fvec_width);
      for (int g = 0; g < G; ++g) acc[g][u] = fv_fma(wv, fv_load(x + g * ldx + k + u * fvec_width), acc[g][u]);
    }
  }
  for (; k + fvec_width <= n; k += fvec_width) {
    const fvec wv = fv_load(w + k);
    for (int g = 0; g < G; ++g) acc[g][0] = fv_fma(wv, fv_load(x + g * ldx + k), acc[g][0]);
  }
  for (int g = 0; g < G; ++g) {
    fvec s = acc[g][0];
    for (int u = 1; u < U; ++u) s = fv_add(s, acc[g][u]);
    float r = fv_sum(s);
    for (std::int64_t kk = k; kk < n; ++kk) r += w[kk] * x[g * ldx + kk];
    out[g] += r;
  }
}

inline void dot_token_group(const float* w, const float* x, std::int64_t ldx, std::int64_t n, Index T, float* out) {
  Index t = 0;
  for (; t + 4 <= T; t += 4) dot_tokens<4>(w, x + t * ldx, ldx, n, out + t);
  switch (T - t) {
    case 3: dot_tokens<3>(w, x + t * ldx, ldx, n, out + t); break;
    case 2: dot_tokens<2>(w, x + t * ldx, ldx, n, out + t); break;
    case 1: dot_tokens<1>(w, x + t * ldx, ldx, n, out + t); break;
    default: break;
  }
}

}  // namespace quant::detail

namespace quant {

/// Y = X·Wᵀ for X [T × in] (row-major) and an NF4 weight W [out × in], computed
/// from the codes: each row of W is decoded in L1-sized chunks (bitsandbytes'
/// dequantised values, exactly) and dotted with every token; W is never
/// materialised. Meant for small T (≤ 16); threads split the rows.
inline Matrix<float> nf4_matmul_fused(const Nf4Tensor& W, const MatrixRef<float>& X) {
  const Index out = W.rows(), in = W.cols(), T = X.rows();
  if (X.cols() != in) lora::detail::fail("nf4_matmul: input has {} columns, the NF4 weight has in_features = {}", X.cols(), in);
  const Matrix<float> Xc = X;  // contiguous rows
  Matrix<float> YT = Matrix<float>::Zero(out, T);  // [out × T]: each row of W writes one contiguous row
  const int shift = detail::log2_exact(W.blocksize());
  const std::uint8_t* packed = W.packed().data();
  const float* absmax = W.absmax().data();
  const bool par = static_cast<std::int64_t>(out) * in > detail::parallel_threshold;
  LORA_QUANT_PRAGMA(omp parallel if (par))
  {
    alignas(64) float buf[detail::decode_chunk];
    LORA_QUANT_PRAGMA(omp for schedule(static))
    for (Index i = 0; i < out; ++i) {
      float* yi = YT.data() + i * T;
      for (std::int64_t k0 = 0; k0 < in; k0 += detail::decode_chunk) {
        const std::int64_t n = std::min<std::int64_t>(detail::decode_chunk, in - k0);
        detail::nf4_decode_range(packed, absmax, shift, static_cast<std::int64_t>(i) * in + k0, n, buf);
        detail::dot_token_group(buf, Xc.data() + k0, in, n, T, yi);
      }
    }
  }
  return YT.transpose();
}

/// dX = dY·W for dY [T × out] and an NF4 weight W [out × in], from the codes
/// (threads split the columns of W; each decodes its slice of every row).
inline Matrix<float> nf4_matmul_fused_t(const Nf4Tensor& W, const MatrixRef<float>& dY) {
  const Index out = W.rows(), in = W.cols(), T = dY.rows();
  if (dY.cols() != out)
    lora::detail::fail("nf4_matmul_t: gradient has {} columns, the NF4 weight has out_features = {}", dY.cols(), out);
  Matrix<float> dX = Matrix<float>::Zero(T, in);
  const int shift = detail::log2_exact(W.blocksize());
  const std::uint8_t* packed = W.packed().data();
  const float* absmax = W.absmax().data();
  constexpr std::int64_t kc = 256;
  const std::int64_t nchunks = (in + kc - 1) / kc;
  const bool par = static_cast<std::int64_t>(out) * in > detail::parallel_threshold;
  LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (par))
  for (std::int64_t c = 0; c < nchunks; ++c) {
    alignas(64) float buf[kc];
    const std::int64_t k0 = c * kc, n = std::min(kc, in - k0);
    for (Index i = 0; i < out; ++i) {
      detail::nf4_decode_range(packed, absmax, shift, static_cast<std::int64_t>(i) * in + k0, n, buf);
      for (Index t = 0; t < T; ++t) {
        const float g = dY(t, i);
        float* d = dX.data() + t * in + k0;
        for (std::int64_t k = 0; k < n; ++k) d[k] += g * buf[k];
      }
    }
  }
  return dX;
}

/// Y = X·Wᵀ by dequantising W in row panels (never all of it at once) and
/// Eigen's GEMM; for batches too large for the fused path.
inline Matrix<float> nf4_matmul_panels(const Nf4Tensor& W, const MatrixRef<float>& X) {
  const Index out = W.rows(), in = W.cols(), T = X.rows();
  if (X.cols() != in) lora::detail::fail("nf4_matmul: input has {} columns, the NF4 weight has in_features = {}", X.cols(), in);
  Matrix<float> Y(T, out);
  const int shift = detail::log2_exact(W.blocksize());
  const Index panel = std::max<Index>(16, std::min<Index>(256, (1 << 20) / std::max<Index>(in, 1)));
  const Index npanels = (out + panel - 1) / panel;
  LORA_QUANT_PRAGMA(omp parallel for schedule(dynamic))
  for (Index p = 0; p < npanels; ++p) {
    const Index r0 = p * panel, nr = std::min(panel, out - r0);
    Matrix<float> P(nr, in);
    detail::nf4_decode_range(W.packed().data(), W.absmax().data(), shift, static_cast<std::int64_t>(r0) * in,
                             static_cast<std::int64_t>(nr) * in, P.data());
    Y.middleCols(r0, nr).noalias() = X * P.transpose();
  }
  return Y;
}

/// dX = dY·W in column panels of W and Eigen's GEMM.
inline Matrix<float> nf4_matmul_panels_t(const Nf4Tensor& W, const MatrixRef<float>& dY) {
  const Index out = W.rows(), in = W.cols(), T = dY.rows();
  if (dY.cols() != out)
    lora::detail::fail("nf4_matmul_t: gradient has {} columns, the NF4 weight has out_features = {}", dY.cols(), out);
  Matrix<float> dX(T, in);
  const int shift = detail::log2_exact(W.blocksize());
  const Index panel = std::max<Index>(16, std::min<Index>(512, (1 << 20) / std::max<Index>(out, 1)));
  const Index npanels = (in + panel - 1) / panel;
  LORA_QUANT_PRAGMA(omp parallel for schedule(dynamic))
  for (Index p = 0; p < npanels; ++p) {
    const Index k0 = p * panel, nk = std::min(panel, in - k0);
    Matrix<float> P(out, nk);
    for (Index i = 0; i < out; ++i)
      detail::nf4_decode_range(W.packed().data(), W.absmax().data(), shift, static_cast<std::int64_t>(i) * in + k0, nk,
                               P.data() + i * nk);
    dX.middleCols(k0, nk).noalias() = dY * P;
  }
  return dX;
}

/// Y = X·dequant(W)ᵀ: fused for T ≤ fused_max_tokens, row panels above.
inline constexpr Index fused_max_tokens = 16;
inline Matrix<float> nf4_matmul(const Nf4Tensor& W, const MatrixRef<float>& X) {
  return X.rows() <= fused_max_tokens ? nf4_matmul_fused(W, X) : nf4_matmul_panels(W, X);
}
/// dX = dY·dequant(W): fused for T ≤ fused_max_tokens, column panels above.
inline Matrix<float> nf4_matmul_t(const Nf4Tensor& W, const MatrixRef<float>& dY) {
  return dY.rows() <= fused_max_tokens ? nf4_matmul_fused_t(W, dY) : nf4_matmul_panels_t(W, dY);
}

}  // namespace quant

/// What merging an adapter into an NF4 base cost: the merged weight W + ΔW
/// (W dequantised) against its requantisation.
struct Nf4MergeReport {
  double max_abs_error = 0;   ///< max |requant(W + ΔW) − (W + ΔW)|
  double rms_error = 0;       ///< sqrt(mean of squared errors)
  double relative_error = 0;  ///< ‖requant(W + ΔW) − (W + ΔW)‖_F / ‖W + ΔW‖_F
  double delta_norm = 0;      ///< ‖ΔW‖_F, for scale
};

/// Merges ΔW = s·B·A into an NF4 weight: dequantise, add, requantise with the
/// same blocksize and double quantisation. Returns the error the requantisation adds.
template <ScalingPolicy Scaling>
Nf4MergeReport merge_into_nf4(Nf4Tensor& W, const LowRankAdapter<float, cpu, Scaling>& adapter) {
  if (adapter.fan_in_fan_out()) lora::detail::fail("merge_into_nf4: fan_in_fan_out adapters are not supported (NF4 weights are [out x in])");
  if (W.rows() != adapter.out_features() || W.cols() != adapter.in_features())
    lora::detail::fail("merge_into_nf4: NF4 weight has shape [{} x {}], adapter expects [{} x {}]", W.rows(), W.cols(),
                       adapter.out_features(), adapter.in_features());
  Matrix<float> M = W.dequantize<float>();
  const Matrix<float> d = adapter.delta_weight();
  M += d;
  W.requantize(M);
  const Matrix<float> R = W.dequantize<float>();
  Nf4MergeReport rep;
  const Eigen::ArrayXXd e = (R.cast<double>() - M.cast<double>()).array();
  rep.max_abs_error = e.size() ? e.abs().maxCoeff() : 0.0;
  rep.rms_error = e.size() ? std::sqrt(e.square().mean()) : 0.0;
  const double mn = M.cast<double>().norm();
  rep.relative_error = mn > 0 ? std::sqrt(e.square().sum()) / mn : 0.0;
  rep.delta_norm = d.cast<double>().norm();
  return rep;
}

/// A QLoRA linear layer: frozen NF4 base W [out × in] and a float LoRA adapter.
///
///   lora::QLoraLinear<> layer(lora::Nf4Tensor::quantize(W, {.double_quant = true}), std::move(adapter));
///   auto y = layer.forward(X);            // X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ
///   auto g = layer.backward(X, dY);       // g.dA, g.dB, g.dX (W frozen)
template <ScalingPolicy Scaling = standard_scaling>
class QLoraLinear {
 public:
  using adapter_type = LowRankAdapter<float, cpu, Scaling>;

  QLoraLinear(Nf4Tensor base, adapter_type adapter) : W_(std::move(base)), adapter_(std::move(adapter)) {
    if (W_.shape().size() != 2)
      lora::detail::fail("QLoraLinear: NF4 base weight must be 2-D [out x in], got {} dimensions", W_.shape().size());
    if (adapter_.fan_in_fan_out()) lora::detail::fail("QLoraLinear: fan_in_fan_out adapters are not supported");
    if (W_.rows() != adapter_.out_features() || W_.cols() != adapter_.in_features())
      lora::detail::fail("QLoraLinear: NF4 base weight has shape [{} x {}], adapter expects [out x in] = [{} x {}]",
                         W_.rows(), W_.cols(), adapter_.out_features(), adapter_.in_features());
  }

  const Nf4Tensor& base() const { return W_; }
  const adapter_type& adapter() const { return adapter_; }
  adapter_type& adapter() { return adapter_; }
  Index in_features() const { return W_.cols(); }
  Index out_features() const { return W_.rows(); }

  /// X·dequant(W)ᵀ for X [T × in].
  Matrix<float> base_forward(const MatrixRef<float>& X) const { return quant::nf4_matmul(W_, X); }

  /// X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ (evaluation mode).
  Matrix<float> forward(const MatrixRef<float>& X) const {
    Matrix<float> y = base_forward(X);
    y.noalias() += adapter_.forward(X);
    return y;
  }

  /// Gradients for dY = ∂L/∂Y with W frozen: dA, dB from the adapter path and
  /// dX = dY·dequant(W) + s·(dY·B)·A.
  Gradients<float> backward(const MatrixRef<float>& X, const Eigen::Ref<const Matrix<float>>& dY) const {
    if (dY.rows() != X.rows() || dY.cols() != out_features())
      lora::detail::fail("QLoraLinear::backward: dY has shape [{} x {}], expected [{} x {}]", dY.rows(), dY.cols(),
                         X.rows(), out_features());
    Gradients<float> g = adapter_.backward(X, dY);
    g.dX.noalias() += quant::nf4_matmul_t(W_, dY);
    return g;
  }

  /// Merges the adapter into the NF4 base (dequantise, add, requantise), then
  /// zeroes B so forward() stays (approximately) the same. Returns the added error.
  Nf4MergeReport merge() {
    Nf4MergeReport r = merge_into_nf4(W_, adapter_);
    adapter_.B().setZero();
    return r;
  }

 private:
  Nf4Tensor W_;
  adapter_type adapter_;
};

}  // namespace lora
