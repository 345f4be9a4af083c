#pragma once
// DoraAdapter<S, lora::cuda>: DoRA (Liu et al. 2024) on the GPU, the same class as on the
// CPU (lora/dora/dora.hpp), in PEFT's formulation with the weight norm detached:
//   Y = c ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ),   c_n = m_n / ‖W_n + s·(B·A)_n‖   (row n of W ↔ column n of Y).
// The row norms come from ‖w_n‖² + 2s·b_n·(W·Aᵀ)_n + s²·b_n·(A·Aᵀ)·b_nᵀ, so
// W + s·B·A is never formed; on the fused path c is folded into the rows of the block
// [[c⊙W, c⊙B], [A, 0]], after which forward and backward are the LoRA ones.

#include <lora/cuda/adapter.cuh>
#include <lora/cuda/dora_norm.cuh>
#include <lora/cuda/kernels.cuh>
#include <lora/dora/dora.hpp>

namespace lora {

/// How DoraAdapter<S, cuda> runs a forward of a few tokens. `one_pass`: W is read once for
/// both the norms and Y (detail::dora_pass: [W; A]·[A; X]ᵀ and ‖w_n‖² in one tensor-core pass,
/// then one small kernel); it needs 16-bit S, r + T ≤ 32 and 16-byte rows. `two_pass`: the
/// norm pass ([W; A]·Aᵀ), then LoRA's forward and a column scale. `automatic` takes one_pass
/// wherever it applies (T ≤ 16) and two_pass elsewhere; a forced one_pass that does not apply throws.
enum class DoraDecode { automatic, one_pass, two_pass };

namespace detail {

/// Buffers of DoraAdapter<S, cuda>'s fused path. wn2 (‖w_n‖²) is computed once, since W is
/// frozen; reset_weight_norms() if W changes.
template <class S>
struct DoraWorkspace {
  FusedWeight<S> scaled;          ///< [[c⊙W, c⊙B], [A, 0]], written by dora_apply
  DeviceMatrix<float> wn2;        ///< [out × 1] ‖w_n‖²
  DeviceMatrix<float> PG;         ///< [W; A]·Aᵀ [(out + r) × r]: P = W·Aᵀ above G = A·Aᵀ
  DeviceMatrix<float> norm, c;    ///< [out × 1] ‖W + s·B·A‖_row and m / norm
  bool scaled_current = false;    ///< `scaled` matches c (decode-size forwards skip it)
  DeviceBuffer<float> pg_partials;  ///< detail::norm_gemm's partial sums of PG
  DeviceBuffer<float> pass_part, pass_sq;  ///< detail::dora_pass's partial sums (R and ‖w_n‖²)
  DoraDecode decode = DoraDecode::automatic;
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
  const FusedLayout<S> L = fused_layout(fw);
  if (ws.wn2.rows() != out) {
    ws.wn2 = DeviceMatrix<float>(out, 1);
    detail::row_sqnorm_kernel<T><<<detail::ceil_div(out, 8), 256, 0, ctx.stream()>>>(
        reinterpret_cast<const T*>(L.W().data), L.ld(), static_cast<int>(out), static_cast<int>(in), ws.wn2.data());
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
    const auto M = detail::as_device(L.tall()), A = detail::as_device(L.A());
    if (detail::norm_gemm_ok<T>(M, A, r) && in > 0) {
      const detail::norm_gemm_grid g = detail::norm_gemm<T>(ctx, M, A, r, ws.PG.view(), ws.pg_partials, 0, 1);
      part = ws.pg_partials.data();
      Q = g.Q;
      stride = g.N;
      pg_out = ws.PG.data();
      tc = true;
    }
  }
  if (!tc) detail::gemm<S, S, float>(ctx, false, true, out + r, r, in, 1.f, L.tall(), L.A(), 0.f, ws.PG.view());
  const float s = static_cast<float>(ad.scaling());
  const T* Bd = reinterpret_cast<const T*>(L.B().data);
  float* c = magnitude ? ws.c.data() : nullptr;
  if (detail::dora_norm_fused<T>(ctx.stream(), part, Q, stride, out, r, ws.wn2.data(), Bd, L.ld(), s, magnitude,
                                 ws.norm.data(), c, pg_out))
    return;
  if (tc) detail::fail("{}dora_weight_norm: internal error (tensor-core partials with r = {} > 32)", ad.who(), r);
  detail::dora_norm_from_pg<T>(ctx.stream(), ws.wn2.data(), ws.PG.data(), Bd, L.ld(), out, r, s, magnitude,
                               ws.norm.data(), c);
}

/// Whether a forward of X.rows tokens takes detail::dora_pass under ws.decode (throws when
/// one_pass is forced where it does not apply).
template <class S>
bool dora_takes_pass(const DoraWorkspace<S>& ws, DeviceView<const S> W, DeviceView<const S> A,
                     DeviceView<const S> X, Index r, const std::string& who) {
  if (ws.decode == DoraDecode::two_pass || X.rows == 0) return false;
  const bool ok = X.rows <= 16 && dora_pass_ok<device_t<S>>(as_device(W), as_device(A), as_device(X), r);
  if (!ok && ws.decode == DoraDecode::one_pass)
    fail("{}DoRA one-pass forward does not apply: needs a 16-bit scalar, r + T <= 32 (r = {}, T = {}), T <= 16 and "
         "rows of W, A, X on 16 bytes with in_features a multiple of 8 (in = {})",
         who, r, X.rows, W.cols);
  return ok;
}

/// Y from one pass over W (dora_pass), the norms and c into ws.norm and ws.c; with xa (the
/// fused path's Xp columns [in, in + rp)), s·X·Aᵀ and zeros there for the fused backward.
template <class S>
void dora_run_pass(const CudaContext& ctx, DeviceView<const S> W, DeviceView<const S> A, DeviceView<const S> B,
                   DeviceView<const S> X, double scaling, const float* magnitude, DeviceView<S> Y, DoraWorkspace<S>& ws,
                   DeviceView<S> xa = {}) {
  using T = device_t<S>;
  const Index out = W.rows, r = A.rows;
  if (ws.norm.rows() != out) ws.norm = DeviceMatrix<float>(out, 1);
  if (ws.c.rows() != out) ws.c = DeviceMatrix<float>(out, 1);
  if constexpr (sizeof(T) == 2)  // dora_takes_pass is false for float
    dora_pass<T>(ctx, as_device(W), as_device(A), as_device(X), r, reinterpret_cast<const T*>(B.data), B.ld,
                 static_cast<float>(scaling), magnitude, ws.norm.data(), ws.c.data(), as_device(Y), ws.pass_part,
                 ws.pass_sq, 0, DoraPassOptions{}, reinterpret_cast<T*>(xa.data), xa.ld, static_cast<int>(xa.cols));
}

/// ws.scaled = [[c⊙W, c⊙B], [A, 0]] from the fused block and ws.c.
template <class S, ScalingPolicy Sc>
void dora_build_scaled(const LowRankAdapter<S, cuda, Sc>& ad, const FusedWeight<S>& fw, DoraWorkspace<S>& ws) {
  using T = detail::device_t<S>;
  auto& ctx = ad.context();
  const Index out = ad.out_features(), in = ad.in_features(), r = ad.rank();
  const FusedLayout<S> L = fused_layout(fw);
  if (ws.scaled.out_features() != out || ws.scaled.in_features() != in || ws.scaled.rank() != r)
    ws.scaled = make_fused<S>(out, in, r);
  const T* src = reinterpret_cast<const T*>(L.data);
  T* dst = reinterpret_cast<T*>(fused_block(ws.scaled).data);
  const long ld = static_cast<long>(L.ld());
  if constexpr (sizeof(T) == 2) {
    if (ld % 8 == 0 && aligned(src, 16) && aligned(dst, 16)) {  // one vectorised pass over the whole block
      const long vectors = (out + L.rp()) * ld / 8;
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
  LORA_CUDA_CHECK(cudaMemcpyAsync(dst + out * ld, src + out * ld, static_cast<size_t>(L.rp() * ld) * sizeof(S),
                                  cudaMemcpyDeviceToDevice, ctx.stream()));
  ws.scaled_current = true;
}

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
  const detail::FusedLayout<S> L = detail::fused_layout(fw);
  const bool cached = ws.cache_norm && ws.norm_block == L.data && ws.norm_magnitude == magnitude.data &&
                      ws.c.rows() == out;
  if (L.out != out || L.in != in || L.r != r)
    detail::fail("{}fused block is for [{} x {}] r = {}, adapter is [{} x {}] r = {}", ad.who(), L.out, L.in, L.r,
                 out, in, r);
  detail::require(Xp.cols == in + L.rp(), ad.who(), "padded input Xp", Xp.rows, Xp.cols, Xp.rows, in + L.rp());
  detail::require(Y.rows == Xp.rows && Y.cols == out, ad.who(), "output Y", Y.rows, Y.cols, Xp.rows, out);
  const DeviceView<const S> X = DeviceView<const S>(Xp).col_block(0, in);
  if (!cached && dora_takes_pass(ws, L.W(), L.A(), X, r, ad.who())) {
    dora_run_pass(ctx, L.W(), L.A(), L.B(), X, ad.scaling(), magnitude.data, Y, ws, Xp.col_block(in, L.rp()));
    ws.norm_block = ws.cache_norm ? L.data : nullptr;
    ws.norm_magnitude = ws.cache_norm ? magnitude.data : nullptr;
    ws.scaled_current = false;
    return;
  }
  if (!cached) {
    dora_weight_norm(ad, fw, ws, magnitude.data);
    ws.norm_block = ws.cache_norm ? L.data : nullptr;
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

/// dst [cols × rows] = srcᵀ for src [rows × cols]: 32 × 32 tiles through shared memory (block 32 × 8).
template <class T>
__global__ void transpose_kernel(const T* __restrict__ src, long lds, int rows, int cols, T* __restrict__ dst,
                                 long ldd) {
  __shared__ T tile[32][33];
  const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[static_cast<long>(r) * lds + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int c = c0 + i, r = r0 + threadIdx.x;
    if (c < cols && r < rows) dst[static_cast<long>(c) * ldd + r] = tile[threadIdx.x][i];
  }
}

/// One warp per row of V [rows × cols] (float, ldv): n = ‖V_row‖, c = m / n, and
/// W_row = c·V_row rounded to T (DoRA's merge, one rounding); norm[row] = n.
template <class T>
__global__ void dora_merge_rows_kernel(const float* __restrict__ V, long ldv, int rows, int cols,
                                       const float* __restrict__ m, T* __restrict__ W, long ldw,
                                       float* __restrict__ norm) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* v = V + static_cast<long>(row) * ldv;
  float acc = 0.f;
  for (int k = lane; k < cols; k += 32) acc = fmaf(v[k], v[k], acc);
  acc = warp_sum<float>(acc);
  const float n = sqrtf(acc), c = m[row] / n;
  for (int k = lane; k < cols; k += 32) W[static_cast<long>(row) * ldw + k] = from_float<T>(c * v[k]);
  if (lane == 0) norm[row] = n;
}

/// W[i, j] = (n_i / m_i)·W[i, j] − D[i, j] in float, rounded once (DoRA's unmerge; D = s·B·A).
template <class T>
__global__ void dora_unmerge_kernel(T* __restrict__ W, long ldw, const float* __restrict__ D, long ldd, int rows,
                                    int cols, const float* __restrict__ n, const float* __restrict__ m) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(rows) * cols) return;
  const long r = i / cols, c = i % cols;
  W[r * ldw + c] = from_float<T>(n[r] / m[r] * to_float(W[r * ldw + c]) - D[r * ldd + c]);
}

}  // namespace detail

/// Gradients of a DoRA layer on the device (DoraGradients' twin): dA [r × in], dB [out × r]
/// and dm [out × 1] in float, dX [T × in] in S.
template <class S>
struct DeviceDoraGradients {
  DeviceMatrix<float> dA, dB, dm;
  DeviceMatrix<S> dX;
};

/// DoRA on an NVIDIA GPU: the member functions of DoraAdapter<S, cpu> with device views
/// in place of Eigen matrices. As with LowRankAdapter<S, cuda>, a product that CPU returns
/// has two forms here: one that writes a caller's buffer (no allocation), one that returns
/// a new DeviceMatrix. S is bfloat16, half or float; arithmetic in float. The base weight
/// is [out × in], or [in × out] when the LoRA adapter has fan_in_fan_out (as on the CPU: the
/// norms are per output feature, columns of that W; the plain forms transpose a copy of W
/// for the norms and merges; the fused path, like LowRankAdapter<S, cuda>::fuse, takes [out × in] only).
///
///   auto d = lora::DoraAdapter<lora::bfloat16, lora::cuda>::from_host(host_dora);
///   auto Y = d.apply(W, X);                      // (m ⊘ n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ)
///   auto g = d.backward(W, X, dY);               // g.dA, g.dB, g.dm, g.dX
///   auto n = d.merge(W);  d.unmerge(W, n);
///   // the fused path (as LowRankAdapter<S, cuda>): fw = d.fuse(W); d.apply(fw, Xp, Y); d.backward(fw, Xp, Y, dYp, …)
///
/// The fused path keeps per-adapter buffers (the scaled block, the norms): one adapter is
/// not for concurrent use from several host threads, like LowRankAdapter<S, cuda>'s scratch.
template <class Scalar, ScalingPolicy Scaling>
class DoraAdapter<Scalar, cuda, Scaling> {
 public:
  using scalar_type = Scalar;
  using device_type = cuda;
  using lora_type = LowRankAdapter<Scalar, cuda, Scaling>;
  using host_type = DoraAdapter<Scalar, cpu, Scaling>;
  using view = DeviceView<Scalar>;
  using cview = DeviceView<const Scalar>;
  using gradients = DeviceDoraGradients<Scalar>;

