// tune_gemm [out.csv]: the fused forward's big GEMM under every algorithm cuBLASLt's
// heuristic offers (detail::LtGemm, lora/cuda/lt.hpp: up to 8, 32 MiB workspace), against
// cublasGemmEx's default choice for the base GEMM (bf16, float accumulation, T 16384,
// 4096 → 4096). Does some algorithm run the K = in + rp GEMM on the
// fused layout (or K = in + r) at the base GEMM's speed? All variants of one table are timed
// in alternating batches (bench::time_all). Prints CSV: name,K,ld,algo_index,ms,ratio_to_base.

#include <lora/cuda.hpp>

#include "common.cuh"

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

using namespace lora;
using S = bfloat16;

namespace {

struct Case {
  const char* name;
  long K;
  bool padded;
};

}  // namespace

int main(int argc, char** argv) {
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : stdout;
  if (!csv) return 1;
  auto ctx = CudaContext::thread_default();
  Generator g(7);
  const long T = 16384, in = 4096, out = 4096, rp = 64, r = 16, ld = in + rp;
  DeviceMatrix<S> Xc(T, in), Xp(T, ld), Wc(out, in), Wide(out, ld), Y(T, out);
  bench::fill_random(Xc.view(), g, 1.0);
  bench::fill_random(Xp.view(), g, 1.0);
  bench::fill_random(Wc.view(), g, 0.02);
  bench::fill_random(Wide.view(), g, 0.02);
  auto base = [&](int) {
    detail::gemm<S, S, S>(*ctx, false, true, T, out, in, 1.f, DeviceView<const S>(Xc.view()),
                          DeviceView<const S>(Wc.view()), 0.f, Y.view());
  };
  std::fprintf(csv, "name,K,ld,algo,ms,ratio\n");
  const Case cases[] = {{"base_contiguous", in, false},
                        {"fused_k_in_rp", in + rp, true},
                        {"fused_k_in_r", in + r, true},
                        {"fused_k_in", in, true}};
  for (const Case& c : cases) {
    const long ldx = c.padded ? ld : in;
    const DeviceView<const S> X = c.padded ? DeviceView<const S>(Xp.view()).col_block(0, c.K)
                                           : DeviceView<const S>(Xc.view()).col_block(0, c.K);
    const DeviceView<const S> W = c.padded ? DeviceView<const S>(Wide.view()).col_block(0, c.K)
                                           : DeviceView<const S>(Wc.view()).col_block(0, c.K);
    // The library's plan (the same heuristic query the fused forward's tuner makes).
    const detail::LtGemm lg(*ctx, false, true, T, out, c.K, X, W, Y.view());
    std::vector<std::function<void(int)>> fns = {
        base, [&](int) { detail::gemm<S, S, S>(*ctx, false, true, T, out, c.K, 1.f, X, W, 0.f, Y.view()); }};
    for (int i = 0; i < lg.candidates(); ++i) fns.push_back([&, i](int) { lg.run(*ctx, i, X, W, Y.view()); });
    const auto t = bench::time_all(*ctx, fns, 10, 15, 3);
    std::fprintf(csv, "%s,%ld,%ld,base_gemmex,%.5f,%.4f\n", c.name, c.K, ldx, t[0], 1.0);
    std::fprintf(csv, "%s,%ld,%ld,gemmex,%.5f,%.4f\n", c.name, c.K, ldx, t[1], t[1] / t[0]);
    for (int i = 0; i < lg.candidates(); ++i) {
      const double ti = t[static_cast<std::size_t>(i) + 2];
      std::fprintf(csv, "%s,%ld,%ld,lt%d,%.5f,%.4f\n", c.name, c.K, ldx, i, ti, ti / t[0]);
    }
    std::fflush(csv);
  }
  return 0;
}
