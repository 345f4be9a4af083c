#pragma once
// LowRankAdapter<S, lora::cuda, Scaling>: the adapter's factors in device
// memory; forward, apply, backward and merge through cuBLAS (tensor cores,
// float accumulation) and the fused decode kernels. See docs/cuda.md.

#include <lora/core/adapter.hpp>
#include <lora/cuda/grad.cuh>
#include <lora/cuda/kernels.cuh>
#include <lora/cuda/lt.hpp>
#include <lora/cuda/plan.hpp>
#include <lora/cuda/ring.cuh>
#include <lora/cuda/runtime.hpp>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// How the fused forward (LowRankAdapter<S, cuda>::apply(FusedWeight, Xp, Y)) forms Y (each
/// writes Y in full):
/// concat_k:   Y = [X | XA | 0]·[W | B | 0]ᵀ, one GEMM with K = in + rp, after XA = s·X·Aᵀ;
/// accumulate: XA, then Y = XA·Bᵀ (a K = r GEMM), then Y = X·Wᵀ + Y (the base GEMM with
///             beta = 1), so the big GEMM keeps its K = in shape;
/// stacked:    [X·Wᵀ | X·Aᵀ] from one GEMM over the stacked rows [W; A] (N = out + r), then
///             one small kernel adds s·(X·Aᵀ)·Bᵀ to the first block and leaves s·X·Aᵀ in Xp:
///             one pass over W and X, for few tokens (at most stacked_max_tokens);
/// stream:     one kernel on tensor cores reads [W; A] once and adds s·(X·Aᵀ)·Bᵀ in the same
///             launch (detail::stream_forward_kernel), for at most 32 tokens of bf16/half with
///             r ≤ 64 and 16-byte aligned rows; elsewhere it falls back to stacked, then concat_k;
/// ring:       one kernel streams W once through per-warp copy rings, with XA computed in the
///             same launch (detail::dense_ring_kernel, per block or per cluster of blocks), for
///             1…64 tokens of bf16/half (above 16 in groups of 16, each group's blocks
///             reading W: from L2 after the first), in % 256 == 0, in ≤ 4096,
///             ⌈r / 16⌉ ≤ in / 256 and 16-byte aligned rows; elsewhere it falls back to
///             stacked, then concat_k;
/// automatic:  the fastest of these (with each cuBLASLt algorithm the heuristic offers for the
///             big GEMM, and the CUDA-core decode kernels for ≤ 4 tokens), chosen once per shape
///             by the context's planner (LowRankAdapter::plan, lora/cuda/plan.hpp).
/// concat_k and accumulate still take the decode kernels for ≤ 4 tokens.
/// automatic is the default; FusedWeight::set_strategy fixes another.
enum class FusedForward { automatic, concat_k, accumulate, stacked, stream, ring };

/// r rounded up to a multiple of 64: the rank columns of FusedWeight and padded_input.
constexpr Index fused_rank_pad(Index r) { return (r + 63) / 64 * 64; }

/// The most tokens the stacked forward is planned for (its [T × (out + rp)] scratch).
constexpr Index stacked_max_tokens = 256;

template <class S>
class FusedWeight;

namespace detail {
/// FusedWeight's layout: the frozen base weight W [out × in] and an adapter's factors in one
/// device block [[W, B, 0], [A, 0, 0], [0, 0, 0]] of shape [(out + rp) × (in + rp)], where
/// rp = fused_rank_pad(r) rounds r up to a multiple of 64 with zero rows and columns,
/// so that one GEMM serves both paths:
///   forward   Y  = [X | s·X·Aᵀ | 0] · [W | B | 0]ᵀ   (K = in + rp)
///   backward  dX = [dY | s·dY·B | 0] · [W ; A ; 0]  (K = out + rp)
/// The padding keeps the GEMMs' K and leading dimensions multiples of 64 (cuBLAS picks
/// slower kernels for some K; docs/performance.md). These views are for the adapter's code
/// and for tests and benchmarks that run its parts; they are not part of the API.
template <class S>
struct FusedLayout {
  const S* data = nullptr;  ///< the block's first element (row-major, leading dimension ld())
  Index out = 0, in = 0, r = 0;

  Index rp() const { return fused_rank_pad(r); }
  Index ld() const { return in + rp(); }
  /// The whole block, [(out + rp) × (in + rp)].
  DeviceView<const S> block() const { return {data, out + rp(), in + rp(), ld()}; }
  DeviceView<const S> W() const { return {data, out, in, ld()}; }
  DeviceView<const S> A() const { return {data + out * ld(), r, in, ld()}; }
  /// A with rp − r zero rows below it, [rp × in].
  DeviceView<const S> A_padded() const { return {data + out * ld(), rp(), in, ld()}; }
  DeviceView<const S> B() const { return {data + in, out, r, ld()}; }
  /// [W | B | 0], [out × (in + rp)]: the forward operand.
  DeviceView<const S> wide() const { return {data, out, in + rp(), ld()}; }
  /// [B | 0], [out × rp].
  DeviceView<const S> B_padded() const { return {data + in, out, rp(), ld()}; }
  /// [W ; A], [(out + r) × in]: the input-gradient operand, and the stacked forward's.
  DeviceView<const S> tall() const { return {data, out + r, in, ld()}; }
  /// [W ; A ; 0], [(out + rp) × in]: the input-gradient operand for a padded dY.
  DeviceView<const S> tall_padded() const { return {data, out + rp(), in, ld()}; }
};

/// The library's access to FusedWeight's storage.
struct FusedAccess {
  /// An uninitialised block for [out × in] weights and rank r.
  template <class S>
  static FusedWeight<S> make(Index out, Index in, Index r) {
    FusedWeight<S> fw;
    fw.block_ = DeviceMatrix<S>(out + fused_rank_pad(r), in + fused_rank_pad(r));
    fw.out_ = out;
    fw.in_ = in;
    fw.r_ = r;
    return fw;
  }
  template <class S>
  static FusedLayout<S> layout(const FusedWeight<S>& fw) {
    return {fw.block_.data(), fw.out_, fw.in_, fw.r_};
  }
  template <class S>
  static DeviceView<S> block(FusedWeight<S>& fw) {
    return fw.block_.view();
  }
};

/// The views of fw's block (W, A, B, wide, tall, … and their leading dimension).
template <class S>
FusedLayout<S> fused_layout(const FusedWeight<S>& fw) {
  return FusedAccess::layout(fw);
}
/// fw's whole block, writable, [(out + rp) × (in + rp)].
template <class S>
DeviceView<S> fused_block(FusedWeight<S>& fw) {
  return FusedAccess::block(fw);
}
/// An uninitialised fused block for [out × in] weights and rank r (DoRA's scaled copy).
template <class S>
FusedWeight<S> make_fused(Index out, Index in, Index r) {
  return FusedAccess::make<S>(out, in, r);
}
}  // namespace detail

