#pragma once
// Helpers shared by the CUDA benchmarks (bench_cuda.cu, bench_multi.cu, tune_nf4.cu): random
// device inputs, and timing with CUDA events — medians of batches of calls, several functions
// interleaved batch by batch so that clock drift (power, temperature) hits them alike, or one
// batch captured in a CUDA graph to leave out the host's launch cost.

#include <lora/core/random.hpp>
#include <lora/cuda/runtime.hpp>

#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

namespace lora::bench {

/// Fills a device view with N(0, scale²) values.
template <class S>
void fill_random(DeviceView<S> v, Generator& g, double scale) {
  Matrix<S> h(v.rows, v.cols);
  for (Index i = 0; i < h.rows(); ++i)
    for (Index j = 0; j < h.cols(); ++j) h(i, j) = S(static_cast<float>(g.normal() * scale));
  upload<S>(h, v);
}

/// A host matrix of N(0, scale²) values (adapter factors: scale 0.02).
template <class S>
Matrix<S> random_factor(Index rows, Index cols, Generator& g, double scale = 0.02) {
  Matrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = S(static_cast<float>(g.normal() * scale));
  return m;
}

namespace detail {
inline double median(std::vector<float>& v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}
}  // namespace detail

/// Median milliseconds per call of each function, timed in alternating batches of `batch`
/// calls after `warmup` calls of each. fn(i) gets a call counter (for rotating inputs).
/// Each round starts with one untimed call of its first function, and the order rotates
/// from round to round: the first batch after the host's synchronisation ran 2–6% slow on
/// the H100 (bench/cuda/tune_gemm.cu, docs/performance.md), which used to fall on fns[0]
/// (the base GEMM of every ratio) in every round.
inline std::vector<double> time_all(CudaContext& ctx, const std::vector<std::function<void(int)>>& fns, int batch,
                                    int batches, int warmup = 2) {
  const std::size_t n = fns.size();
  std::vector<cudaEvent_t> ev(n + 1);
  for (auto& e : ev) LORA_CUDA_CHECK(cudaEventCreate(&e));
  int k = 0;
  for (int i = 0; i < warmup; ++i, ++k)
    for (auto& f : fns) f(k);
  std::vector<std::vector<float>> t(n);
  for (int b = 0; b < batches; ++b) {
    const std::size_t first = static_cast<std::size_t>(b) % n;
    fns[first](k);
    LORA_CUDA_CHECK(cudaEventRecord(ev[0], ctx.stream()));
    for (std::size_t j = 0; j < n; ++j) {
      const std::size_t f = (first + j) % n;
      for (int i = 0; i < batch; ++i) fns[f](k + i);
      LORA_CUDA_CHECK(cudaEventRecord(ev[j + 1], ctx.stream()));
    }
    k += batch;
    LORA_CUDA_CHECK(cudaEventSynchronize(ev[n]));
    for (std::size_t j = 0; j < n; ++j) {
      float ms = 0;
      LORA_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[j], ev[j + 1]));
      t[(first + j) % n].push_back(ms / batch);
    }
  }
  LORA_CUDA_CHECK(cudaGetLastError());
  for (auto& e : ev) cudaEventDestroy(e);
  std::vector<double> med;
  for (auto& v : t) med.push_back(detail::median(v));
  return med;
}

/// Median milliseconds per call of fn.
inline double time_ms(CudaContext& ctx, const std::function<void(int)>& fn, int batch = 10, int batches = 15,
                      int warmup = 3) {
  return time_all(ctx, {fn}, batch, batches, warmup)[0];
}

/// Medians of two functions timed in alternating batches.
inline std::pair<double, double> time_pair(CudaContext& ctx, const std::function<void(int)>& f,
                                           const std::function<void(int)>& g, int batch = 10, int batches = 15) {
  const auto m = time_all(ctx, {f, g}, batch, batches, 3);
  return {m[0], m[1]};
}

/// Median milliseconds per call of `batch` calls of fn captured in a CUDA graph and replayed:
/// the GPU time without the host's per-launch cost.
inline double time_graph_ms(CudaContext& ctx, const std::function<void(int)>& fn, int batch = 20, int reps = 11) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  LORA_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < batch; ++i) fn(i);
  LORA_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
  LORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  LORA_CUDA_CHECK(cudaEventCreate(&a));
  LORA_CUDA_CHECK(cudaEventCreate(&b));
  LORA_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
  std::vector<float> t;
  for (int j = 0; j < reps; ++j) {
    LORA_CUDA_CHECK(cudaEventRecord(a, ctx.stream()));
    LORA_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
    LORA_CUDA_CHECK(cudaEventRecord(b, ctx.stream()));
    LORA_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    LORA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / batch);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return detail::median(t);
}

}  // namespace lora::bench
