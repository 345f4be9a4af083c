#pragma once
// Tensor-parallel LoRA on NVIDIA GPUs over NCCL: TpGroup (an ncclComm_t and the stream its
// collectives run on) and the row-parallel adapter path, whose partial X_k·A_kᵀ needs one
// all-reduce of T × r values, or none when it is folded into the layer's own all-reduce.
// Column-parallel shards need no collective in the forward pass: a LowRankAdapter<S, cuda>
// built from lora::tp::shard(...) runs as it is (lora/cuda/adapter.cuh). The layouts and
// their costs: docs/tensor-parallel.md. Needs NCCL (CMake target lora::nccl).
//
//   ncclUniqueId id;                      // rank 0: ncclGetUniqueId(&id), sent to the others
//   lora::tp::TpGroup group(id, rank, world, ctx.stream());
//   // row-parallel o_proj on this rank: Y_partial = X_k·W_kᵀ from the engine's own GEMM, then
//   lora::tp::row_lora_fold(ctx, group, A_k, B, s, X_k, xa, Y_partial);   // + all-reduce

#include <lora/cuda/runtime.hpp>
#include <lora/tp/shard.hpp>

#include <nccl.h>

#include <cstddef>
#include <string>
#include <type_traits>

namespace lora::tp {

namespace detail {
inline void nccl_check(ncclResult_t r, const char* call) {
  // ncclSystemError / ncclInternalError say little: NCCL_DEBUG=INFO in the environment tells more.
  if (r != ncclSuccess) throw cuda_error(call, static_cast<int>(r), ncclGetErrorString(r));
}
template <class S>
constexpr ncclDataType_t nccl_type() {
  using T = std::remove_cv_t<S>;
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, half> || std::is_same_v<T, __half>) return ncclFloat16;
  else if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, __nv_bfloat16>) return ncclBfloat16;
  else static_assert(sizeof(T) == 0, "nccl_type: float, double, half or bfloat16");
}
}  // namespace detail

#define LORA_NCCL_CHECK(call) ::lora::tp::detail::nccl_check((call), #call)

/// One rank of a tensor-parallel group: an NCCL communicator and the stream its collectives
/// are queued on. Give it the stream of the CudaContext that runs the rank's GEMMs, so that
/// the all-reduce is ordered after the GEMM that fills its buffer with no extra event. Owns
/// the communicator unless adopted (adopt(): an engine's existing communicator).
class TpGroup {
 public:
  /// Joins the group identified by `id` (from ncclGetUniqueId on one rank, shared with the
  /// others by the engine) as `rank` of `world`, on the current CUDA device. Blocks until all
  /// ranks have joined (ncclCommInitRank).
  TpGroup(const ncclUniqueId& id, int rank, int world, cudaStream_t stream) : rank_(rank), world_(world), stream_(stream) {
    if (world < 1 || rank < 0 || rank >= world)
      fail("tp::TpGroup: rank {} of world {} is not a rank of the group", rank, world);
    LORA_NCCL_CHECK(ncclCommInitRank(&comm_, world, id, rank));
    owned_ = true;
  }
  /// Uses an engine's communicator (not destroyed here).
  static TpGroup adopt(ncclComm_t comm, cudaStream_t stream) {
    TpGroup g;
    g.comm_ = comm;
    g.stream_ = stream;
    LORA_NCCL_CHECK(ncclCommUserRank(comm, &g.rank_));
    LORA_NCCL_CHECK(ncclCommCount(comm, &g.world_));
    return g;
  }
  ~TpGroup() {
    if (owned_ && comm_) ncclCommDestroy(comm_);
  }
  TpGroup(TpGroup&& o) noexcept { swap(o); }
  TpGroup& operator=(TpGroup&& o) noexcept {
    swap(o);
    return *this;
  }
  TpGroup(const TpGroup&) = delete;
  TpGroup& operator=(const TpGroup&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }

  /// In-place sum over the group of `count` elements at `data` (device memory), queued on stream().
  template <class T>
  void all_reduce(T* data, std::size_t count) const {
    if (count == 0) return;
    LORA_NCCL_CHECK(ncclAllReduce(data, data, count, detail::nccl_type<T>(), ncclSum, comm_, stream_));
  }
  /// In-place sum of a contiguous device matrix.
  template <class T>
  void all_reduce(DeviceView<T> v) const {
    if (!v.contiguous() && v.rows > 1)
      fail("tp::TpGroup::all_reduce: a [{} x {}] view with leading dimension {} is not contiguous", v.rows, v.cols,
           v.ld);
    all_reduce(v.data, static_cast<std::size_t>(v.rows) * static_cast<std::size_t>(v.cols));
  }