  /// Adopts a device LoRA adapter and a magnitude m [out × 1] (or [1 × out]) in float.
  DoraAdapter(lora_type lora, DeviceMatrix<float> magnitude) : lora_(std::move(lora)), m_(std::move(magnitude)) {
    if (m_.rows() * m_.cols() != lora_.out_features())
      detail::fail("{}DoRA magnitude has {} elements, expected out_features = {}", who(), m_.rows() * m_.cols(),
                   lora_.out_features());
  }
  /// Copies a CPU DoRA adapter (factors, alpha, scaling, magnitude) to the device.
  static DoraAdapter from_host(const host_type& h, std::shared_ptr<CudaContext> ctx = {}) {
    auto lora = lora_type::from_host(h.lora(), std::move(ctx));
    const Matrix<float> m = h.magnitude().template cast<float>();
    return DoraAdapter(std::move(lora), DeviceMatrix<float>::from_host(m));
  }
  /// The CPU DoRA adapter with the current device factors and magnitude.
  host_type to_host() const {
    const Matrix<float> m = m_.to_host();
    typename host_type::cvector v(lora_.out_features());
    for (Index i = 0; i < v.size(); ++i) v[i] = static_cast<typename host_type::compute_scalar>(m.data()[i]);
    return host_type(lora_.to_host(), std::move(v));
  }
  /// PEFT's initialisation: m = ‖W + s·B·A‖_row, so the layer starts equal to plain LoRA.
  static DoraAdapter from_weight(lora_type lora, cview W) {
    const Index out = lora.out_features();
    DoraAdapter d(std::move(lora), DeviceMatrix<float>(out, 1));
    d.m_ = d.weight_norm(W);
    return d;
  }

