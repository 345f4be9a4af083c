// Spectrum of ΔW = s·B·A from the factors vs a dense SVD of the formed ΔW, on
// Llama-3-8B shapes (r = 64). The whole-adapter number (224 modules) comes from
// `lora inspect` on the adapter bench/make_llama8b_adapter.py writes; see docs/analysis.md.
#include <lora/analysis/lowrank_svd.hpp>

#include <benchmark/benchmark.h>

using namespace lora;

namespace {

template <class S>
Matrix<S> filled(Index rows, Index cols, double scale) {
  Generator gen(rows * 31 + cols);
  Matrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(static_cast<float>(gen.normal(0.0, scale)));
  return m;
}

// args: out, in, r
void BM_SingularValuesBf16(benchmark::State& st) {
  const Index out = st.range(0), in = st.range(1), r = st.range(2);
  const auto B = filled<bfloat16>(out, r, 0.01), A = filled<bfloat16>(r, in, 0.02);
  for (auto _ : st) benchmark::DoNotOptimize(analysis::lowrank_singular_values(B, A, 2.0));
  st.counters["params"] = double((out + in) * r);
}
BENCHMARK(BM_SingularValuesBf16)->Args({4096, 4096, 64})->Args({1024, 4096, 64})->Args({14336, 4096, 64})
    ->Args({4096, 14336, 64})->Unit(benchmark::kMillisecond);

void BM_LowrankSvdFloat(benchmark::State& st) {
  const Index out = st.range(0), in = st.range(1), r = st.range(2);
  const auto B = filled<float>(out, r, 0.01), A = filled<float>(r, in, 0.02);
  for (auto _ : st) benchmark::DoNotOptimize(analysis::lowrank_svd(B, A, 2.0));
}
BENCHMARK(BM_LowrankSvdFloat)->Args({4096, 4096, 64})->Args({14336, 4096, 64})->Unit(benchmark::kMillisecond);

// The dense baseline people use today: BDCSVD of the formed ΔW (values only).
// 4096 × 4096 takes minutes here; 1024 × 1024 shows the scaling.
void BM_DenseSvdFloat(benchmark::State& st) {
  const Index n = st.range(0), r = 64;
  const auto B = filled<float>(n, r, 0.01), A = filled<float>(r, n, 0.02);
  const Matrix<float> dw = 2.0f * B * A;
  for (auto _ : st) {
    Eigen::BDCSVD<Eigen::MatrixXf> svd(dw);
    benchmark::DoNotOptimize(svd.singularValues().data());
  }
}
BENCHMARK(BM_DenseSvdFloat)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();
