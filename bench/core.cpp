// Unmerged LoRA forward, X·Wᵀ + s·(X·Aᵀ)·Bᵀ, against the merged GEMM X·Wᵀ of the
// same shapes (the baseline a merged deployment would pay), float, in = out = 4096; and DoRA's
// forward, backward and weight norm (‖W + s·B·A‖_row, which every unmerged DoRA call pays).
#include <benchmark/benchmark.h>

#include <lora/lora.hpp>

namespace {

using Mat = lora::Matrix<float>;

struct Shapes {
  Mat W, X;
  lora::LowRankAdapter<float> ad;
  Shapes(int tokens, int r) : ad(4096, 4096, r, 2.0 * r) {
    lora::Generator g(1);
    W = Mat::Random(4096, 4096) * 0.02f;
    X = Mat::Random(tokens, 4096);
    lora::initialize(ad, lora::init_method::random, g);
  }
};

void BM_merged_gemm(benchmark::State& st) {
  Shapes s(static_cast<int>(st.range(0)), 16);
  Mat Y(s.X.rows(), 4096);
  for (auto _ : st) {
    Y.noalias() = s.X * s.W.transpose();
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * s.X.rows() * 4096.0 * 4096.0, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_unmerged_apply(benchmark::State& st) {
  Shapes s(static_cast<int>(st.range(0)), static_cast<int>(st.range(1)));
  for (auto _ : st) {
    auto Y = s.ad.apply(s.W, s.X);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * s.X.rows() * 4096.0 * 4096.0, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_adapter_backward(benchmark::State& st) {
  Shapes s(static_cast<int>(st.range(0)), static_cast<int>(st.range(1)));
  Mat dY = Mat::Random(s.X.rows(), 4096);
  for (auto _ : st) {
    auto g = s.ad.backward(s.W, s.X, dY);
    benchmark::DoNotOptimize(g.dX.data());
  }
}

struct DoraShapes : Shapes {
  lora::DoraAdapter<float> dora;
  DoraShapes(int tokens, int r) : Shapes(tokens, r), dora(lora::DoraAdapter<float>::from_weight(ad, W)) {}
};

void BM_dora_apply(benchmark::State& st) {
  DoraShapes s(static_cast<int>(st.range(0)), static_cast<int>(st.range(1)));
  for (auto _ : st) {
    auto Y = s.dora.apply(s.W, s.X);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
}

void BM_dora_weight_norm(benchmark::State& st) {
  DoraShapes s(1, static_cast<int>(st.range(0)));
  for (auto _ : st) {
    auto n = s.dora.weight_norm(s.W);
    benchmark::DoNotOptimize(n.data());
    benchmark::ClobberMemory();
  }
}

void BM_dora_backward(benchmark::State& st) {
  DoraShapes s(static_cast<int>(st.range(0)), static_cast<int>(st.range(1)));
  Mat dY = Mat::Random(s.X.rows(), 4096);
  for (auto _ : st) {
    auto g = s.dora.backward(s.W, s.X, dY);
    benchmark::DoNotOptimize(g.dX.data());
  }
}

}  // namespace

BENCHMARK(BM_merged_gemm)->ArgName("tokens")->Arg(1)->Arg(64)->Arg(512)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_unmerged_apply)
    ->ArgNames({"tokens", "r"})
    ->ArgsProduct({{1, 64, 512}, {8, 16, 64, 256}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_adapter_backward)->ArgNames({"tokens", "r"})->Args({512, 16})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_dora_apply)
    ->ArgNames({"tokens", "r"})
    ->ArgsProduct({{1, 64, 512}, {16}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_dora_weight_norm)->ArgName("r")->Arg(16)->Arg(64)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_dora_backward)->ArgNames({"tokens", "r"})->Args({512, 16})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_MAIN();