  const lora_type& lora() const { return lora_; }
  lora_type& lora() { return lora_; }
  /// m [out × 1] (or as given), float on the device. After writing it, invalidate_norm().
  DeviceView<const float> magnitude() const { return m_.view(); }
  DeviceView<float> magnitude() { return m_.view(); }
  Index in_features() const { return lora_.in_features(); }
  Index out_features() const { return lora_.out_features(); }
  Index rank() const { return lora_.rank(); }
  double scaling() const { return lora_.scaling(); }
  /// (in + out)·r + out.
  Index trainable_parameters() const { return lora_.trainable_parameters() + lora_.out_features(); }
  CudaContext& context() const { return lora_.context(); }
  std::string who() const { return lora_.who(); }

  /// n = ‖W + s·B·A‖_row [out × 1] (from ‖w_n‖², W·Aᵀ and A·Aᵀ: W + s·B·A is not formed).
  DeviceMatrix<float> weight_norm(cview W) const {
    check_weight(W);
    DeviceMatrix<float> n(out_features(), 1);
    const DeviceMatrix<Scalar> t = rows_copy(W);
    norms(rows_view(W, t), n.data(), nullptr);
    return n;
  }

  /// Y = (m ⊘ n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) for tokens X [T × in] into Y [T × out]; no dropout.
  void apply(cview W, cview X, view Y) const {
    check_weight(W);
    detail::check_cols(who(), "input X", X.cols, in_features());
    detail::require(Y.rows == X.rows && Y.cols == out_features(), who(), "output Y", Y.rows, Y.cols, X.rows,
                    out_features());
    const DeviceMatrix<Scalar> t = rows_copy(W);  // fan_in_fan_out: W as [out × in]
    const cview Wr = rows_view(W, t);
    if (detail::dora_takes_pass(ws_, Wr, lora_.A(), X, rank(), who())) {  // one read of W for the norms and Y
      detail::dora_run_pass(context(), Wr, lora_.A(), lora_.B(), X, scaling(), m_.data(), Y, ws_);
      return;
    }
    DeviceMatrix<float> n(out_features(), 1), c(out_features(), 1);
    norms(Wr, n.data(), c.data());
    lora_.apply(W, X, Y);
    scale_columns(Y, c.data());
  }
  DeviceMatrix<Scalar> apply(cview W, cview X) const {
    DeviceMatrix<Scalar> y(X.rows, out_features());
    apply(W, X, y.view());
    return y;
  }

