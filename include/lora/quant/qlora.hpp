#pragma once
// QLoRA on the CPU: a frozen NF4 base weight W [out × in] plus a trainable
// LoRA adapter, y = X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ. Small batches (tokens ≤ 16)
// multiply straight from the 4-bit codes (quant/nf4_cpu.hpp), so W is never
// materialised; larger batches dequantise row panels and use Eigen's GEMM.

#include <lora/core/adapter.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/quant/nf4.hpp>
#include <lora/quant/nf4_cpu.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lora {

namespace quant {

/// Y = X·Wᵀ for X [T × in] (row-major) and an NF4 weight W [out × in], computed
/// from the codes (W is never materialised) by nf4_gemm on the widest path the
/// target has. exact: bitsandbytes' dequantised values; fast: int8 activations
/// and codes (see nf4_cpu.hpp for its error). Meant for small T (≤ 16); threads
/// split the rows.
inline Matrix<float> nf4_matmul_fused(const Nf4Tensor<>& W, const MatrixRef<float>& X, nf4_mode mode = nf4_mode::exact) {
  const Index out = W.rows(), in = W.cols(), T = X.rows();
  if (X.cols() != in) lora::detail::fail("nf4_matmul: input has {} columns, the NF4 weight has in_features = {}", X.cols(), in);
  Matrix<float> Y(T, out);
  if (X.outerStride() == in || T == 1) {
    nf4_gemm(isa::native{}, nf4_view(W), X.data(), T, Y.data(), mode);
  } else {
    const Matrix<float> Xc = X;  // contiguous rows
    nf4_gemm(isa::native{}, nf4_view(W), Xc.data(), T, Y.data(), mode);
  }
  return Y;
}

/// dX = dY·W for dY [T × out] and an NF4 weight W [out × in], from the codes
/// (threads split the columns of W; each decodes its slice of every row).
inline Matrix<float> nf4_matmul_fused_t(const Nf4Tensor<>& W, const MatrixRef<float>& dY) {
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
  (void)par;
#if defined(__AVX512F__)
  if (in % 32 == 0) {
    // Codes decoded in registers, two rows per pass; dX accumulated in the
    // pair-permuted column order (see permute_pairs) and restored at the end.
    const Matrix<float> dYc = dY;
    Matrix<float> dXp = Matrix<float>::Zero(T, in);
    // About 8 column chunks (balanced over the threads), each a multiple of 32.
    const std::int64_t kcp = std::max<std::int64_t>(32, ((in + 7) / 8 + 31) / 32 * 32);
    const std::int64_t nck = (in + kcp - 1) / kcp;
    const __m512 code = _mm512_loadu_ps(nf4_code.data());
    LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (par))
    for (std::int64_t c = 0; c < nck; ++c) {
      const std::int64_t k0 = c * kcp, n = std::min(kcp, in - k0);
      for (Index i = 0; i < out; i += 2) {
        const bool two = i + 1 < out;
        const std::int64_t ea0 = static_cast<std::int64_t>(i) * in + k0, eb0 = ea0 + in;
        std::int64_t blk_a = -1, blk_b = -1;
        __m512 lut_a = code, lut_b = _mm512_setzero_ps();
        for (std::int64_t k = 0; k < n; k += 32) {
          const std::int64_t ea = ea0 + k;
          if ((ea >> shift) != blk_a) {
            blk_a = ea >> shift;
            lut_a = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk_a]));
          }
          const __m512i ba = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (ea >> 1))));
          const __m512 wa0 = _mm512_permutexvar_ps(_mm512_srli_epi32(ba, 4), lut_a);
          const __m512 wa1 = _mm512_permutexvar_ps(ba, lut_a);
          __m512 wb0 = _mm512_setzero_ps(), wb1 = _mm512_setzero_ps();
          if (two) {
            const std::int64_t eb = eb0 + k;
            if ((eb >> shift) != blk_b) {
              blk_b = eb >> shift;
              lut_b = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk_b]));
            }
            const __m512i bb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (eb >> 1))));
            wb0 = _mm512_permutexvar_ps(_mm512_srli_epi32(bb, 4), lut_b);
            wb1 = _mm512_permutexvar_ps(bb, lut_b);
          }
          for (Index t = 0; t < T; ++t) {
            const __m512 ga = _mm512_set1_ps(dYc(t, i));
            const __m512 gb = _mm512_set1_ps(two ? dYc(t, i + 1) : 0.0f);
            float* d = dXp.data() + t * in + k0 + k;
            __m512 d0 = _mm512_loadu_ps(d), d1 = _mm512_loadu_ps(d + 16);
            d0 = _mm512_fmadd_ps(wb0, gb, _mm512_fmadd_ps(wa0, ga, d0));
            d1 = _mm512_fmadd_ps(wb1, gb, _mm512_fmadd_ps(wa1, ga, d1));
            _mm512_storeu_ps(d, d0);
            _mm512_storeu_ps(d + 16, d1);
          }
        }
      }
    }
    for (Index t = 0; t < T; ++t) {  // back to the natural column order
      const float* p = dXp.data() + t * in;
      float* o = dX.data() + t * in;
      for (Index g = 0; g < in; g += 32)
        for (int j = 0; j < 16; ++j) {
          o[g + 2 * j] = p[g + j];
          o[g + 2 * j + 1] = p[g + 16 + j];
        }
    }
    return dX;
  }
