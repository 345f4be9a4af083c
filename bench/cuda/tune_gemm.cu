// tune_gemm [out.csv]: the fused forward's big GEMM under every algorithm cuBLASLt's
// heuristic offers, against cublasGemmEx's default choice for the base GEMM (bf16, float
// accumulation, T 16384, 4096 → 4096). Does some algorithm run the K = in + rp GEMM on the
// fused layout (or K = in + r) at the base GEMM's speed? All variants of one table are timed
// in alternating batches (bench::time_all). Prints CSV: name,K,ld,algo_index,ms,ratio_to_base.

#include <lora/cuda.hpp>

#include "common.cuh"

#include <cublasLt.h>

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

struct Lt {
  cublasLtHandle_t h = nullptr;
  DeviceBuffer<unsigned char> ws;
  Lt() : ws(std::size_t{64} << 20) { LORA_CUDA_CHECK(cublasLtCreate(&h)); }
  ~Lt() { cublasLtDestroy(h); }
};

/// Y [T × N] = X [T × K] (ld ldx) · W [N × K]ᵀ (ld ldw), row-major, as column-major
/// Yᵀ = op_T(W)·X: the same call the library's detail::gemm makes through cublasGemmEx.
struct LtGemm {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  static constexpr int max_algos = 16;
  cublasLtMatmulHeuristicResult_t algos[max_algos];  // (a std::vector of these crashes nvcc 13's front end)
  int n_algos = 0;
  LtGemm(Lt& lt, long T, long N, long K, long ldx, long ldw, long ldy) {
    LORA_CUDA_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    LORA_CUDA_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    LORA_CUDA_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    LORA_CUDA_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, N, ldw));
    LORA_CUDA_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, T, ldx));
    LORA_CUDA_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, T, ldy));
    cublasLtMatmulPreference_t pref = nullptr;
    LORA_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const std::size_t ws = lt.ws.size();
    LORA_CUDA_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    LORA_CUDA_CHECK(cublasLtMatmulAlgoGetHeuristic(lt.h, op, la, lb, lc, lc, pref, max_algos, algos, &n_algos));
    cublasLtMatmulPreferenceDestroy(pref);
  }
  ~LtGemm() {
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(op);
  }
  void run(Lt& lt, CudaContext& ctx, int i, const S* X, const S* W, S* Y) const {
    const float one = 1.f, zero = 0.f;
    LORA_CUDA_CHECK(cublasLtMatmul(lt.h, op, &one, W, la, X, lb, &zero, Y, lc, Y, lc, &algos[i].algo, lt.ws.data(),
                                   lt.ws.size(), ctx.stream()));
  }
};

}  // namespace

int main(int argc, char** argv) {
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : stdout;
  if (!csv) return 1;
  auto ctx = CudaContext::thread_default();
  Generator g(7);
  Lt lt;
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
  auto gemmex = [&](long K, bool padded) {
    return [&, K, padded](int) {
      const DeviceView<const S> X = padded ? DeviceView<const S>(Xp.view()).col_block(0, K)
                                           : DeviceView<const S>(Xc.view()).col_block(0, K);
      const DeviceView<const S> W = padded ? DeviceView<const S>(Wide.view()).col_block(0, K)
                                           : DeviceView<const S>(Wc.view()).col_block(0, K);
      detail::gemm<S, S, S>(*ctx, false, true, T, out, K, 1.f, X, W, 0.f, Y.view());
    };
  };
  std::fprintf(csv, "name,K,ld,algo,ms,ratio\n");
  const Case cases[] = {{"base_contiguous", in, false},
                        {"fused_k_in_rp", in + rp, true},
                        {"fused_k_in_r", in + r, true},
                        {"fused_k_in", in, true}};
  for (const Case& c : cases) {
    const long ldx = c.padded ? ld : in;
    LtGemm lg(lt, T, out, c.K, ldx, ldx, out);
    const S* X = c.padded ? Xp.data() : Xc.data();
    const S* W = c.padded ? Wide.data() : Wc.data();
    std::vector<std::function<void(int)>> fns = {base, gemmex(c.K, c.padded)};
    for (int i = 0; i < lg.n_algos; ++i) fns.push_back([&, i](int) { lg.run(lt, *ctx, i, X, W, Y.data()); });
    const auto t = bench::time_all(*ctx, fns, 10, 15, 3);
    std::fprintf(csv, "%s,%ld,%ld,base_gemmex,%.5f,%.4f\n", c.name, c.K, ldx, t[0], 1.0);
    std::fprintf(csv, "%s,%ld,%ld,gemmex,%.5f,%.4f\n", c.name, c.K, ldx, t[1], t[1] / t[0]);
    for (int i = 0; i < lg.n_algos; ++i) {
      const double ti = t[static_cast<std::size_t>(i) + 2];
      std::fprintf(csv, "%s,%ld,%ld,lt%d,%.5f,%.4f\n", c.name, c.K, ldx, i, ti, ti / t[0]);
    }
    std::fflush(csv);
  }
  return 0;
}
