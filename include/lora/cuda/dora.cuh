#pragma once
// DoRA (Liu et al. 2024) on the GPU, in PEFT's formulation with the weight
// norm detached from the graph:
//   Y = c ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ),   c_n = m_n / ‖W_n + s·(B·A)_n‖   (row n of W ↔ column n of Y).
// The row norms come from ‖w_n‖² + 2s·b_n·(W·Aᵀ)_n + s²·b_n·(A·Aᵀ)·b_nᵀ, so
// W + s·B·A is never formed; c is folded into the rows of the fused block
// [[c⊙W, c⊙B], [A, 0]], after which forward and backward are the LoRA ones.

#include <lora/cuda/adapter.cuh>
#include <lora/cuda/dora_norm.cuh>
#include <lora/cuda/kernels.cuh>

namespace lora {

/// Buffers of the DoRA device path. wn2 (‖w_n‖²) is computed once, since W is
/// frozen; call reset_weight_norms() if W changes.
template <class S>
struct DoraWorkspace {
  FusedWeight<S> scaled;          ///< [[c⊙W, c⊙B], [A, 0]], written by dora_apply
  DeviceMatrix<float> wn2;        ///< [out × 1] ‖w_n‖²
  DeviceMatrix<float> PG;         ///< [W; A]·Aᵀ [(out + r) × r]: P = W·Aᵀ above G = A·Aᵀ
  DeviceMatrix<float> norm, c;    ///< [out × 1] ‖W + s·B·A‖_row and m / norm
  bool scaled_current = false;    ///< `scaled` matches c (decode-size forwards skip it)
  DeviceBuffer<float> pg_partials;  ///< detail::norm_gemm's partial sums of PG
  /// Inference with frozen A, B and m: dora_apply keeps the column scale c of its first call
  /// and skips the norm pass (a read of W) on later calls with the same fused block and
  /// magnitude buffer. Call invalidate_norm() after refresh(fw) or a change of m's values.
  bool cache_norm = false;
  const void* norm_block = nullptr;      ///< the fused block c was computed for (cache_norm)
  const float* norm_magnitude = nullptr;  ///< the magnitude buffer c was computed for (cache_norm)
  void reset_weight_norms() {
    wn2 = {};
    invalidate_norm();
  }
  void invalidate_norm() {
    norm_block = nullptr;
    norm_magnitude = nullptr;
  }
};

/// ‖W + s·B·A‖ per output row into ws.norm (and m / norm into ws.c when m is given), W from the fused block.
template <class S, ScalingPolicy Sc>
void dora_weight_norm(const LowRankAdapter<S, cuda, Sc>& ad, const FusedWeight<S>& fw, DoraWorkspace<S>& ws,
                      const float* magnitude = nullptr) {
  using T = detail::device_t<S>;
  auto& ctx = ad.context();
  const Index out = ad.out_features(), in = ad.in_features(), r = ad.rank();
  if (ws.wn2.rows() != out) {
    ws.wn2 = DeviceMatrix<float>(out, 1);
    detail::row_sqnorm_kernel<T><<<detail::ceil_div(out, 8), 256, 0, ctx.stream()>>>(
        reinterpret_cast<const T*>(fw.W().data), fw.ld(), static_cast<int>(out), static_cast<int>(in), ws.wn2.data());
    LORA_CUDA_CHECK_LAUNCH("row_sqnorm_kernel");
  }
  if (ws.PG.rows() != out + r || ws.PG.cols() != r) ws.PG = DeviceMatrix<float>(out + r, r);
  if (ws.norm.rows() != out) ws.norm = DeviceMatrix<float>(out, 1);
  if (ws.c.rows() != out) ws.c = DeviceMatrix<float>(out, 1);
  // P = W·Aᵀ and G = A·Aᵀ in one pass over the fused block's [W; A] rows (G's own GEMM would
  // be a second launch for r × r outputs): for 16-bit r ≤ 32,
  // float partial sums on tensor cores with the grid split over K (detail::norm_gemm,
  // dora_norm.cuh), which dora_norm_fused_kernel adds while it computes the norms; otherwise
  // one cuBLAS GEMM into ws.PG.
  const float* part = ws.PG.data();
  int Q = 1;
  long stride = static_cast<long>(r);
  float* pg_out = nullptr;  // where the fused kernel writes PG (when it reads partials)
  bool tc = false;
  if constexpr (sizeof(T) == 2) {
    const auto M = detail::as_device(fw.tall()), A = detail::as_device(fw.A());
    if (detail::norm_gemm_ok<T>(M, A, r) && in > 0) {
      const detail::norm_gemm_grid g = detail::norm_gemm<T>(ctx, M, A, r, ws.PG.view(), ws.pg_partials, 0, 1);
      part = ws.pg_partials.data();
      Q = g.Q;
      stride = g.N;
      pg_out = ws.PG.data();
      tc = true;
    }
  }
  if (!tc) detail::gemm<S, S, float>(ctx, false, true, out + r, r, in, 1.f, fw.tall(), fw.A(), 0.f, ws.PG.view());
  const float s = static_cast<float>(ad.scaling());
  const T* Bd = reinterpret_cast<const T*>(fw.B().data);
  float* c = magnitude ? ws.c.data() : nullptr;
  if (detail::dora_norm_fused<T>(ctx.stream(), part, Q, stride, out, r, ws.wn2.data(), Bd, fw.ld(), s, magnitude,
                                 ws.norm.data(), c, pg_out))
    return;
  if (tc) detail::fail("{}dora_weight_norm: internal error (tensor-core partials with r = {} > 32)", ad.who(), r);
  detail::dora_norm_kernel<T><<<detail::ceil_div(out, 128), 128, 0, ctx.stream()>>>(
      ws.wn2.data(), ws.PG.data(), ws.PG.data() + out * r, Bd, fw.ld(), static_cast<int>(out), static_cast<int>(r),
      s, magnitude, ws.norm.data(), c);
  LORA_CUDA_CHECK_LAUNCH("dora_norm_kernel");
}

namespace detail {
/// ws.scaled = [[c⊙W, c⊙B], [A, 0]] from the fused block and ws.c.
template <class S, ScalingPolicy Sc>
void dora_build_scaled(const LowRankAdapter<S, cuda, Sc>& ad, const FusedWeight<S>& fw, DoraWorkspace<S>& ws) {
  using T = detail::device_t<S>;
  auto& ctx = ad.context();
  const Index out = ad.out_features(), in = ad.in_features(), r = ad.rank();
  if (ws.scaled.out != out || ws.scaled.in != in || ws.scaled.r != r)
    ws.scaled = FusedWeight<S>{DeviceMatrix<S>(out + fw.rp(), fw.ld()), out, in, r};
  const T* src = reinterpret_cast<const T*>(fw.block.data());
  T* dst = reinterpret_cast<T*>(ws.scaled.block.data());
  const long ld = static_cast<long>(fw.ld());
  if constexpr (sizeof(T) == 2) {
    if (ld % 8 == 0 && aligned(src, 16) && aligned(dst, 16)) {  // one vectorised pass over the whole block
      const long vectors = (out + fw.rp()) * ld / 8;
      scale_rows_vec_kernel<T><<<static_cast<unsigned>(std::min<long>(ceil_div(vectors, 256), 132L * 16)), 256, 0,
                                 ctx.stream()>>>(src, dst, vectors, ld, static_cast<int>(out), ws.c.data());
      LORA_CUDA_CHECK_LAUNCH("scale_rows_vec_kernel");
      ws.scaled_current = true;
      return;
    }
  }
  scale_rows_kernel<T><<<dim3(ceil_div(ld, 256 * 4), static_cast<unsigned>(out)), 256, 0, ctx.stream()>>>(
      src, ld, dst, ld, static_cast<int>(out), static_cast<int>(ld), ws.c.data());
  LORA_CUDA_CHECK_LAUNCH("scale_rows_kernel");
  // [A, 0] and the zero padding rows below it
  LORA_CUDA_CHECK(cudaMemcpyAsync(dst + out * ld, src + out * ld, static_cast<size_t>(fw.rp() * ld) * sizeof(S),
                                  cudaMemcpyDeviceToDevice, ctx.stream()));
  ws.scaled_current = true;
}
}  // namespace detail

/// DoRA forward: Y = (m / ‖W + s·B·A‖_row) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ), with
/// magnitude m [out] (float, device) and Xp = [X | scratch] as in the fused LoRA path.
template <class S, ScalingPolicy Sc>
void dora_apply(const LowRankAdapter<S, cuda, Sc>& ad, const FusedWeight<S>& fw, DeviceView<const float> magnitude,
                DeviceView<S> Xp, DeviceView<S> Y, DoraWorkspace<S>& ws) {
  using T = detail::device_t<S>;
  auto& ctx = ad.context();
  const Index out = ad.out_features(), in = ad.in_features(), r = ad.rank();
  if (magnitude.rows * magnitude.cols != out)
    detail::fail("{}lora_magnitude_vector has {} elements, expected out_features = {}", ad.who(),
                 magnitude.rows * magnitude.cols, out);
  const bool cached = ws.cache_norm && ws.norm_block == fw.block.data() && ws.norm_magnitude == magnitude.data &&
                      ws.c.rows() == out;
  if (!cached) {
    dora_weight_norm(ad, fw, ws, magnitude.data);
    ws.norm_block = ws.cache_norm ? fw.block.data() : nullptr;
    ws.norm_magnitude = ws.cache_norm ? magnitude.data : nullptr;
  }
  if (Xp.rows <= 16) {
    // Decode sizes: Y is tiny, so scale its columns instead of W's rows.
    ad.apply(fw, Xp, Y);
    detail::scale_cols_kernel<T><<<detail::ceil_div(Y.rows * Y.cols, 256), 256, 0, ctx.stream()>>>(
        reinterpret_cast<T*>(Y.data), Y.ld, static_cast<int>(Y.rows), static_cast<int>(Y.cols), ws.c.data());
    LORA_CUDA_CHECK_LAUNCH("scale_cols_kernel");
    ws.scaled_current = false;
    return;
  }
  if (!cached || !ws.scaled_current) detail::dora_build_scaled(ad, fw, ws);
  ad.apply(ws.scaled, Xp, Y);
}

/// Gradients of dora_apply (W frozen, norm detached as in PEFT): with c from the
/// forward, dZ = dY ⊙ c, dX = dZ·W + s·(dZ·B)·A, dA = s·(dZ·B)ᵀ·X,
/// dB = s·dZᵀ·(X·Aᵀ), dm_n = Σ_t dY[t, n]·Y[t, n] / m_n. dYp = [dY | scratch].
template <class S, ScalingPolicy Sc>
void dora_backward(const LowRankAdapter<S, cuda, Sc>& ad, const FusedWeight<S>& fw, DeviceView<const float> magnitude,
                   DeviceView<const S> Xp,
                   DeviceView<const S> Y, DeviceView<S> dYp, DeviceView<S> dX, DeviceView<float> dA,
                   DeviceView<float> dB, DeviceView<float> dm, DoraWorkspace<S>& ws) {
  using T = detail::device_t<S>;
  auto& ctx = ad.context();
  const Index out = ad.out_features(), r = ad.rank(), tokens = Xp.rows;
  if (ws.c.rows() != out) detail::fail("{}dora_backward: call dora_apply first (no column scale)", ad.who());
  if (!ws.scaled_current) detail::dora_build_scaled(ad, fw, ws);
  if (dm.rows * dm.cols != out) detail::fail("{}dm has {} elements, expected {}", ad.who(), dm.rows * dm.cols, out);
  ad.backward(ws.scaled, Xp, dYp, dX, dA, dB);
  detail::scale_rows_f32_kernel<<<dim3(detail::ceil_div(r, 128), static_cast<unsigned>(out)), 128, 0, ctx.stream()>>>(
      dB.data, dB.ld, static_cast<int>(out), static_cast<int>(r), ws.c.data());
  LORA_CUDA_CHECK_LAUNCH("scale_rows_f32_kernel");
  LORA_CUDA_CHECK(cudaMemsetAsync(dm.data, 0, static_cast<size_t>(out) * sizeof(float), ctx.stream()));
  const int per_slice = 256;
  detail::column_dot_kernel<T><<<dim3(detail::ceil_div(out, 256), detail::ceil_div(tokens, per_slice)), 256, 0,
                                 ctx.stream()>>>(reinterpret_cast<const T*>(dYp.data), dYp.ld,
                                                 reinterpret_cast<const T*>(Y.data), Y.ld, static_cast<int>(tokens),
                                                 static_cast<int>(out), per_slice, dm.data);
  LORA_CUDA_CHECK_LAUNCH("column_dot_kernel");
  detail::divide_kernel<<<detail::ceil_div(out, 256), 256, 0, ctx.stream()>>>(dm.data, magnitude.data,
                                                                               static_cast<int>(out));
  LORA_CUDA_CHECK_LAUNCH("divide_kernel");
}

}  // namespace lora