 private:
  TpGroup() = default;
  void swap(TpGroup& o) noexcept {
    std::swap(comm_, o.comm_);
    std::swap(rank_, o.rank_);
    std::swap(world_, o.world_);
    std::swap(stream_, o.stream_);
    std::swap(owned_, o.owned_);
  }
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, world_ = 1;
  cudaStream_t stream_ = nullptr;
  bool owned_ = false;
};

namespace detail {
// Orders `group`'s stream after the work queued so far on `ctx`'s (and back, by the caller
// swapping the arguments); nothing when they are the same stream.
inline void stream_after(cudaStream_t waiter, cudaStream_t producer) {
  if (waiter == producer) return;
  cudaEvent_t e;
  LORA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  LORA_CUDA_CHECK(cudaEventRecord(e, producer));
  LORA_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
  LORA_CUDA_CHECK(cudaEventDestroy(e));  // released once the wait has been satisfied
}
template <class S>
void check_row_operands(const char* fn, const TpGroup& g, DeviceView<const S> A, DeviceView<const S> B,
                        DeviceView<const S> X, DeviceView<S> xa, DeviceView<S> Y) {
  const std::string who = fmt::format("tp::{} (rank {} of {}): ", fn, g.rank(), g.world());
  const Index r = A.rows, in_k = A.cols, out = B.rows, T = X.rows;
  lora::detail::require(B.cols == r, who, "lora_B", B.rows, B.cols, out, r);
  lora::detail::require(X.cols == in_k, who, "input X_k", X.rows, X.cols, T, in_k);
  lora::detail::require(xa.rows == T && xa.cols == r && xa.contiguous(), who, "scratch xa (contiguous)", xa.rows,
                        xa.cols, T, r);
  lora::detail::require(Y.rows == T && Y.cols == out, who, "output Y", Y.rows, Y.cols, T, out);
}
}  // namespace detail

/// The rank's partial s·X_k·A_kᵀ [T × r] (A_k [r × in_k], X_k [T × in_k]) into xa; summed
/// over the group it is s·X·Aᵀ.
template <class S>
void row_partial_xa(const CudaContext& ctx, DeviceView<const S> A_k, DeviceView<const S> X_k, float s,
                    DeviceView<S> xa) {
  lora::detail::gemm<S, S, S>(ctx, false, true, X_k.rows, A_k.rows, A_k.cols, s, X_k, A_k, 0.f, xa);
}

/// Row-parallel adapter path with its own collective: xa = all-reduce(s·X_k·A_kᵀ), T × r
/// values, then Y += xa·Bᵀ. Y is the layer's output [T × out] after the engine's own
/// all-reduce of X_k·W_kᵀ (B [out × r] replicated); xa a contiguous [T × r] scratch. Every
/// rank ends with the same Y.
template <class S>
void row_lora_separate(const CudaContext& ctx, const TpGroup& group, DeviceView<const S> A_k, DeviceView<const S> B,
                       float s, DeviceView<const S> X_k, DeviceView<S> xa, DeviceView<S> Y) {
  detail::check_row_operands<S>("row_lora_separate", group, A_k, B, X_k, xa, Y);
  row_partial_xa<S>(ctx, A_k, X_k, s, xa);
  detail::stream_after(group.stream(), ctx.stream());
  group.all_reduce(xa);
  detail::stream_after(ctx.stream(), group.stream());
  lora::detail::gemm<S, S, S>(ctx, false, true, Y.rows, Y.cols, xa.cols, 1.f, DeviceView<const S>(xa), B, 1.f, Y);
}

/// Row-parallel adapter path folded into the layer's all-reduce: Y_partial (the caller's
/// buffer holding this rank's X_k·W_kᵀ, about to be all-reduced) += (s·X_k·A_kᵀ)·Bᵀ; with
/// `reduce` the all-reduce of Y_partial (T × out, the layer's own) is queued too, otherwise
/// the caller runs it. No bytes beyond the layer's; each rank runs the T × r × out GEMM.
template <class S>
void row_lora_fold(const CudaContext& ctx, const TpGroup& group, DeviceView<const S> A_k, DeviceView<const S> B,
                   float s, DeviceView<const S> X_k, DeviceView<S> xa, DeviceView<S> Y_partial, bool reduce = true) {
  detail::check_row_operands<S>("row_lora_fold", group, A_k, B, X_k, xa, Y_partial);
  row_partial_xa<S>(ctx, A_k, X_k, s, xa);
  lora::detail::gemm<S, S, S>(ctx, false, true, Y_partial.rows, Y_partial.cols, xa.cols, 1.f, DeviceView<const S>(xa),
                              B, 1.f, Y_partial);
  if (!reduce) return;
  detail::stream_after(group.stream(), ctx.stream());
  group.all_reduce(Y_partial);
  detail::stream_after(ctx.stream(), group.stream());
}

}  // namespace lora::tp