/// The frozen base weight and an adapter's factors in one device block, as
/// LowRankAdapter<S, cuda>::fuse(W) builds it; pass it to that adapter's refresh, plan, apply
/// and backward. Its layout is the adapter's (docs/cuda.md); a handle holds the block and
/// the forward strategy, and moves but does not copy.
///
///   auto fw = ad.fuse(W);
///   fw.set_strategy(lora::FusedForward::stacked);   // optional: bypass the planner
template <class S>
class FusedWeight {
 public:
  /// An empty handle (shape 0); assign one from fuse().
  FusedWeight() = default;

  Index out_features() const { return out_; }
  Index in_features() const { return in_; }
  Index rank() const { return r_; }
  /// The fused forward's strategy: automatic (the planner's choice per shape; the default) or
  /// one fixed strategy, which bypasses the planner (for tests and benchmarks).
  FusedForward strategy() const { return forward_; }
  void set_strategy(FusedForward how) { forward_ = how; }

 private:
  friend struct detail::FusedAccess;
  DeviceMatrix<S> block_;
  Index out_ = 0, in_ = 0, r_ = 0;
  FusedForward forward_ = FusedForward::automatic;
};

/// Gradients on the device: dA [r × in] and dB [out × r] in float, dX [T × in] in S.
template <class S>
struct DeviceGradients {
  DeviceMatrix<float> dA, dB;
  DeviceMatrix<S> dX;
};

namespace detail {
template <class S>
DeviceView<const device_t<S>> as_device(DeviceView<const S> v) {
  return {reinterpret_cast<const device_t<S>*>(v.data), v.rows, v.cols, v.ld};
}
template <class S>
DeviceView<device_t<S>> as_device(DeviceView<S> v) {
  return {reinterpret_cast<device_t<S>*>(v.data), v.rows, v.cols, v.ld};
}

/// One gemv_kernel launch: Y = scale·(X·Mᵀ + Xt·Mtᵀ) for tokens ≤ TMAX, ROWS rows per block;
/// with `pdl` it is a programmatic dependent launch (it waits for Xt only before the tail).
template <class T, int TMAX, int ROWS>
void launch_gemv(const CudaContext& ctx, DeviceView<const T> X, DeviceView<const T> M, DeviceView<const T> Xt,
                 DeviceView<const T> Mt, bool pdl, DeviceView<T> Y, float scale) {
  launch_maybe_pdl(gemv_kernel<T, TMAX, ROWS>, dim3(ceil_div(M.rows, ROWS)), dim3(decode_threads), 0, ctx.stream(),
                   pdl, X.data, X.ld, static_cast<int>(X.rows), static_cast<int>(X.cols), M.data, M.ld,
                   static_cast<int>(M.rows), Xt.data, Xt.ld, static_cast<int>(Xt.cols), Mt.data, Mt.ld, pdl, Y.data,
                   Y.ld, scale);
}

/// True when X (tokens ≤ 16) and M allow the 16-byte loads of gemv_kernel.
template <class S>
bool gemv_ok(DeviceView<const S> X, DeviceView<const S> M) {
  constexpr long V = 16 / sizeof(S);
  return X.rows >= 1 && X.rows <= 16 && X.cols % V == 0 && X.ld % V == 0 && M.ld % V == 0 &&
         aligned(X.data, 16) && aligned(M.data, 16);
}

/// XA = s·X·Aᵀ (A [r × K]; or s·X·A for A [K × r] with a_rows_are_k): the decode
/// kernel for tokens ≤ 4, cuBLAS otherwise. The decode kernel runs r blocks, one per row of
/// A, each reading all of X: its time grows with the tokens and passes cuBLAS's near 5.
template <class S>
void compute_xa(const CudaContext& ctx, DeviceView<const S> X, DeviceView<const S> A, bool a_rows_are_k,
                DeviceView<S> XA, float s) {
  using T = device_t<S>;
  const Index T_ = X.rows, K = X.cols, r = XA.cols;
  if (!a_rows_are_k && T_ <= 4 && gemv_ok<S>(X, A)) {
    const DeviceView<const T> none{};
    if (T_ == 1)
      launch_gemv<T, 1, 1>(ctx, as_device(X), as_device(A), none, none, false, as_device(XA), s);
    else
      launch_gemv<T, 4, 1>(ctx, as_device(X), as_device(A), none, none, false, as_device(XA), s);
    return;
  }
  gemm<S, S, S>(ctx, false, !a_rows_are_k, T_, r, K, s, X, A, 0.f, XA);
}

/// Y = X·Wᵀ + (s·X·Aᵀ)·Bᵀ for tokens ≤ 4 on CUDA cores: XA = s·X·Aᵀ (r blocks),
/// then one pass over W with the rank-r tail, launched as a programmatic
/// dependent so that it streams W while XA is computed. Returns false (nothing
/// launched) when the layout does not allow 16-byte loads.
template <class S>
bool decode_apply(const CudaContext& ctx, DeviceView<const S> X, DeviceView<const S> W, DeviceView<const S> A,
                  DeviceView<const S> B, DeviceView<S> XA, DeviceView<S> Y, float s) {
  using T = device_t<S>;
  if (X.rows > 4 || !gemv_ok<S>(X, W) || !gemv_ok<S>(X, A)) return false;
  compute_xa<S>(ctx, X, A, false, XA, s);
  const DeviceView<const S> xa = XA;
  if (X.rows == 1)
    launch_gemv<T, 1, 4>(ctx, as_device(X), as_device(W), as_device(xa), as_device(B), true, as_device(Y), 1.f);
  else
    launch_gemv<T, 4, 4>(ctx, as_device(X), as_device(W), as_device(xa), as_device(B), true, as_device(Y), 1.f);
  return true;
}

/// The fused forward's paths (PlanChoice::path): FusedForward's strategies, the stacked one
/// with N = out + r or out + rp, the decode kernels, and the one-launch stream kernel.
/// stream takes tiles of 16 rows per block, stream_wide of 32 (each X fragment serves two).
enum class FusedPath : int { accumulate, concat_k, stacked, stacked_padded, decode, stream, stream_wide, ring,
                             ring_cluster };
/// Blocks per thread-block cluster of FusedPath::ring_cluster.
constexpr int fused_ring_cluster = 4;

/// The planner's key of the fused forward for these operands.
template <class S>
PlanKey fused_forward_key(const FusedWeight<S>& fw, DeviceView<const S> Xp, DeviceView<const S> Y) {
  const FusedLayout<S> L = fused_layout(fw);
  return {plan_fused_forward, static_cast<int>(cuda_data_type<S>()), Xp.rows, L.out, L.in + L.rp(),
          Xp.ld, L.ld(), Y.ld, L.r};
}
/// The planner's key of the fused backward's dX GEMM (dYp with out + gp columns).
template <class S>
PlanKey fused_backward_key(const FusedWeight<S>& fw, DeviceView<const S> dYp, Index gp, DeviceView<const S> dX) {
  const FusedLayout<S> L = fused_layout(fw);
  return {plan_fused_backward_dx, static_cast<int>(cuda_data_type<S>()), dYp.rows, L.in, L.out + gp,
          dYp.ld, L.ld(), dX.ld, L.r};
}

/// The stacked forward's epilogue as a programmatic dependent launch: Y = C[:, :out] +
/// s·C[:, out:out+r]·Bᵀ and XA = [s·C[:, out:out+r] | 0] ([T × rp]). B's rows must have rp
/// readable columns (the fused block's B: zeros past r). stacked_epilogue_vec_kernel (B's rows in
/// 16-byte loads, up to 16 tokens per block) when B's layout allows it and `vectorised`, else
/// stacked_epilogue_kernel (scalar loads, 4 tokens per block).
template <class T>
void launch_stacked_epilogue(const CudaContext& ctx, DeviceView<const T> C, Index out, Index r, Index rp,
                             DeviceView<const T> B, float s, DeviceView<T> Y, DeviceView<T> XA,
                             bool vectorised = true) {
  constexpr long V = 16 / sizeof(T);
  const int RB = r <= 16 ? 16 : r <= 32 ? 32 : 64;
  const bool vec = vectorised && aligned(B.data, 16) && B.ld % V == 0 && rp >= RB;
  auto go = [&](auto kernel, int tokens_per_block, int outputs_per_thread = 1) {
    const dim3 grid(ceil_div(out, stacked_threads * outputs_per_thread), ceil_div(C.rows, tokens_per_block));
    launch_maybe_pdl(kernel, grid, dim3(stacked_threads), 0, ctx.stream(), true, C.data, C.ld,
                     static_cast<int>(C.rows), static_cast<int>(out), static_cast<int>(r), static_cast<int>(rp),
                     B.data, B.ld, s, Y.data, Y.ld, XA.data, XA.ld);
  };
  if (vec) {
    auto by_tokens = [&](auto rb) {
      constexpr int R = decltype(rb)::value;
      if (C.rows <= 4)
        go(stacked_epilogue_vec_kernel<T, R, 4>, 4);
      else if (C.rows <= 32)
        go(stacked_epilogue_vec_kernel<T, R, 8>, 8);
      else  // (one output per thread: two were slower on the H200, docs/performance.md)
        go(stacked_epilogue_vec_kernel<T, R, 16>, 16);
    };
    if (RB == 16)
      by_tokens(std::integral_constant<int, 16>{});
    else if (RB == 32)
      by_tokens(std::integral_constant<int, 32>{});
    else
      by_tokens(std::integral_constant<int, 64>{});
  } else if (r <= 16) {
    go(stacked_epilogue_kernel<T, 16>, stacked_tokens);
  } else if (r <= 32) {
    go(stacked_epilogue_kernel<T, 32>, stacked_tokens);
  } else {
    go(stacked_epilogue_kernel<T, 64>, stacked_tokens);
  }
}

}  // namespace detail

