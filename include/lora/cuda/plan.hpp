#pragma once
// The planner of a CudaContext: which kernels and GEMM algorithms the fused adapter
// paths run for each shape, chosen once (by timing the candidates) and then only looked
// up, so that the hot path neither times, allocates nor synchronises and can be captured
// in a CUDA graph. LowRankAdapter<S, cuda>::plan(fw, tokens) plans explicitly; a shape
// met unplanned is planned on first use, unless the stream is being captured, when the
// untimed defaults run instead. See docs/cuda.md.

#include <lora/cuda/lt.hpp>
#include <lora/cuda/runtime.hpp>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace lora::detail {

/// What a plan is for: the operation and the GEMM shape and leading dimensions it was timed
/// on (row-major C [M × N] = A [M × K]·Bᵀ-like products, as LtGemm describes them).
struct PlanKey {
  int op = 0;     ///< plan_op
  int dtype = 0;  ///< cudaDataType_t of the operands
  Index M = 0, N = 0, K = 0, lda = 0, ldb = 0, ldc = 0;
  Index extra = 0;  ///< anything else the choice depends on (the fused paths: the rank)
  bool operator==(const PlanKey&) const = default;
};

/// The operations planned: the fused forward (strategy and GEMM algorithm) and the fused
/// backward's dX GEMM (algorithm).
enum plan_op : int { plan_fused_forward = 1, plan_fused_backward_dx = 2 };

/// One decision: `path` (the op's own enumeration: FusedPath for the forward), and for its big
/// GEMM a cuBLASLt plan with the index of the chosen algorithm, or algo = -1 for cublasGemmEx.
struct PlanChoice {
  int path = 0;
  std::shared_ptr<LtGemm> lt;
  int algo = -1;
};

/// The choices of one CudaContext, keyed by shape, and the device scratch the planned paths
/// use. Lookups and records take a lock (several threads may share a context's planner);
/// the scratch buffers are reused in the stream order of the context and grown only while
/// planning (or by a fixed strategy's first call), never while a graph is captured.
class Planner {
 public:
  std::optional<PlanChoice> find(const PlanKey& k) const {
    std::lock_guard<std::mutex> lock(m_);
    for (const auto& e : entries_)
      if (e.first == k) return e.second;
    return std::nullopt;
  }
  /// Records (or replaces) the choice for k.
  void record(const PlanKey& k, PlanChoice c) {
    std::lock_guard<std::mutex> lock(m_);
    for (auto& e : entries_)
      if (e.first == k) {
        e.second = std::move(c);
        return;
      }
    entries_.emplace_back(k, std::move(c));
  }
  std::size_t size() const {
    std::lock_guard<std::mutex> lock(m_);
    return entries_.size();
  }
  /// Held while candidates are timed, so that two threads do not plan at once.
  std::mutex& planning() { return planning_; }

  /// detail::dy_pass's partial sums (the fused backward).
  DeviceBuffer<float> dy_partials;
  /// The stacked forward's [T × (out + rp)] product [X·Wᵀ | X·Aᵀ | 0], in bytes.
  DeviceBuffer<std::byte> stacked;
  /// The stream forward's state (detail::stream_forward_kernel): its counters, zero between
  /// launches, and s·X·Aᵀ in float.
  DeviceBuffer<unsigned> stream_state;

 private:
  mutable std::mutex m_;
  std::mutex planning_;
  std::vector<std::pair<PlanKey, PlanChoice>> entries_;
};

/// True while the context's stream is being captured into a CUDA graph.
inline bool capturing(const CudaContext& ctx) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  LORA_CUDA_CHECK(cudaStreamIsCapturing(ctx.stream(), &st));
  return st != cudaStreamCaptureStatusNone;
}

/// Reads `n` 16-byte vectors (a buffer twice the L2's size): afterwards the L2 holds none of
/// what a candidate reads, and no dirty lines that its reads would have to write back first.
__global__ inline void l2_evict_kernel(const uint4* __restrict__ p, long n, unsigned* __restrict__ sink) {
  unsigned acc = 0;
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads; practically never taken
}