  /// Gradients of apply(W, X) with n held constant (as DoraAdapter<S, cpu>::backward):
  /// with c = m ⊘ n and G = dY·diag(c), dX = G·W + s·(G·B)·A, dA = s·(G·B)ᵀ·X,
  /// dB = s·Gᵀ·(X·Aᵀ), dm = colsum(dY ⊙ (X·Vᵀ)) ⊘ n. G is rounded to S once.
  gradients backward(cview W, cview X, cview dY) const {
    detail::require(dY.rows == X.rows && dY.cols == out_features(), who(), "dY", dY.rows, dY.cols, X.rows,
                    out_features());
    check_weight(W);
    const Index T = X.rows, out = out_features();
    DeviceMatrix<float> n(out, 1), c(out, 1);
    {
      const DeviceMatrix<Scalar> t = rows_copy(W);
      norms(rows_view(W, t), n.data(), c.data());
    }
    DeviceMatrix<Scalar> G(T, out);
    if (T > 0)
      LORA_CUDA_CHECK(cudaMemcpy2DAsync(G.data(), out * sizeof(Scalar), dY.data, dY.ld * sizeof(Scalar),
                                        out * sizeof(Scalar), T, cudaMemcpyDeviceToDevice, stream()));
    scale_columns(G.view(), c.data());
    DeviceGradients<Scalar> lg = lora_.backward(W, X, G.view());
    gradients g{std::move(lg.dA), std::move(lg.dB), DeviceMatrix<float>(out, 1), std::move(lg.dX)};
    const DeviceMatrix<Scalar> Z = lora_.apply(W, X);  // X·Vᵀ
    column_dot(dY, Z.view(), n.data(), g.dm.data());
    return g;
  }

