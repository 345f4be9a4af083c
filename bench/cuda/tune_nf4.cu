// tune_nf4 [out.csv]: variants of the single-token NF4 GEMV (W 14336 × 4096, blocksize 64,
// bf16 x/y) against cuBLAS bf16 GEMV and the copy bandwidth, in one run, with each
// variant's relative error against a float32 cuBLAS product of the dequantised W.
// Four weight sets rotate so that every call reads W from device memory (33 MB of NF4
// would otherwise sit in the 50 MB L2). Also T = 16: the fused kernel against
// dequantise + cuBLAS. Used to pick the parameters of nf4_gemm (docs/performance.md).
#include <lora/cuda/nf4.cuh>
#include <lora/cuda/runtime.hpp>
#include <lora/core/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

using namespace lora;
using S = bfloat16;
using T = __nv_bfloat16;

namespace {

double time_ms(CudaContext& ctx, const std::function<void(int)>& fn, int batch = 20, int batches = 21) {
  cudaEvent_t a, b;
  LORA_CUDA_CHECK(cudaEventCreate(&a));
  LORA_CUDA_CHECK(cudaEventCreate(&b));
  int k = 0;
  for (int i = 0; i < 5; ++i) fn(k++);
  std::vector<float> t;
  for (int j = 0; j < batches; ++j) {
    LORA_CUDA_CHECK(cudaEventRecord(a, ctx.stream()));
    for (int i = 0; i < batch; ++i) fn(k++);
    LORA_CUDA_CHECK(cudaEventRecord(b, ctx.stream()));
    LORA_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    LORA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / batch);
  }
  LORA_CUDA_CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

void fill_random(DeviceView<S> v, Generator& g, double scale) {
  Matrix<S> h(v.rows, v.cols);
  for (Index i = 0; i < h.rows(); ++i)
    for (Index j = 0; j < h.cols(); ++j) h(i, j) = S(static_cast<float>(g.normal() * scale));
  upload<S>(h, v);
}

}  // namespace