/// A one-warp kernel that stands for the kernel before a layer (its input's producer): a
/// candidate launched as a programmatic dependent starts under its end, as it would in a model.
__global__ inline void lead_kernel(unsigned* __restrict__ sink) {
  if (threadIdx.x == 0 && sink[0] == 0x9e3779b9u) sink[0] = 0;  // practically never taken
}

/// Times n candidates (call(k) runs candidate k once) on the context's stream: one warm-up
/// call each, then five rounds in an order that rotates from round to round; before every
/// timed call a read over twice the L2 evicts it, so each candidate reads its weights from
/// device memory, as a layer does in a model's forward (at decode sizes a 4096² weight fits in
/// the H200's L2, where the strategies rank differently; docs/performance.md), and the timed
/// span is lead_kernel and the call, with no event between them: a kernel, not an event, comes
/// before a layer, and a programmatic dependent launch (the ring path) overlaps a kernel before
/// it, not an event (docs/performance.md, round 8). Returns each candidate's fastest round,
/// so that clock ramps and the first position cost nothing (lead_kernel's time is in every
/// candidate's). Allocates the eviction buffer for the duration of the call and synchronises.
template <class Call>
std::vector<float> time_candidates(const CudaContext& ctx, int n, Call&& call) {
  constexpr int rounds = 5;
  int dev = 0, l2 = 0;
  LORA_CUDA_CHECK(cudaGetDevice(&dev));
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const long vectors = std::max(1L, 2L * l2 / 16);
  DeviceBuffer<uint4> evict(static_cast<std::size_t>(vectors));
  LORA_CUDA_CHECK(cudaMemsetAsync(evict.data(), 0, evict.size() * sizeof(uint4), ctx.stream()));
  DeviceBuffer<unsigned> sink(1);
  LORA_CUDA_CHECK(cudaMemsetAsync(sink.data(), 0, sizeof(unsigned), ctx.stream()));
  auto flush = [&] {
    l2_evict_kernel<<<264, 512, 0, ctx.stream()>>>(evict.data(), vectors, sink.data());
    LORA_CUDA_CHECK_LAUNCH("l2_evict_kernel");
  };
  std::vector<cudaEvent_t> e(2 * static_cast<std::size_t>(n) * rounds);
  for (auto& ev : e) LORA_CUDA_CHECK(cudaEventCreate(&ev));
  for (int k = 0; k < n; ++k) call(k);
  for (int round = 0; round < rounds; ++round)
    for (int j = 0; j < n; ++j) {
      const int k = (j + round) % n;
      const std::size_t at = 2 * (static_cast<std::size_t>(round) * n + k);
      flush();
      LORA_CUDA_CHECK(cudaEventRecord(e[at], ctx.stream()));
      lead_kernel<<<1, 32, 0, ctx.stream()>>>(sink.data());
      LORA_CUDA_CHECK_LAUNCH("lead_kernel");
      call(k);
      LORA_CUDA_CHECK(cudaEventRecord(e[at + 1], ctx.stream()));
    }
  LORA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  std::vector<float> best(static_cast<std::size_t>(n), 0.f);
  for (int k = 0; k < n; ++k)
    for (int round = 0; round < rounds; ++round) {
      const std::size_t at = 2 * (static_cast<std::size_t>(round) * n + k);
      float ms = 0;
      LORA_CUDA_CHECK(cudaEventElapsedTime(&ms, e[at], e[at + 1]));
      float& b = best[static_cast<std::size_t>(k)];
      b = round == 0 ? ms : std::min(b, ms);
    }
  for (auto& ev : e) cudaEventDestroy(ev);
  return best;
}

/// The index of the smallest time, `preferred` on ties.
inline int fastest(const std::vector<float>& t, int preferred) {
  int best = preferred;
  for (int k = 0; k < static_cast<int>(t.size()); ++k)
    if (t[static_cast<std::size_t>(k)] < t[static_cast<std::size_t>(best)]) best = k;
  return best;
}

}  // namespace lora::detail

namespace lora {
inline detail::Planner& CudaContext::planner() const {
  std::call_once(planner_once_, [this] { planner_ = std::make_shared<detail::Planner>(); });
  return *planner_;
}
}  // namespace lora