  /// W ← (m ⊘ n) ⊙ (W + s·B·A) row by row (PEFT's DoRA merge, float arithmetic, one rounding);
  /// returns n [out × 1], which unmerge needs.
  DeviceMatrix<float> merge(view W) const {
    check_weight(W);
    const Index out = out_features(), in = in_features();
    DeviceMatrix<float> n(out, 1);
    by_rows(W, [&](view Wr) {
      DeviceMatrix<float> V = adapted_weight(Wr);
      if (out > 0) {
        detail::dora_merge_rows_kernel<T><<<detail::ceil_div(out, 8), 256, 0, stream()>>>(
            V.data(), in, static_cast<int>(out), static_cast<int>(in), m_.data(), reinterpret_cast<T*>(Wr.data),
            Wr.ld, n.data());
        LORA_CUDA_CHECK_LAUNCH("dora_merge_rows_kernel");
      }
    });
    return n;
  }
  /// W ← W ⊘ (m ⊘ n) − s·B·A with the n returned by merge.
  void unmerge(view W, DeviceView<const float> n) const {
    check_weight(W);
    const Index out = out_features(), in = in_features();
    if (n.rows * n.cols != out)
      detail::fail("{}DoRA unmerge: weight norm has {} elements, expected {}", who(), n.rows * n.cols, out);
    DeviceMatrix<float> D(out, in);
    detail::gemm<Scalar, Scalar, float>(context(), false, false, out, in, rank(), static_cast<float>(scaling()),
                                        lora_.B(), lora_.A(), 0.f, D.view());
    if (out * in == 0) return;
    by_rows(W, [&](view Wr) {
      detail::dora_unmerge_kernel<T><<<detail::ceil_div(out * in, 256), 256, 0, stream()>>>(
          reinterpret_cast<T*>(Wr.data), Wr.ld, D.data(), in, static_cast<int>(out), static_cast<int>(in), n.data,
          m_.data());
      LORA_CUDA_CHECK_LAUNCH("dora_unmerge_kernel");
    });
  }
  /// The merged weight, W left as it is.
  DeviceMatrix<Scalar> merged_weight(cview W) const {
    check_weight(W);
    DeviceMatrix<Scalar> M(W.rows, W.cols);  // W's orientation
    if (M.size())
      LORA_CUDA_CHECK(cudaMemcpy2DAsync(M.data(), M.cols() * sizeof(Scalar), W.data, W.ld * sizeof(Scalar),
                                        W.cols * sizeof(Scalar), W.rows, cudaMemcpyDeviceToDevice, stream()));
    merge(M.view());
    return M;
  }