/// A LoRA adapter on an NVIDIA GPU. Scalar is bfloat16, half or float
/// (arithmetic in float; bfloat16/half GEMMs on tensor cores).
///
///   auto host = lora::LowRankAdapter<lora::bfloat16>(4096, 4096, 16, 32);   // ... initialised
///   auto ad = lora::LowRankAdapter<lora::bfloat16, lora::cuda>::from_host(host);
///   auto fw = ad.fuse(W);                       // [[W, B], [A, 0]] on the device
///   ad.plan(fw, tokens);                        // optional: choose kernels now, not on first use
///   auto Xp = ad.padded_input(tokens);          // X in columns [0, in)
///   ad.apply(fw, Xp, Y);                        // Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ
template <class Scalar, ScalingPolicy Scaling>
class LowRankAdapter<Scalar, cuda, Scaling> {
  static_assert(is_device_scalar_v<Scalar>, "LowRankAdapter<S, cuda>: S must be float, bfloat16 or half");

 public:
  using scalar_type = Scalar;
  using device_type = cuda;
  using scaling_policy = Scaling;
  using view = DeviceView<Scalar>;
  using cview = DeviceView<const Scalar>;
  using host_adapter = LowRankAdapter<Scalar, cpu, Scaling>;

  /// A = B = 0 on the device. Throws lora::error (AdapterSpec::validate: the CPU adapter's
  /// checks and messages) unless 1 ≤ r ≤ min(in, out), alpha is finite and dropout in [0, 1).
  LowRankAdapter(Index in_features, Index out_features, Index rank, double alpha, AdapterOptions opts = {},
                 Scaling policy = {}, std::shared_ptr<CudaContext> ctx = {})
      : host_(in_features, out_features, rank, alpha, opts, policy),
        ctx_(ctx ? std::move(ctx) : CudaContext::thread_default()),
        A_(rank, in_features),
        B_(out_features, rank) {
    LORA_CUDA_CHECK(cudaMemsetAsync(A_.data(), 0, A_.size() * sizeof(Scalar), ctx_->stream()));
    LORA_CUDA_CHECK(cudaMemsetAsync(B_.data(), 0, B_.size() * sizeof(Scalar), ctx_->stream()));
  }

  /// Copies a CPU adapter (factors, alpha, scaling, multiplier, options) to the device.
  static LowRankAdapter from_host(const host_adapter& h, std::shared_ptr<CudaContext> ctx = {}) {
    LowRankAdapter d(h.in_features(), h.out_features(), h.rank(), h.alpha(),
                     AdapterOptions{h.fan_in_fan_out(), h.dropout(), h.name()}, h.policy(), std::move(ctx));
    d.host_.rescale(h.multiplier());
    d.ctx_->synchronize();
    d.A_.upload(h.A());
    d.B_.upload(h.B());
    return d;
  }
  /// The CPU adapter with the current device factors.
  host_adapter to_host() const {
    host_adapter h = host_;
    h.set_A(A_.to_host());
    h.set_B(B_.to_host());
    return h;
  }

