// NF4 on the CPU: dequantisation throughput against memcpy of the output,
// batch-1 GEMV from the 4-bit codes (exact and fast modes) against Eigen's float
// GEMV, and the QLoRA forward at 1..16 tokens against dequantise-then-GEMM.
// Side-by-side ratios (and ggml) come from bench_quant_ggml (bench/quant_ggml.cpp).
//
//   ./bench_quant --benchmark_filter=Gemv
#include <lora/quant/qlora.hpp>

#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using lora::Index;
using lora::Matrix;

// Llama-3-8B's down_proj: out 4096, in 14336.
constexpr Index kOut = 4096, kIn = 14336;

struct Fixture {
  Matrix<float> W;
  lora::Nf4Tensor Wq, Wq_dq;
  Fixture() {
    lora::Generator gen(7);
    W.resize(kOut, kIn);
    for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>(0.02 * gen.normal());
    Wq = lora::Nf4Tensor::quantize(W, {64, false});
    Wq_dq = lora::Nf4Tensor::quantize(W, {64, true});
  }
};
Fixture& fixture() {
  static Fixture f;
  return f;
}

Matrix<float> random_tokens(Index T, Index in, std::uint64_t seed) {
  lora::Generator gen(seed);
  Matrix<float> X(T, in);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(gen.normal());
  return X;
}

void set_bytes(benchmark::State& state, std::int64_t bytes) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
}

// ---- dequantisation vs memcpy of the output size ------------------------------
void BM_MemcpyOutput(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(kOut) * kIn * sizeof(float);
  std::unique_ptr<char[]> src(new char[n]), dst(new char[n]);
  std::memset(src.get(), 1, n);
  std::memset(dst.get(), 0, n);
  for (auto _ : state) {
    std::memcpy(dst.get(), src.get(), n);
    benchmark::DoNotOptimize(dst.get());
    benchmark::ClobberMemory();
  }
  set_bytes(state, static_cast<std::int64_t>(n));
}
BENCHMARK(BM_MemcpyOutput)->Unit(benchmark::kMillisecond)->UseRealTime();

template <class T>
void BM_Dequantize(benchmark::State& state) {
  const auto& Wq = state.range(0) ? fixture().Wq_dq : fixture().Wq;
  std::vector<T> out(static_cast<std::size_t>(Wq.numel()));
  for (auto _ : state) {
    Wq.dequantize_into(out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, Wq.numel() * static_cast<std::int64_t>(sizeof(T)));  // output bytes, as memcpy's
}
BENCHMARK(BM_Dequantize<float>)->ArgName("double_quant")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Dequantize<lora::bfloat16>)->ArgName("double_quant")->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Quantize(benchmark::State& state) {
  const auto& W = fixture().W;
  for (auto _ : state) {
    auto t = lora::Nf4Tensor::quantize(W, {64, state.range(0) != 0});
    benchmark::DoNotOptimize(t.packed().data());
  }
  set_bytes(state, W.size() * 4);  // input bytes
}
BENCHMARK(BM_Quantize)->ArgName("double_quant")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- batch-1 GEMV: NF4 codes vs float -----------------------------------------
void BM_GemvNf4(benchmark::State& state) {
  const auto& Wq = fixture().Wq;
  const Matrix<float> x = random_tokens(1, kIn, 3);
  const auto mode = state.range(0) ? lora::quant::nf4_mode::fast : lora::quant::nf4_mode::exact;
  for (auto _ : state) {
    auto y = lora::quant::nf4_matmul_fused(Wq, x, mode);
    benchmark::DoNotOptimize(y.data());
  }
  set_bytes(state, static_cast<std::int64_t>(Wq.packed().size() + 4 * Wq.absmax().size()));
}
BENCHMARK(BM_GemvNf4)->ArgName("fast")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// Eigen's float GEMV y = W·x (single-threaded: Eigen parallelises only GEMM).
void BM_GemvEigenFloat(benchmark::State& state) {
  const auto& W = fixture().W;
  const Matrix<float> x = random_tokens(1, kIn, 3);
  lora::Vector<float> xv = x.transpose(), y(kOut);
  for (auto _ : state) {
    y.noalias() = W * xv;
    benchmark::DoNotOptimize(y.data());
  }
  set_bytes(state, W.size() * 4);
}
BENCHMARK(BM_GemvEigenFloat)->Unit(benchmark::kMillisecond)->UseRealTime();