  // ---- the fused path (LowRankAdapter<S, cuda>'s FusedWeight, padded_input, padded_grad) ----

  /// The fused block [[W, B], [A, 0]]; refresh(fw) after A or B change, then invalidate_norm().
  FusedWeight<Scalar> fuse(cview W) const { return lora_.fuse(W); }
  void refresh(FusedWeight<Scalar>& fw) const {
    lora_.refresh(fw);
    invalidate_norm();
  }
  DeviceMatrix<Scalar> padded_input(Index tokens) const { return lora_.padded_input(tokens); }
  DeviceMatrix<Scalar> padded_grad(Index tokens) const { return lora_.padded_grad(tokens); }

  /// Inference with frozen A, B and m: keep the column scale c of the first fused apply and
  /// skip the norm pass (a read of W) on later calls with the same block and magnitude.
  void cache_norm(bool on) const {
    ws_.cache_norm = on;
    invalidate_norm();
  }
  /// Forget the cached norms (after new values of m, A or B, or a new W).
  void invalidate_norm() const { ws_.invalidate_norm(); }
  /// How forwards of ≤ 16 tokens run (DoraDecode; automatic by default): the plain and the
  /// fused apply both follow it.
  void decode_path(DoraDecode how) const { ws_.decode = how; }
  DoraDecode decode_path() const { return ws_.decode; }
  /// The row norms n and the column scale c = m ⊘ n of the last fused apply.
  DeviceView<const float> last_norm() const { return ws_.norm.view(); }