int main(int argc, char** argv) {
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : stdout;
  auto ctx = CudaContext::thread_default();
  Generator g(20261123);
  const Index out = 14336, in = 4096;
  const int sets = 4;
  std::fprintf(csv, "name,ms,GBps,rel_err\n");

  const std::size_t cb = std::size_t(1) << 30;
  DeviceBuffer<char> ca(cb), cbuf(cb);
  LORA_CUDA_CHECK(cudaMemset(ca.data(), 1, cb));
  const double copy_ms = time_ms(*ctx, [&](int) {
    LORA_CUDA_CHECK(cudaMemcpyAsync(cbuf.data(), ca.data(), cb, cudaMemcpyDeviceToDevice, ctx->stream()));
  }, 2, 9);
  const double copy_gbps = 2.0 * cb / copy_ms / 1e6;
  std::fprintf(csv, "copy,%.5f,%.1f,0\n", copy_ms, copy_gbps);

  std::vector<DeviceMatrix<S>> W;
  std::vector<DeviceNF4> q;
  for (int i = 0; i < sets; ++i) {
    W.emplace_back(out, in);
    fill_random(W.back().view(), g, 0.02);
    q.push_back(nf4_quantize<S>(W.back().view(), 64, *ctx));
  }
  DeviceMatrix<S> X(1, in), Y(1, out);
  fill_random(X.view(), g, 1.0);
  // reference: float32 product of the dequantised set 0
  DeviceMatrix<float> Df(out, in), Xf(1, in), Yf(1, out);
  nf4_dequantize<float>(q[0], Df.view(), *ctx);
  {
    Matrix<S> xh = to_host(X.view());
    upload<float>(Matrix<float>(xh.template cast<float>()), Xf.view());
  }
  detail::gemm<float, float, float>(*ctx, false, true, 1, out, in, 1.f, Xf.view(), Df.view(), 0.f, Yf.view());
  const Matrix<float> ref = to_host(Yf.view());
  auto rel_err = [&]() {
    Matrix<S> y = to_host(Y.view());
    double num = 0, den = 0;
    for (Index j = 0; j < out; ++j) {
      const double d = double(float(y(0, j))) - ref(0, j);
      num += d * d;
      den += double(ref(0, j)) * ref(0, j);
    }
    return std::sqrt(num / den);
  };
  const double nf4_bytes = out * in / 2.0 + out * in / 64.0 * 4 + (in + out) * 2.0;
  auto report = [&](const char* name, double ms, double err) {
    std::fprintf(csv, "%s,%.5f,%.1f,%.2e\n", name, ms, nf4_bytes / ms / 1e6, err);
    std::fprintf(stderr, "%-28s %8.2f us  %6.0f GB/s (%3.0f%% of copy)  err %.1e\n", name, ms * 1e3,
                 nf4_bytes / ms / 1e6, 100 * nf4_bytes / ms / 1e6 / copy_gbps, err);
  };
  const double cub = time_ms(*ctx, [&](int i) {
    detail::gemm<S, S, S>(*ctx, false, true, 1, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
  });
  std::fprintf(csv, "cublas_bf16_gemv,%.5f,%.1f,0\n", cub, out * in * 2.0 / cub / 1e6);
  std::fprintf(stderr, "copy %.0f GB/s; cuBLAS bf16 GEMV %.2f us\n", copy_gbps, cub * 1e3);

  auto run_old = [&](int i) {
    detail::nf4_gemv_kernel<T, 1, detail::nf4_rows><<<detail::ceil_div(out, detail::nf4_rows), detail::nf4_threads, 0,
                                                       ctx->stream()>>>(
        reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in), q[i % sets].packed.data(),
        q[i % sets].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y.data()), Y.view().ld);
  };
  auto variant = [&](const char* name, auto launch) {
    LORA_CUDA_CHECK(cudaMemset(Y.data(), 0xff, out * sizeof(T)));
    launch(0);
    LORA_CUDA_CHECK(cudaGetLastError());
    const double err = rel_err();
    const double ms = time_ms(*ctx, launch);
    report(name, ms, err);
    return ms;
  };