// The same on both cores: each thread runs Eigen's GEMV on half of the rows.
void BM_GemvEigenFloat2T(benchmark::State& state) {
  const auto& W = fixture().W;
  const Matrix<float> x = random_tokens(1, kIn, 3);
  lora::Vector<float> xv = x.transpose(), y(kOut);
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel
    {
      const int nt = omp_get_num_threads(), t = omp_get_thread_num();
      const Index r0 = kOut * t / nt, r1 = kOut * (t + 1) / nt;
      y.segment(r0, r1 - r0).noalias() = W.middleRows(r0, r1 - r0) * xv;
    }
#else
    y.noalias() = W * xv;
#endif
    benchmark::DoNotOptimize(y.data());
  }
  set_bytes(state, W.size() * 4);
}
BENCHMARK(BM_GemvEigenFloat2T)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- QLoRA forward at 1..16 tokens ---------------------------------------------
struct Layer {
  lora::QLoraLinear<> layer;
  static Layer make() {
    lora::Generator gen(11);
    Matrix<float> A(16, kIn), B(kOut, 16);
    for (Index i = 0; i < A.size(); ++i) A.data()[i] = static_cast<float>(0.01 * gen.normal());
    for (Index i = 0; i < B.size(); ++i) B.data()[i] = static_cast<float>(0.01 * gen.normal());
    return {lora::QLoraLinear<>(fixture().Wq_dq, lora::LowRankAdapter<float>::from_factors(A, B, 32.0))};
  }
};
Layer& layer() {
  static Layer l = Layer::make();
  return l;
}

void BM_QLoraForward(benchmark::State& state) {
  const Index T = state.range(0);
  const Matrix<float> X = random_tokens(T, kIn, 5);
  for (auto _ : state) {
    auto y = layer().layer.forward(X);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_QLoraForward)->ArgName("tokens")->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

// The base product alone, X·dequant(W)ᵀ from the codes (no adapter, no Eigen GEMM).
void BM_Nf4MatmulFused(benchmark::State& state) {
  const Index T = state.range(0);
  const Matrix<float> X = random_tokens(T, kIn, 5);
  const auto mode = state.range(1) ? lora::quant::nf4_mode::fast : lora::quant::nf4_mode::exact;
  for (auto _ : state) {
    auto y = lora::quant::nf4_matmul_fused(fixture().Wq_dq, X, mode);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Nf4MatmulFused)->ArgNames({"tokens", "fast"})->ArgsProduct({{1, 4, 8, 16}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime();

// Reference: dequantise the whole weight, then Eigen's GEMM (+ the adapter).
void BM_QLoraForwardDequantGemm(benchmark::State& state) {
  const Index T = state.range(0);
  const Matrix<float> X = random_tokens(T, kIn, 5);
  const auto& l = layer().layer;
  Matrix<float> Wd(kOut, kIn);
  for (auto _ : state) {
    l.base().dequantize_into(Wd.data());
    Matrix<float> y = X * Wd.transpose();
    y.noalias() += l.adapter().forward(X);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_QLoraForwardDequantGemm)->ArgName("tokens")->Arg(1)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

// Backward dX at 16 tokens (fused, from the codes).
void BM_QLoraBackward(benchmark::State& state) {
  const Index T = state.range(0);
  const Matrix<float> X = random_tokens(T, kIn, 5);
  const Matrix<float> dY = random_tokens(T, kOut, 6);
  for (auto _ : state) {
    auto g = layer().layer.backward(X, dY);
    benchmark::DoNotOptimize(g.dX.data());
  }
}
BENCHMARK(BM_QLoraBackward)->ArgName("tokens")->Arg(1)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  fixture();  // quantise the weight (and build the layer) before anything is timed
  layer();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