#endif
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
inline Matrix<float> nf4_matmul_panels(const Nf4Tensor<>& W, const MatrixRef<float>& X) {
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
inline Matrix<float> nf4_matmul_panels_t(const Nf4Tensor<>& W, const MatrixRef<float>& dY) {
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

/// Y = X·dequant(W)ᵀ: fused for T ≤ fused_max_tokens (in `mode`), row panels
/// above (always the exact values: the dequantised panels go through Eigen's GEMM).
inline constexpr Index fused_max_tokens = 16;
inline Matrix<float> nf4_matmul(const Nf4Tensor<>& W, const MatrixRef<float>& X, nf4_mode mode = nf4_mode::exact) {
  return X.rows() <= fused_max_tokens ? nf4_matmul_fused(W, X, mode) : nf4_matmul_panels(W, X);
}
/// dX = dY·dequant(W): fused for T ≤ fused_max_tokens, column panels above.
inline Matrix<float> nf4_matmul_t(const Nf4Tensor<>& W, const MatrixRef<float>& dY) {
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
template <class Scalar = float, class Device = cpu, ScalingPolicy Scaling = standard_scaling>
class QLoraLinear;

/// QLoRA on the CPU: the adapter is float (Scalar must be float); the base product reads
/// the 4-bit codes directly.
template <class Scalar, ScalingPolicy Scaling>
class QLoraLinear<Scalar, cpu, Scaling> {
  static_assert(std::is_same_v<Scalar, float>, "QLoraLinear<S, cpu>: S must be float");

 public:
  using scalar_type = Scalar;
  using device_type = cpu;
  using scaling_policy = Scaling;
  using adapter_type = LowRankAdapter<float, cpu, Scaling>;
  using base_type = quant::Nf4Tensor<cpu>;

  QLoraLinear(Nf4Tensor base, adapter_type adapter) : W_(std::move(base)), adapter_(std::move(adapter)) {
    if (W_.shape().size() != 2)
      lora::detail::fail("QLoraLinear: NF4 base weight must be 2-D [out x in], got {} dimensions", W_.shape().size());
    if (adapter_.fan_in_fan_out()) lora::detail::fail("QLoraLinear: fan_in_fan_out adapters are not supported");
    if (W_.rows() != adapter_.out_features() || W_.cols() != adapter_.in_features())
      lora::detail::fail("QLoraLinear: NF4 base weight has shape [{} x {}], adapter expects [out x in] = [{} x {}]",
                         W_.rows(), W_.cols(), adapter_.out_features(), adapter_.in_features());
  }

  /// A copy: the CPU side of the device-generic `QLoraLinear<S, D>::from_host`.
  static QLoraLinear from_host(const QLoraLinear& host) { return host; }
  /// A copy in host memory, as the CUDA layer's to_host() gives.
  QLoraLinear to_host() const { return *this; }

  const Nf4Tensor& base() const { return W_; }
  const adapter_type& adapter() const { return adapter_; }
  adapter_type& adapter() { return adapter_; }
  Index in_features() const { return W_.cols(); }
  Index out_features() const { return W_.rows(); }

  /// How the base product runs for ≤ 16 tokens: exact (bitsandbytes' values, the
  /// default) or fast (int8 activations, see quant/nf4_cpu.hpp). Backward is always exact.
  quant::nf4_mode mode() const { return mode_; }
  void set_mode(quant::nf4_mode m) { mode_ = m; }

  /// X·dequant(W)ᵀ for X [T × in].
  Matrix<float> base_forward(const MatrixRef<float>& X) const { return quant::nf4_matmul(W_, X, mode_); }

  /// X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ (evaluation mode).
  Matrix<float> forward(const MatrixRef<float>& X) const {
    Matrix<float> y = base_forward(X);
    y.noalias() += adapter_.forward(X);  // few tokens: the adapter's GEMV path
    return y;
  }

  /// Gradients for dY = ∂L/∂Y with W frozen: dB = s·dYᵀ·(X·Aᵀ), dA = s·(dY·B)ᵀ·X,
  /// dX = dY·dequant(W) + s·(dY·B)·A.
  Gradients<float> backward(const MatrixRef<float>& X, const Eigen::Ref<const Matrix<float>>& dY) const {
    if (dY.rows() != X.rows() || dY.cols() != out_features())
      lora::detail::fail("QLoraLinear::backward: dY has shape [{} x {}], expected [{} x {}]", dY.rows(), dY.cols(),
                         X.rows(), out_features());
    if (X.cols() != in_features())
      lora::detail::fail("QLoraLinear::backward: input has {} columns, expected in_features = {}", X.cols(), in_features());
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
  quant::nf4_mode mode_ = quant::nf4_mode::exact;
};

}  // namespace lora