#define MMA(NT, KS, P)                                                                                         \
  variant("mma NT" #NT " KS" #KS " P" #P, [&](int i) {                                                        \
    detail::launch_nf4_mma<T, NT, KS, P>(reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in),        \
                                         q[i % sets].packed.data(), q[i % sets].absmax.data(), 64, int(out),    \
                                         reinterpret_cast<T*>(Y.data()), Y.view().ld, ctx->stream());           \
  })
  variant("old fused (ROWS 4)", run_old);
  MMA(1, 4, 4);
  MMA(1, 4, 2);
  MMA(1, 8, 2);
  MMA(1, 8, 4);
  MMA(1, 2, 4);
  MMA(1, 2, 8);
  MMA(1, 4, 8);
  variant("nf4_gemm (library)", [&](int i) { nf4_gemm<S>(q[i % sets], X.view(), Y.view(), *ctx); });
  variant("old fused again", run_old);

  // T = 16: the fused kernel against dequantise + cuBLAS
  {
    const Index Tn = 16;
    DeviceMatrix<S> X16(Tn, in), Y16(Tn, out), D(out, in);
    fill_random(X16.view(), g, 1.0);
    const double fused = time_ms(*ctx, [&](int i) { nf4_gemm<S>(q[i % sets], X16.view(), Y16.view(), *ctx); });
    const double deq = time_ms(*ctx, [&](int i) {
      nf4_dequantize<S>(q[i % sets], D.view(), *ctx);
      detail::gemm<S, S, S>(*ctx, false, true, Tn, out, in, 1.f, X16.view(), D.view(), 0.f, Y16.view());
    });
    const double base = time_ms(*ctx, [&](int i) {
      detail::gemm<S, S, S>(*ctx, false, true, Tn, out, in, 1.f, X16.view(), W[i % sets].view(), 0.f, Y16.view());
    });
    // Tiles of rows: dequantise 1024 (or 2048) rows into an L2-resident scratch, GEMM into Y's columns.
    auto tiled = [&](Index tile) {
      return time_ms(*ctx, [&](int i) {
        const DeviceNF4& w = q[i % sets];
        for (Index r0 = 0; r0 < out; r0 += tile) {
          const Index rows = std::min(tile, out - r0);
          const long groups = rows * in / 8;
          detail::nf4_dequantize_kernel<T><<<detail::ceil_div(groups, 256), 256, 0, ctx->stream()>>>(
              w.packed.data() + r0 * in / 2, w.absmax.data() + r0 * in / 64, groups, 64,
              reinterpret_cast<T*>(D.data()));
          detail::gemm<S, S, S>(*ctx, false, true, Tn, rows, in, 1.f, X16.view(),
                                DeviceView<const S>(D.data(), rows, in, in), 0.f, Y16.view().col_block(r0, rows));
        }
      });
    };
    const double t1k = tiled(1024), t2k = tiled(2048), t512 = tiled(512);
    // tensor-core kernel at 16 tokens, its error against float32 on the dequantised set 0
    auto mma16 = [&](auto launch, const char* name) {
      auto f = [&](int i) {
        launch(reinterpret_cast<const T*>(X16.data()), X16.view().ld, int(Tn), int(in), q[i % sets].packed.data(),
               q[i % sets].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y16.data()), Y16.view().ld,
               ctx->stream());
      };
      f(0);
      LORA_CUDA_CHECK(cudaGetLastError());
      DeviceMatrix<float> X16f(Tn, in), Y16f(Tn, out);
      {
        Matrix<S> xh = to_host(X16.view());
        upload<float>(Matrix<float>(xh.template cast<float>()), X16f.view());
      }
      detail::gemm<float, float, float>(*ctx, false, true, Tn, out, in, 1.f, X16f.view(), Df.view(), 0.f,
                                        Y16f.view());
      const Matrix<float> r16 = to_host(Y16f.view());
      const Matrix<S> y16 = to_host(Y16.view());
      double num = 0, den = 0;
      for (Index t = 0; t < Tn; ++t)
        for (Index j = 0; j < out; ++j) {
          const double dd = double(float(y16(t, j))) - r16(t, j);
          num += dd * dd;
          den += double(r16(t, j)) * r16(t, j);
        }
      const double ms = time_ms(*ctx, f);
      std::fprintf(stderr, "T16 %-20s %8.2f us  err %.1e\n", name, ms * 1e3, std::sqrt(num / den));
      std::fprintf(csv, "t16_%s,%.5f,0,%.2e\n", name, ms, std::sqrt(num / den));
    };
    mma16(detail::launch_nf4_mma<T, 2, 4, 4>, "mma_KS4_P4");
    mma16(detail::launch_nf4_mma<T, 2, 4, 2>, "mma_KS4_P2");
    mma16(detail::launch_nf4_mma<T, 2, 8, 2>, "mma_KS8_P2");
    mma16(detail::launch_nf4_mma<T, 2, 2, 4>, "mma_KS2_P4");
    std::fprintf(stderr,
                 "T16: fused %.2f us, dequant+cuBLAS %.2f us, tiled 512 %.2f / 1024 %.2f / 2048 %.2f us, "
                 "cuBLAS bf16 %.2f us\n",
                 fused * 1e3, deq * 1e3, t512 * 1e3, t1k * 1e3, t2k * 1e3, base * 1e3);
    std::fprintf(csv, "t16_tiled512,%.5f,0,0\nt16_tiled1024,%.5f,0,0\nt16_tiled2048,%.5f,0,0\n", t512, t1k, t2k);
    std::fprintf(csv, "t16_fused,%.5f,0,0\nt16_dequant_gemm,%.5f,0,0\nt16_cublas_bf16,%.5f,0,0\n", fused, deq, base);
  }
  if (csv != stdout) std::fclose(csv);
  return 0;
}