  /// Fused forward: Y = (m ⊘ n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) with Xp = [X | scratch] (padded_input).
  /// Up to 16 tokens scale Y's columns; more tokens run the LoRA fused forward on the scaled
  /// block [[c⊙W, c⊙B], [A, 0]].
  void apply(const FusedWeight<Scalar>& fw, view Xp, view Y) const {
    detail::dora_apply(lora_, fw, DeviceView<const float>(m_.view()), Xp, Y, ws_);
  }
  /// Gradients of the fused apply (W frozen, n detached): Y is apply's output, dYp = [dY | scratch]
  /// (padded_grad); writes dX [T × in] and dA [r × in], dB [out × r], dm [out] in float.
  void backward(const FusedWeight<Scalar>& fw, cview Xp, cview Y, view dYp, view dX, DeviceView<float> dA,
                DeviceView<float> dB, DeviceView<float> dm) const {
    detail::dora_backward(lora_, fw, DeviceView<const float>(m_.view()), Xp, Y, dYp, dX, dA, dB, dm, ws_);
  }

 private:
  using T = detail::device_t<Scalar>;
  cudaStream_t stream() const { return context().stream(); }
  void check_weight(cview W) const {
    if (lora_.fan_in_fan_out())
      detail::check_shape(who(), "base weight W (fan_in_fan_out)", W.rows, W.cols, in_features(), out_features());
    else
      detail::check_shape(who(), "base weight W", W.rows, W.cols, out_features(), in_features());
  }
  /// Wᵀ [out × in] when W is stored [in × out] (fan_in_fan_out); an empty matrix otherwise.
  DeviceMatrix<Scalar> rows_copy(cview W) const {
    if (!lora_.fan_in_fan_out()) return {};
    DeviceMatrix<Scalar> t(W.cols, W.rows);
    transpose(W, t.view());
    return t;
  }
  cview rows_view(cview W, const DeviceMatrix<Scalar>& t) const { return lora_.fan_in_fan_out() ? cview(t.view()) : W; }
  /// dst = srcᵀ.
  void transpose(cview src, view dst) const {
    if (src.rows * src.cols == 0) return;
    detail::transpose_kernel<T><<<dim3(detail::ceil_div(src.cols, 32), detail::ceil_div(src.rows, 32)), dim3(32, 8), 0,
                                  stream()>>>(reinterpret_cast<const T*>(src.data), src.ld, static_cast<int>(src.rows),
                                              static_cast<int>(src.cols), reinterpret_cast<T*>(dst.data), dst.ld);
    LORA_CUDA_CHECK_LAUNCH("transpose_kernel");
  }
  /// f(W as [out × in]) and, with fan_in_fan_out, the result transposed back into W.
  template <class F>
  void by_rows(view W, F&& f) const {
    if (!lora_.fan_in_fan_out()) return f(W);
    DeviceMatrix<Scalar> t = rows_copy(W);
    f(t.view());
    transpose(t.view(), W);
  }
  /// n (and c = m ⊘ n when c is given) from ‖w_n‖², P = W·Aᵀ and G = A·Aᵀ (float), W [out × in].
  void norms(cview W, float* n, float* c) const {
    detail::check_shape(who(), "base weight W", W.rows, W.cols, out_features(), in_features());
    const Index out = out_features(), in = in_features(), r = rank();
    DeviceMatrix<float> wn2(out, 1), PG(out + r, r);
    if (out == 0) return;
    detail::row_sqnorm_kernel<T><<<detail::ceil_div(out, 8), 256, 0, stream()>>>(
        reinterpret_cast<const T*>(W.data), W.ld, static_cast<int>(out), static_cast<int>(in), wn2.data());
    LORA_CUDA_CHECK_LAUNCH("row_sqnorm_kernel");
    auto pg = PG.view();
    detail::gemm<Scalar, Scalar, float>(context(), false, true, out, r, in, 1.f, W, lora_.A(), 0.f,
                                        pg.row_block(0, out));
    detail::gemm<Scalar, Scalar, float>(context(), false, true, r, r, in, 1.f, lora_.A(), lora_.A(), 0.f,
                                        pg.row_block(out, r));
    const cview B = lora_.B();
    detail::dora_norm_from_pg<T>(stream(), wn2.data(), PG.data(), reinterpret_cast<const T*>(B.data), B.ld, out, r,
                                 static_cast<float>(scaling()), m_.data(), n, c);
  }
  /// V = W + s·B·A in float [out × in], W [out × in].
  DeviceMatrix<float> adapted_weight(cview W) const {
    const Index out = out_features(), in = in_features();
    DeviceMatrix<float> V(out, in);
    if (out * in == 0) return V;
    detail::to_float_kernel<T><<<detail::ceil_div(out * in, 256), 256, 0, stream()>>>(
        reinterpret_cast<const T*>(W.data), W.ld, V.data(), in, static_cast<int>(out), static_cast<int>(in));
    LORA_CUDA_CHECK_LAUNCH("to_float_kernel");
    detail::gemm<Scalar, Scalar, float>(context(), false, false, out, in, rank(), static_cast<float>(scaling()),
                                        lora_.B(), lora_.A(), 1.f, V.view());
    return V;
  }
  void scale_columns(view Y, const float* c) const {
    if (Y.rows * Y.cols == 0) return;
    detail::scale_cols_kernel<T><<<detail::ceil_div(Y.rows * Y.cols, 256), 256, 0, stream()>>>(
        reinterpret_cast<T*>(Y.data), Y.ld, static_cast<int>(Y.rows), static_cast<int>(Y.cols), c);
    LORA_CUDA_CHECK_LAUNCH("scale_cols_kernel");
  }
  /// dm[n] = Σ_t dY[t, n]·Z[t, n] / d[n].
  void column_dot(cview dY, cview Z, const float* d, float* dm) const {
    const Index out = out_features(), tokens = dY.rows;
    LORA_CUDA_CHECK(cudaMemsetAsync(dm, 0, static_cast<size_t>(out) * sizeof(float), stream()));
    if (out == 0) return;
    const int per_slice = 256;
    if (tokens > 0) {
      detail::column_dot_kernel<T><<<dim3(detail::ceil_div(out, 256), detail::ceil_div(tokens, per_slice)), 256, 0,
                                     stream()>>>(reinterpret_cast<const T*>(dY.data), dY.ld,
                                                 reinterpret_cast<const T*>(Z.data), Z.ld, static_cast<int>(tokens),
                                                 static_cast<int>(out), per_slice, dm);
      LORA_CUDA_CHECK_LAUNCH("column_dot_kernel");
    }
    detail::divide_kernel<<<detail::ceil_div(out, 256), 256, 0, stream()>>>(dm, d, static_cast<int>(out));
    LORA_CUDA_CHECK_LAUNCH("divide_kernel");
  }

  lora_type lora_;
  DeviceMatrix<float> m_;
  mutable detail::DoraWorkspace<Scalar> ws_;
};

}  // namespace lora
