// Mixed-adapter batches on the CPU: in = out = 4096, r = 16, T tokens spread
// over N adapters. Baselines measured in the same run: the same batch on one
// adapter (batched_apply with all ids equal), the naive loop (one
// LowRankAdapter::apply per adapter over its tokens), and the merged GEMM X·Wᵀ.
#include <benchmark/benchmark.h>

#include <lora/lora.hpp>
#include <lora/multi/adapter_set.hpp>

#include <map>
#include <memory>
#include <vector>

namespace {

using Mat = lora::Matrix<float>;
constexpr int kDim = 4096, kRank = 16;

struct World {
  Mat W;
  std::vector<lora::LowRankAdapter<float>> adapters;
  lora::multi::AdapterSet<float> set{kDim, kDim};
  World() {
    W = Mat::Random(kDim, kDim) * 0.02f;
    lora::Generator g(7);
    for (int i = 0; i < 512; ++i) {
      lora::LowRankAdapter<float> ad(kDim, kDim, kRank, 32.0);
      lora::initialize(ad, lora::init_method::random, g);
      set.add("a" + std::to_string(i), ad);
      adapters.push_back(std::move(ad));
    }
  }
};
World& world() {
  static World w;
  return w;
}

std::vector<int> spread_ids(int tokens, int n_adapters) {
  std::vector<int> ids(static_cast<std::size_t>(tokens));
  lora::Generator g(11);
  for (auto& i : ids) i = static_cast<int>(g.next() % static_cast<std::uint64_t>(n_adapters));
  return ids;
}

void BM_mixed(benchmark::State& st) {
  auto& w = world();
  const int T = static_cast<int>(st.range(0)), N = static_cast<int>(st.range(1));
  Mat X = Mat::Random(T, kDim);
  const auto ids = spread_ids(T, N);
  for (auto _ : st) {
    auto Y = lora::multi::batched_apply(w.set, w.W, X, ids);
    benchmark::DoNotOptimize(Y.data());
  }
}

void BM_single_adapter(benchmark::State& st) {
  auto& w = world();
  const int T = static_cast<int>(st.range(0));
  Mat X = Mat::Random(T, kDim);
  const std::vector<int> ids(static_cast<std::size_t>(T), 0);
  for (auto _ : st) {
    auto Y = lora::multi::batched_apply(w.set, w.W, X, ids);
    benchmark::DoNotOptimize(Y.data());
  }
}

// One apply() per adapter over its own tokens: the base GEMM runs once per adapter.
void BM_naive_loop(benchmark::State& st) {
  auto& w = world();
  const int T = static_cast<int>(st.range(0)), N = static_cast<int>(st.range(1));
  Mat X = Mat::Random(T, kDim);
  const auto ids = spread_ids(T, N);
  std::map<int, std::vector<int>> groups;
  for (int t = 0; t < T; ++t) groups[ids[static_cast<std::size_t>(t)]].push_back(t);
  Mat Y(T, kDim);
  for (auto _ : st) {
    for (auto& [id, rows] : groups) {
      Mat xs(static_cast<lora::Index>(rows.size()), kDim);
      for (std::size_t j = 0; j < rows.size(); ++j) xs.row(static_cast<lora::Index>(j)) = X.row(rows[j]);
      Mat ys = w.adapters[static_cast<std::size_t>(id)].apply(w.W, xs);
      for (std::size_t j = 0; j < rows.size(); ++j) Y.row(rows[j]) = ys.row(static_cast<lora::Index>(j));
    }
    benchmark::DoNotOptimize(Y.data());
  }
}

void BM_merged_gemm(benchmark::State& st) {
  auto& w = world();
  Mat X = Mat::Random(st.range(0), kDim);
  Mat Y(X.rows(), kDim);
  for (auto _ : st) {
    Y.noalias() = X * w.W.transpose();
    benchmark::DoNotOptimize(Y.data());
  }
}

}  // namespace

BENCHMARK(BM_merged_gemm)->ArgName("T")->Arg(1)->Arg(16)->Arg(256)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_single_adapter)->ArgName("T")->Arg(1)->Arg(16)->Arg(256)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_mixed)
    ->ArgNames({"T", "adapters"})
    ->ArgsProduct({{1, 16, 256, 4096}, {1, 8, 64, 512}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_naive_loop)
    ->ArgNames({"T", "adapters"})
    ->ArgsProduct({{16, 256}, {8, 64}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_MAIN();
