#pragma once
// Singular values of ΔW = s·B·A on the GPU without forming ΔW:
//   B = Q_B·R_B, Aᵀ = Q_A·R_A (thin QR, cuSOLVER geqrf)  ⇒  s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ,
// so σ(ΔW) = σ(C) with the r × r core C = s·R_B·R_Aᵀ. The core's values come
// from the eigenvalues of CᵀC in double on the host (r ≤ a few hundred).

#include <lora/cuda/adapter.cuh>
#include <lora/cuda/kernels.cuh>

#include <Eigen/Eigenvalues>

#include <algorithm>

namespace lora {

namespace detail {
/// In-place thin QR of a column-major float [m × n] matrix (m ≥ n); R stays in the upper triangle.
inline void geqrf_inplace(CudaContext& ctx, float* M, int m, int n, DeviceBuffer<float>& tau,
                          DeviceBuffer<float>& work, DeviceBuffer<int>& info) {
  int lwork = 0;
  LORA_CUDA_CHECK(cusolverDnSgeqrf_bufferSize(ctx.solver(), m, n, M, m, &lwork));
  if (work.size() < static_cast<std::size_t>(lwork)) work = DeviceBuffer<float>(static_cast<std::size_t>(lwork));
  if (tau.size() < static_cast<std::size_t>(n)) tau = DeviceBuffer<float>(static_cast<std::size_t>(n));
  LORA_CUDA_CHECK(cusolverDnSgeqrf(ctx.solver(), m, n, M, m, tau.data(), work.data(), lwork, info.data()));
}
}  // namespace detail

/// Reusable buffers for singular_values (so repeated calls do not allocate).
struct SpectrumWorkspace {
  DeviceBuffer<float> Bt, At, tmp, RB, RA, core, tau, work;
  DeviceBuffer<int> info{1};
};

/// The r singular values of ΔW = s·B·A, descending (thin QRs on the GPU + an r × r core).
template <class S, ScalingPolicy Sc>
Vector<double> singular_values(const LowRankAdapter<S, cuda, Sc>& ad, SpectrumWorkspace& ws) {
  using T = detail::device_t<S>;
  auto& ctx = ad.context();
  const int out = static_cast<int>(ad.out_features()), in = static_cast<int>(ad.in_features()),
            r = static_cast<int>(ad.rank());
  auto grow = [](DeviceBuffer<float>& b, std::size_t n) {
    if (b.size() < n) b = DeviceBuffer<float>(n);
  };
  grow(ws.tmp, static_cast<std::size_t>(out) * r);
  grow(ws.Bt, static_cast<std::size_t>(out) * r);
  grow(ws.At, static_cast<std::size_t>(in) * r);
  grow(ws.RB, static_cast<std::size_t>(r) * r);
  grow(ws.RA, static_cast<std::size_t>(r) * r);
  grow(ws.core, static_cast<std::size_t>(r) * r);
  // B (row-major [out × r]) → float, then transposed into column-major [out × r].
  detail::to_float_kernel<T><<<detail::ceil_div(static_cast<long>(out) * r, 256), 256, 0, ctx.stream()>>>(
      reinterpret_cast<const T*>(ad.B().data), r, ws.tmp.data(), r, out, r);
  LORA_CUDA_CHECK_LAUNCH("to_float_kernel");
  const float one = 1.f, zero = 0.f;
  LORA_CUDA_CHECK(cublasSgeam(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, out, r, &one, ws.tmp.data(), r, &zero,
                              ws.Bt.data(), out, ws.Bt.data(), out));
  // A (row-major [r × in]) read column-major is already Aᵀ [in × r].
  detail::to_float_kernel<T><<<detail::ceil_div(static_cast<long>(in) * r, 256), 256, 0, ctx.stream()>>>(
      reinterpret_cast<const T*>(ad.A().data), in, ws.At.data(), in, r, in);
  LORA_CUDA_CHECK_LAUNCH("to_float_kernel");
  detail::geqrf_inplace(ctx, ws.Bt.data(), out, r, ws.tau, ws.work, ws.info);
  detail::upper_triangle_kernel<<<detail::ceil_div(r * r, 256), 256, 0, ctx.stream()>>>(ws.Bt.data(), out, r,
                                                                                         ws.RB.data());
  LORA_CUDA_CHECK_LAUNCH("upper_triangle_kernel");
  detail::geqrf_inplace(ctx, ws.At.data(), in, r, ws.tau, ws.work, ws.info);
  detail::upper_triangle_kernel<<<detail::ceil_div(r * r, 256), 256, 0, ctx.stream()>>>(ws.At.data(), in, r,
                                                                                         ws.RA.data());
  LORA_CUDA_CHECK_LAUNCH("upper_triangle_kernel");
  const float s = static_cast<float>(ad.scaling());
  // core = s·R_B·R_Aᵀ (column-major r × r).
  LORA_CUDA_CHECK(cublasSgemm(ctx.blas(), CUBLAS_OP_N, CUBLAS_OP_T, r, r, r, &s, ws.RB.data(), r, ws.RA.data(), r,
                              &zero, ws.core.data(), r));
  Eigen::MatrixXf core(r, r);
  int info = 0;
  LORA_CUDA_CHECK(cudaMemcpyAsync(core.data(), ws.core.data(), static_cast<size_t>(r) * r * sizeof(float),
                                  cudaMemcpyDeviceToHost, ctx.stream()));
  LORA_CUDA_CHECK(cudaMemcpyAsync(&info, ws.info.data(), sizeof(int), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  if (info != 0) detail::fail("{}singular_values: geqrf reported info = {}", ad.who(), info);
  const Eigen::MatrixXd C = core.cast<double>();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(C.transpose() * C, Eigen::EigenvaluesOnly);
  Vector<double> sv(r);
  for (int i = 0; i < r; ++i) sv[i] = std::sqrt(std::max(eig.eigenvalues()[r - 1 - i], 0.0));
  return sv;
}

template <class S, ScalingPolicy Sc>
Vector<double> singular_values(const LowRankAdapter<S, cuda, Sc>& ad) {
  SpectrumWorkspace ws;
  return singular_values(ad, ws);
}

}  // namespace lora