  Index in_features() const { return host_.in_features(); }
  Index out_features() const { return host_.out_features(); }
  Index rank() const { return host_.rank(); }
  double alpha() const { return host_.alpha(); }
  bool fan_in_fan_out() const { return host_.fan_in_fan_out(); }
  const std::string& name() const { return host_.name(); }
  /// s = multiplier · Scaling::factor(alpha, r).
  double scaling() const { return host_.scaling(); }
  /// The post-hoc strength multiplier set by rescale() (1 unless it was called).
  double multiplier() const { return host_.multiplier(); }
  const Scaling& policy() const { return host_.policy(); }
  void set_alpha(double a) { host_.set_alpha(a); }
  void rescale(double f) { host_.rescale(f); }
  Index trainable_parameters() const { return host_.trainable_parameters(); }
  CudaContext& context() const { return *ctx_; }

  cview A() const { return A_.view(); }
  cview B() const { return B_.view(); }
  view A() { return A_.view(); }
  view B() { return B_.view(); }
  void set_A(const MatrixRef<Scalar>& A) {
    spec().check_shape("lora_A", A.rows(), A.cols(), rank(), in_features());
    ctx_->synchronize();
    A_.upload(A);
  }
  void set_B(const MatrixRef<Scalar>& B) {
    spec().check_shape("lora_B", B.rows(), B.cols(), out_features(), rank());
    ctx_->synchronize();
    B_.upload(B);
  }

  /// ΔW = s·B·A, [out × in] ([in × out] with fan_in_fan_out), rounded to Scalar.
  DeviceMatrix<Scalar> delta_weight() const {
    const Index o = out_features(), i = in_features(), r = rank();
    DeviceMatrix<Scalar> d = fan_in_fan_out() ? DeviceMatrix<Scalar>(i, o) : DeviceMatrix<Scalar>(o, i);
    if (fan_in_fan_out())
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, true, true, i, o, r, static_cast<float>(scaling()), A(), B(), 0.f,
                                           d.view());
    else
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, false, o, i, r, static_cast<float>(scaling()), B(), A(),
                                           0.f, d.view());
    return d;
  }

  /// s·(X·Aᵀ)·Bᵀ for X [T × in]: the adapter's contribution (evaluation mode).
  DeviceMatrix<Scalar> forward(cview X) const {
    check_input(X);
    DeviceMatrix<Scalar> xa(X.rows, rank()), y(X.rows, out_features());
    detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, X.rows, rank(), in_features(),
                                         static_cast<float>(scaling()), X, A(), 0.f, xa.view());
    detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, X.rows, out_features(), rank(), 1.f, xa.view(), B(),
                                         0.f, y.view());
    return y;
  }

  /// Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ (X·W + … with fan_in_fan_out) with separate W, X:
  /// tokens ≤ 4 take the fused decode kernels, larger batches s·X·Aᵀ, the base
  /// GEMM, and the rank-r GEMM accumulating into Y with beta = 1.
  void apply(cview W, cview X, view Y) const {
    check_weight(W);
    check_input(X);
    detail::require(Y.rows == X.rows && Y.cols == out_features(), who(), "output Y", Y.rows, Y.cols, X.rows,
                    out_features());
    const float s = static_cast<float>(scaling());
    view xa = scratch(X.rows, rank());
    if (!fan_in_fan_out() && detail::decode_apply<Scalar>(*ctx_, X, W, A(), B(), xa, Y, s)) return;
    detail::compute_xa<Scalar>(*ctx_, X, A(), false, xa, s);
    detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, !fan_in_fan_out(), X.rows, out_features(), in_features(), 1.f,
                                         X, W, 0.f, Y);
    detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, X.rows, out_features(), rank(), 1.f, cview(xa), B(),
                                         1.f, Y);
  }
  DeviceMatrix<Scalar> apply(cview W, cview X) const {
    DeviceMatrix<Scalar> y(X.rows, out_features());
    apply(W, X, y.view());
    return y;
  }

  /// The fused block [[W, B], [A, 0]] for W [out × in] (see FusedWeight).
  FusedWeight<Scalar> fuse(cview W) const {
    if (fan_in_fan_out())
      detail::fail("{}fuse: fan_in_fan_out weights [in x out] are not supported; pass W transposed to [out x in]",
                   who());
    check_weight(W);
    FusedWeight<Scalar> fw = detail::make_fused<Scalar>(out_features(), in_features(), rank());
    const view blk = detail::fused_block(fw);
    LORA_CUDA_CHECK(cudaMemsetAsync(blk.data, 0, static_cast<std::size_t>(blk.rows * blk.cols) * sizeof(Scalar),
                                    ctx_->stream()));
    copy(W, blk.row_block(0, out_features()).col_block(0, in_features()));
    refresh(fw);
    return fw;
  }
  /// Copies the current A and B into a fused block (after an optimiser step).
  void refresh(FusedWeight<Scalar>& fw) const {
    if (fw.out_features() != out_features() || fw.in_features() != in_features() || fw.rank() != rank())
      detail::fail("{}refresh: fused block is for [{} x {}] r = {}, adapter is [{} x {}] r = {}", who(),
                   fw.out_features(), fw.in_features(), fw.rank(), out_features(), in_features(), rank());
    const view blk = detail::fused_block(fw);
    copy(A(), blk.row_block(out_features(), rank()).col_block(0, in_features()));
    copy(B(), blk.row_block(0, out_features()).col_block(in_features(), rank()));
  }

  /// A [T × (in + rp)] buffer for the fused path (rp = fused_rank_pad(r)): X goes in
  /// columns [0, in); apply() writes s·X·Aᵀ into the first r of the last rp columns
  /// (backward reads it there) and zeros after them (not the decode kernels at ≤ 4 tokens).
  DeviceMatrix<Scalar> padded_input(Index tokens) const {
    return DeviceMatrix<Scalar>(tokens, in_features() + fused_rank_pad(rank()));
  }
  /// A [T × (out + rp)] buffer for dY in the fused backward (rp = fused_rank_pad(r)): dY in
  /// columns [0, out); backward() writes s·dY·B and zeros into the last rp columns.
  DeviceMatrix<Scalar> padded_grad(Index tokens) const {
    return DeviceMatrix<Scalar>(tokens, out_features() + fused_rank_pad(rank()));
  }

  /// Chooses the fused forward's strategy and GEMM algorithms and the backward's dX GEMM
  /// algorithm for `tokens` tokens, by timing the candidates on buffers shaped as
  /// padded_input(tokens), padded_grad(tokens), Y [tokens × out] and dX [tokens × in], and
  /// sizes the context's scratch; synchronises. The choices live in the context's planner
  /// (lora/cuda/plan.hpp), keyed by shape, so every adapter of this shape on the context
  /// shares them. Afterwards apply(fw, Xp, Y) and backward(fw, Xp, dYp, dX, dA, dB) for such
  /// buffers allocate nothing and never synchronise: a CUDA graph can capture them. A shape
  /// not planned is planned on its first apply/backward, or, while the stream is being
  /// captured, runs the untimed defaults (decode kernels or concat_k through cublasGemmEx).
  void plan(const FusedWeight<Scalar>& fw, Index tokens) const {
    if (tokens < 1) detail::fail("{}plan: tokens must be at least 1, got {}", who(), tokens);
    if (detail::capturing(*ctx_)) detail::fail("{}plan: called while the stream is being captured", who());
    const Index in = in_features(), out = out_features(), r = rank();
    auto Xp = padded_input(tokens), dYp = padded_grad(tokens);
    DeviceMatrix<Scalar> Y(tokens, out), dX(tokens, in);
    DeviceMatrix<float> dA(r, in), dB(out, r);
    for (view v : {Xp.view(), dYp.view()}) {
      detail::fill_hash_kernel<detail::device_t<Scalar>><<<264, 256, 0, ctx_->stream()>>>(
          reinterpret_cast<detail::device_t<Scalar>*>(v.data), v.rows, v.cols, v.ld);
      LORA_CUDA_CHECK_LAUNCH("fill_hash_kernel");
    }
    apply(fw, Xp.view(), Y.view());
    backward(fw, Xp.view(), dYp.view(), dX.view(), dA.view(), dB.view());
    ctx_->synchronize();
  }

  /// Fused forward: Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ with Xp = [X | scratch] (padded_input); leaves
  /// s·X·Aᵀ in Xp's columns [in, in + r) for backward. fw.strategy() picks the strategy
  /// (FusedForward); automatic looks up the planner's choice for this shape (plan()).
  void apply(const FusedWeight<Scalar>& fw, view Xp, view Y) const {
    check_fused(fw, Xp, Y);
    using detail::FusedPath;
    switch (fw.strategy()) {
      case FusedForward::concat_k: return fused_forward(fw, Xp, Y, {static_cast<int>(FusedPath::concat_k)}, true);
      case FusedForward::accumulate: return fused_forward(fw, Xp, Y, {static_cast<int>(FusedPath::accumulate)}, true);
      case FusedForward::stacked: return fused_forward(fw, Xp, Y, {static_cast<int>(FusedPath::stacked)}, false);
      case FusedForward::stream:  // 32-row tiles above 16 tokens, where X's reads grow
        return fused_forward(
            fw, Xp, Y, {static_cast<int>(Xp.rows > 16 ? FusedPath::stream_wide : FusedPath::stream)}, false);
      case FusedForward::ring: return fused_forward(fw, Xp, Y, {static_cast<int>(FusedPath::ring)}, false);
      case FusedForward::automatic: break;
    }
    const detail::PlanKey key = detail::fused_forward_key<Scalar>(fw, Xp, Y);
    std::optional<detail::PlanChoice> c = ctx_->planner().find(key);
    if (!c && !detail::capturing(*ctx_)) c = plan_forward(fw, Xp, Y, key);
    if (c) return fused_forward(fw, Xp, Y, *c, false);
    // An unplanned shape while a graph is captured: the untimed default.
    fused_forward(fw, Xp, Y, {static_cast<int>(FusedPath::concat_k)}, true);
  }

  /// Gradients of apply(W, X) (W frozen): dB = s·dYᵀ·(X·Aᵀ), dA = s·(dY·B)ᵀ·X,
  /// dX = dY·W + s·(dY·B)·A. dA and dB are float. For bf16/half with r 16 or 32, s·dY·B and
  /// dB come from one pass over dY (detail::dy_pass), else from two cuBLAS GEMMs.
  DeviceGradients<Scalar> backward(cview W, cview X, cview dY) const {
    check_weight(W);
    check_input(X);
    spec().check_output_grad(dY.rows, dY.cols, X.rows);
    const Index T = X.rows, in = in_features(), r = rank(), out = out_features();
    const float s = static_cast<float>(scaling());
    DeviceGradients<Scalar> g{DeviceMatrix<float>(r, in), DeviceMatrix<float>(out, r), DeviceMatrix<Scalar>(T, in)};
    DeviceMatrix<Scalar> gb(T, r), xa(T, r);
    detail::compute_xa<Scalar>(*ctx_, X, A(), false, xa.view(), s);
    bool fused = false;  // gb = s·dY·B and dB from one pass over dY (r 16 or 32: B and xa have N columns)
    if constexpr (sizeof(Scalar) == 2) {
      if (detail::dy_pass_ok<Scalar>(dY, B(), xa.view(), r, r)) {
        detail::dy_pass(*ctx_, detail::as_device(dY), detail::as_device(B()), detail::as_device(cview(xa.view())), r,
                        s, detail::as_device(gb.view()), g.dB.view(), ctx_->planner().dy_partials);
        fused = true;
      }
    }
    if (!fused) detail::compute_xa<Scalar>(*ctx_, dY, B(), true, gb.view(), s);
    detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, fan_in_fan_out(), T, in, out, 1.f, dY, W, 0.f, g.dX.view());
    detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, false, T, in, r, 1.f, gb.view(), A(), 1.f, g.dX.view());
    detail::gemm<Scalar, Scalar, float>(*ctx_, true, false, r, in, T, 1.f, gb.view(), X, 0.f, g.dA.view());
    if (!fused)
      detail::gemm<Scalar, Scalar, float>(*ctx_, true, false, out, r, T, 1.f, dY, xa.view(), 0.f, g.dB.view());
    return g;
  }

  /// Fused backward after apply(fw, Xp, Y): dYp = [dY | scratch] (padded_grad: out + rp
  /// columns; out + r is accepted too). s·dY·[B | 0] goes into dYp's last columns, then
  /// dX = [dY | s·dY·B | 0]·[W ; A ; 0] in one GEMM (K = out + rp, a multiple of 64, or
  /// out + r); dA = (s·dY·B)ᵀ·X and dB = dYᵀ·(s·X·Aᵀ)
  /// reuse the scratch columns. For bf16/half with r ≤ 32 (and 16-byte aligned rows),
  /// s·dY·B and dB come from one tensor-core pass over dY (detail::dy_pass); otherwise
  /// from two cuBLAS GEMMs.
  void backward(const FusedWeight<Scalar>& fw, cview Xp, view dYp, view dX, DeviceView<float> dA,
                DeviceView<float> dB) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    const Index T = Xp.rows, in = in_features(), r = rank(), out = out_features();
    detail::require(Xp.cols == in + L.rp(), who(), "padded input Xp", Xp.rows, Xp.cols, T, in + L.rp());
    const Index gp = dYp.cols == out + r ? r : L.rp();  // G's columns: r, or rp with zeros
    detail::require(dYp.rows == T && dYp.cols == out + gp, who(), "padded dY", dYp.rows, dYp.cols, T, out + L.rp());
    detail::require(dX.rows == T && dX.cols == in, who(), "dX", dX.rows, dX.cols, T, in);
    detail::require(dA.rows == r && dA.cols == in, who(), "dA", dA.rows, dA.cols, r, in);
    detail::require(dB.rows == out && dB.cols == r, who(), "dB", dB.rows, dB.cols, out, r);
    const float s = static_cast<float>(scaling());
    cview dY = cview(dYp).col_block(0, out);
    view G = dYp.col_block(out, r);
    const cview XA = cview(Xp).col_block(in, L.rp());
    bool fused = false;  // G and dB from one pass over dY
    if constexpr (sizeof(Scalar) == 2) {
      auto& partials = ctx_->planner().dy_partials;
      // While a graph is captured, the pass runs only if planning left it enough scratch.
      if (detail::dy_pass_ok<Scalar>(dY, L.B_padded(), XA, r, L.rp()) &&
          (!detail::capturing(*ctx_) || partials.size() >= detail::dy_pass_scratch_floats<detail::device_t<Scalar>>(T, out, r))) {
        detail::dy_pass(*ctx_, detail::as_device(dY), detail::as_device(L.B_padded()), detail::as_device(XA), r, s,
                        detail::as_device(dYp.col_block(out, gp)), dB, partials);
        fused = true;
      }
    }
    if (!fused)
      detail::compute_xa<Scalar>(*ctx_, dY, gp == r ? L.B() : L.B_padded(), true, dYp.col_block(out, gp), s);
    input_gradient(fw, dYp, gp, dX);
    detail::gemm<Scalar, Scalar, float>(*ctx_, true, false, r, in, T, 1.f, cview(G), cview(Xp).col_block(0, in), 0.f,
                                        dA);
    if (!fused)
      detail::gemm<Scalar, Scalar, float>(*ctx_, true, false, out, r, T, 1.f, dY, XA.col_block(0, r), 0.f, dB);
  }

  /// W ← W + ΔW in place (one GEMM with beta = 1, float accumulation, one rounding).
  void merge(view W) const { add_delta(W, 1.f); }
  /// W ← W − ΔW.
  void unmerge(view W) const { add_delta(W, -1.f); }

  /// The shape, strength and options, and every check on them (core/spec.hpp), shared with
  /// LowRankAdapter<S, cpu>: the same validation and messages on both devices.
  const AdapterSpec& spec() const { return host_.spec(); }
  std::string who() const { return spec().who(); }

 private:
  void check_input(cview X) const { spec().check_input(X.cols); }
  void check_weight(cview W) const { spec().check_weight(W.rows, W.cols); }
  void check_fused(const FusedWeight<Scalar>& fw, cview Xp, cview Y) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    if (L.out != out_features() || L.in != in_features() || L.r != rank())
      detail::fail("{}fused block is for [{} x {}] r = {}, adapter is [{} x {}] r = {}", who(), L.out, L.in, L.r,
                   out_features(), in_features(), rank());
    detail::require(Xp.cols == in_features() + L.rp(), who(), "padded input Xp", Xp.rows, Xp.cols, Xp.rows,
                    in_features() + L.rp());
    detail::require(Y.rows == Xp.rows && Y.cols == out_features(), who(), "output Y", Y.rows, Y.cols, Xp.rows,
                    out_features());
  }
  /// dX = [dY | G | 0]·[W ; A ; 0] (K = out + gp): cublasGemmEx, or for 16-bit scalars with
  /// fw.strategy() automatic the planner's choice among it and cuBLASLt's candidates.
  void input_gradient(const FusedWeight<Scalar>& fw, view dYp, Index gp, view dX) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    const Index T = dYp.rows, in = in_features(), out = out_features(), r = rank();
    const cview Wt = gp == r ? L.tall() : L.tall_padded();
    auto gemmex = [&] {
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, false, T, in, out + gp, 1.f, cview(dYp), Wt, 0.f, dX);
    };
    if constexpr (std::is_same_v<Scalar, float>) {
      gemmex();
    } else {
      if (fw.strategy() != FusedForward::automatic) return gemmex();
      const detail::PlanKey key = detail::fused_backward_key<Scalar>(fw, dYp, gp, dX);
      auto& planner = ctx_->planner();
      std::optional<detail::PlanChoice> c = planner.find(key);
      if (!c && !detail::capturing(*ctx_)) {
        std::lock_guard<std::mutex> lock(planner.planning());
        c = planner.find(key);
        if (!c) {
          detail::PlanChoice p{0, std::make_shared<detail::LtGemm>(*ctx_, false, false, T, in, out + gp, cview(dYp),
                                                                   Wt, dX)};
          auto call = [&](int k) {
            if (k == 0)
              gemmex();
            else
              p.lt->run(*ctx_, k - 1, cview(dYp), Wt, dX);
          };
          p.algo = detail::fastest(detail::time_candidates(*ctx_, 1 + p.lt->candidates(), call), 0) - 1;
          planner.record(key, p);
          c = std::move(p);
        }
      }
      if (c && c->algo >= 0 && c->lt && c->lt->fits(false, false, T, in, out + gp, cview(dYp), Wt, dX))
        c->lt->run(*ctx_, c->algo, cview(dYp), Wt, dX);
      else
        gemmex();
    }
  }

  /// Runs the fused forward along c.path (with c's cuBLASLt algorithm for its big GEMM when the
  /// operands fit it). `decode_first`: take the decode kernels when they apply. A path that
  /// cannot run here (stacked without scratch during a capture, decode on unaligned rows)
  /// falls back to concat_k.
  void fused_forward(const FusedWeight<Scalar>& fw, view Xp, view Y, const detail::PlanChoice& c,
                     bool decode_first) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    using detail::FusedPath;
    const Index T = Xp.rows, in = in_features(), r = rank(), out = out_features(), rp = L.rp();
    const float s = static_cast<float>(scaling());
    cview X = cview(Xp).col_block(0, in);
    const auto path = static_cast<FusedPath>(c.path);
    if ((decode_first || path == FusedPath::decode) &&
        detail::decode_apply<Scalar>(*ctx_, X, L.W(), L.A(), L.B(), Xp.col_block(in, r), Y, s))
      return;
    if ((path == FusedPath::stream || path == FusedPath::stream_wide) &&
        (stream_forward(fw, Xp, Y, path == FusedPath::stream_wide ? 2 : 1) ||
         stacked_forward(fw, Xp, Y, out + r, nullptr, -1)))
      return;
    if ((path == FusedPath::ring || path == FusedPath::ring_cluster) &&
        (ring_forward(fw, Xp, Y, path == FusedPath::ring_cluster ? detail::fused_ring_cluster : 1) ||
         stacked_forward(fw, Xp, Y, out + r, nullptr, -1)))
      return;
    if ((path == FusedPath::stacked || path == FusedPath::stacked_padded) &&
        stacked_forward(fw, Xp, Y, path == FusedPath::stacked ? out + r : out + rp, c.lt.get(), c.algo))
      return;
    detail::compute_xa<Scalar>(*ctx_, X, L.A_padded(), false, Xp.col_block(in, rp), s);
    if (path == FusedPath::accumulate) {
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, T, out, r, 1.f, cview(Xp).col_block(in, r), L.B(), 0.f,
                                           Y);
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, T, out, in, 1.f, X, L.W(), 1.f, Y);
    } else if (path == FusedPath::concat_k && c.lt && c.algo >= 0 &&
               c.lt->fits(false, true, T, out, in + rp, cview(Xp), L.wide(), Y)) {
      c.lt->run(*ctx_, c.algo, cview(Xp), L.wide(), Y);
    } else {
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, T, out, in + rp, 1.f, cview(Xp), L.wide(), 0.f, Y);
    }
  }

  /// The context's scratch for the stacked product, [T × (out + rp)]; grows it unless a graph
  /// is being captured (then returns nothing).
  std::optional<view> stacked_scratch(const FusedWeight<Scalar>& fw, Index T) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    const Index ldc = out_features() + L.rp();
    const std::size_t bytes = static_cast<std::size_t>(T * ldc) * sizeof(Scalar);
    auto& buf = ctx_->planner().stacked;
    if (buf.size() < bytes) {
      if (detail::capturing(*ctx_)) return std::nullopt;
      buf = DeviceBuffer<std::byte>(bytes);
    }
    return view{reinterpret_cast<Scalar*>(buf.data()), T, ldc, ldc};
  }

  /// The stacked forward with N = n (out + r or out + rp) columns of [X·Wᵀ | X·Aᵀ | 0]: one GEMM
  /// (cuBLASLt algorithm `algo` of `lt` when it fits, else cublasGemmEx), then the epilogue.
  /// Returns false (nothing launched) when it cannot run (r > 64, no scratch).
  bool stacked_forward(const FusedWeight<Scalar>& fw, view Xp, view Y, Index n, const detail::LtGemm* lt,
                       int algo) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    const Index T = Xp.rows, in = in_features(), r = rank(), out = out_features();
    if (r > 64) return false;
    const std::optional<view> scratch = stacked_scratch(fw, T);
    if (!scratch) return false;
    const view C = scratch->col_block(0, n);
    const cview X = cview(Xp).col_block(0, in);
    const cview M = n == out + r ? L.tall() : L.tall_padded();
    if (lt && algo >= 0 && lt->fits(false, true, T, n, in, X, M, C))
      lt->run(*ctx_, algo, X, M, C);
    else
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, T, n, in, 1.f, X, M, 0.f, C);
    detail::launch_stacked_epilogue(*ctx_, detail::as_device(cview(C)), out, r, L.rp(), detail::as_device(L.B()),
                                    static_cast<float>(scaling()), detail::as_device(Y),
                                    detail::as_device(Xp.col_block(in, L.rp())));
    return true;
  }

  /// The one-launch forward (detail::stream_forward_kernel, tiles of 16·mt rows, mt 1 or 2) for
  /// bf16/half, at most stream_max_tokens tokens, r ≤ 64, rows of X and of the block 16-byte
  /// aligned. Its device state (counters and s·X·Aᵀ in float) is the planner's, allocated zeroed
  /// on first use (not while a graph is captured). Returns false (nothing launched) when it
  /// cannot run.
  bool stream_forward(const FusedWeight<Scalar>& fw, view Xp, view Y, int mt) const {
    if constexpr (sizeof(Scalar) != 2) {
      return false;
    } else {
      using T = detail::device_t<Scalar>;
      const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
      const Index Tk = Xp.rows, in = in_features(), r = rank(), out = out_features(), rp = L.rp();
      if (Tk > detail::stream_max_tokens || r > 64 || in % 8 != 0 || Xp.ld % 8 != 0 || L.ld() % 8 != 0 ||
          !detail::aligned(Xp.data, 16) || !detail::aligned(L.data, 16))
        return false;
      auto& st = ctx_->planner().stream_state;
      if (st.size() < static_cast<std::size_t>(detail::stream_state_floats)) {
        if (detail::capturing(*ctx_)) return false;
        st = DeviceBuffer<unsigned>(detail::stream_state_floats);
        LORA_CUDA_CHECK(cudaMemsetAsync(st.data(), 0, st.size() * sizeof(unsigned), ctx_->stream()));
      }
      const unsigned grid = detail::ceil_div(r, 16 * mt) + detail::ceil_div(out, 16 * mt);
      const T* X = reinterpret_cast<const T*>(Xp.data);
      const T* M = reinterpret_cast<const T*>(L.data);
      const T* B = reinterpret_cast<const T*>(L.B().data);
      T* y = reinterpret_cast<T*>(Y.data);
      T* xa = reinterpret_cast<T*>(Xp.data + in);
      auto go = [&](auto kernel) {
        kernel<<<grid, detail::stream_threads, 0, ctx_->stream()>>>(
            X, Xp.ld, static_cast<int>(Tk), static_cast<int>(in), M, L.ld(), static_cast<int>(out),
            static_cast<int>(r), B, L.ld(), static_cast<float>(scaling()), y, Y.ld, xa, Xp.ld, static_cast<int>(rp),
            st.data());
        LORA_CUDA_CHECK_LAUNCH("stream_forward_kernel");
      };
      auto by_tokens = [&](auto m) {
        constexpr int MT = decltype(m)::value;
        if (Tk <= 8)
          go(detail::stream_forward_kernel<T, 1, MT>);
        else if (Tk <= 16)
          go(detail::stream_forward_kernel<T, 2, MT>);
        else
          go(detail::stream_forward_kernel<T, 4, MT>);
      };
      if (mt == 2)
        by_tokens(std::integral_constant<int, 2>{});
      else
        by_tokens(std::integral_constant<int, 1>{});
      return true;
    }
  }

  /// The one-launch forward through detail::dense_ring_kernel (XA per block, or per cluster of
  /// `cluster` blocks: at most 16 tokens) for bf16/half, 1…dense_ring_max_tokens tokens,
  /// in % 256 == 0, in ≤ 4096, ⌈r / 16⌉ ≤ in / 256, rows of X and of the block 16-byte aligned.
  /// Its LoRA pieces are the block's rank columns in 16s (the padding's zero rows of A and
  /// columns of B fill the last); block 0 of each group of 16 tokens writes s·X·Aᵀ and zeros into
  /// Xp's rp spare columns. Returns false (nothing launched) when it cannot run.
  bool ring_forward(const FusedWeight<Scalar>& fw, view Xp, view Y, int cluster) const {
    if constexpr (sizeof(Scalar) != 2) {
      return false;
    } else {
      using T = detail::device_t<Scalar>;
      const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
      const Index Tk = Xp.rows, in = in_features(), r = rank(), out = out_features(), rp = L.rp();
      const int pieces = static_cast<int>((r + 15) / 16);
      if (!detail::dense_ring_ok<T>(in, static_cast<int>(Tk), Xp.ld, Xp.data, L.ld(), L.data) ||
          pieces > detail::nf4_lora_max_jobs || pieces > in / 256 || (cluster > 1 && Tk > 16))
        return false;
      detail::Nf4RingLora<T> l;
      l.jobs = pieces;
      l.self = true;
      l.cluster = cluster;
      l.xa = reinterpret_cast<T*>(Xp.data + in);
      l.xald = Xp.ld;
      l.xacols = static_cast<int>(rp);
      const T* A = reinterpret_cast<const T*>(L.A().data);
      const T* B = reinterpret_cast<const T*>(L.B().data);
      for (int p = 0; p < pieces; ++p)
        l.job[p] = {A + 16L * p * L.ld(), L.ld(), B + 16L * p, L.ld(), 16, static_cast<float>(scaling()),
                    Tk >= 32 ? ~0u : static_cast<std::uint32_t>((1ull << Tk) - 1)};
      if (!detail::nf4_ring_lora_ok<T>(l, in, out)) return false;
      detail::launch_dense_ring<T>(reinterpret_cast<const T*>(Xp.data), Xp.ld, static_cast<int>(Tk),
                                   static_cast<int>(in), reinterpret_cast<const T*>(L.data), L.ld(),
                                   static_cast<int>(out), reinterpret_cast<T*>(Y.data), Y.ld, ctx_->stream(), true, l);
      LORA_CUDA_CHECK_LAUNCH("dense_ring_kernel");
      return true;
    }
  }

  /// Times the fused forward's candidates for this shape and records the fastest in the
  /// planner: accumulate; concat_k through cublasGemmEx and each cuBLASLt algorithm; for at
  /// most stacked_max_tokens tokens the stacked forward (N = out + r and out + rp) likewise;
  /// for ≤ 4 tokens the decode kernels; for ≤ stream_max_tokens (bf16/half) the stream kernel;
  /// for ≤ dense_ring_plan_max_tokens (bf16/half, ring_forward's shapes) the ring kernel (XA per
  /// block).
  /// Each candidate is the whole forward. Synchronises.
  detail::PlanChoice plan_forward(const FusedWeight<Scalar>& fw, view Xp, view Y, const detail::PlanKey& key) const {
    const detail::FusedLayout<Scalar> L = detail::fused_layout(fw);
    using detail::FusedPath;
    auto& planner = ctx_->planner();
    std::lock_guard<std::mutex> lock(planner.planning());
    if (auto c = planner.find(key)) return *c;
    const Index T = Xp.rows, in = in_features(), r = rank(), out = out_features(), rp = L.rp();
    std::vector<detail::PlanChoice> cand;
    cand.push_back({static_cast<int>(FusedPath::accumulate)});
    cand.push_back({static_cast<int>(FusedPath::concat_k)});
    if constexpr (!std::is_same_v<Scalar, float>) {  // float GEMMs stay IEEE (cublasGemmEx, no tensor cores)
      auto lt = std::make_shared<detail::LtGemm>(*ctx_, false, true, T, out, in + rp, cview(Xp), L.wide(), Y);
      for (int i = 0; i < lt->candidates(); ++i) cand.push_back({static_cast<int>(FusedPath::concat_k), lt, i});
    }
    if (T <= stacked_max_tokens && r <= 64) {
      const view C = *stacked_scratch(fw, T);
      for (Index n : {out + r, out + rp}) {
        if (n == out + rp && rp == r) break;
        const int path = static_cast<int>(n == out + r ? FusedPath::stacked : FusedPath::stacked_padded);
        cand.push_back({path});
        if constexpr (!std::is_same_v<Scalar, float>) {
          const cview X = cview(Xp).col_block(0, in);
          auto lt = std::make_shared<detail::LtGemm>(*ctx_, false, true, T, n, in, X,
                                                     n == out + r ? L.tall() : L.tall_padded(), C.col_block(0, n));
          for (int i = 0; i < lt->candidates(); ++i) cand.push_back({path, lt, i});
        }
      }
    }
    if (T <= 4) cand.push_back({static_cast<int>(FusedPath::decode)});
    if constexpr (sizeof(Scalar) == 2)
      if (T <= detail::stream_max_tokens && r <= 64)
        for (FusedPath p : {FusedPath::stream, FusedPath::stream_wide}) cand.push_back({static_cast<int>(p)});
    if constexpr (sizeof(Scalar) == 2)
      if (T <= detail::dense_ring_plan_max_tokens && in % 256 == 0 && in <= 4096 && (r + 15) / 16 <= in / 256)
        cand.push_back({static_cast<int>(FusedPath::ring)});  // (ring_cluster: slower in every row measured)
    const auto t = detail::time_candidates(*ctx_, static_cast<int>(cand.size()),
                                           [&](int k) { fused_forward(fw, Xp, Y, cand[static_cast<std::size_t>(k)], false); });
    const detail::PlanChoice best = cand[static_cast<std::size_t>(detail::fastest(t, 1))];
    planner.record(key, best);
    return best;
  }

  void copy(cview src, view dst) const {
    if (src.rows == 0 || src.cols == 0) return;
    LORA_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, dst.ld * sizeof(Scalar), src.data, src.ld * sizeof(Scalar),
                                      src.cols * sizeof(Scalar), src.rows, cudaMemcpyDeviceToDevice, ctx_->stream()));
  }
  void add_delta(view W, float sign) const {
    check_weight(W);
    const float s = sign * static_cast<float>(scaling());
    if (fan_in_fan_out())
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, true, true, in_features(), out_features(), rank(), s, A(), B(), 1.f,
                                           W);
    else
      detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, false, out_features(), in_features(), rank(), s, B(), A(),
                                           1.f, W);
  }

  /// Grow-only scratch for s·X·Aᵀ (stream-ordered reuse; reallocation syncs through cudaFree).
  view scratch(Index rows, Index cols) const {
    const std::size_t n = static_cast<std::size_t>(rows * cols);
    if (scratch_.size() < n) scratch_ = DeviceBuffer<Scalar>(n);
    return {scratch_.data(), rows, cols, cols};
  }

  host_adapter host_;  // shape, alpha, scaling, options; its factors are unused
  std::shared_ptr<CudaContext> ctx_;
  DeviceMatrix<Scalar> A_, B_;
  mutable DeviceBuffer<Scalar> scratch_;
};

}  // namespace lora
