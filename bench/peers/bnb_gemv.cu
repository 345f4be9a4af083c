// bnb_gemv [out.csv]: bitsandbytes' NF4 kernels beside cuBLAS bf16 and our nf4_gemm on the
// same packed codes and scales (issue 23). Their kernels are compiled from their own csrc/
// (bench/peers/CMakeLists.txt, -DBNB_SRC=<bitsandbytes>/csrc; no bitsandbytes source is in this
// repository) and called as their Python layer calls them:
//   - kgemm_4bit_inference_naive<bf16, 128, 16>, grid (out + 3) / 4, 128 threads: what
//     bnb.matmul_4bit runs for ONE token (gemv_4bit; the kernel takes one row of X only);
//   - cgemm_4bit_bf16, their fused 4-bit GEMM (SIMT for ≤ 3 rows, mma.sync above), which their
//     dispatch runs for a few tokens (on sm90 it may prefer dequantise + F.linear at some T);
//   - kQuantizeBlockwiseSmall<bf16, 64, NF4> quantises W (blocksize 64, float absmax, two codes per
//     byte, first element in the high nibble: our layout too, so ours reads the same bytes).
// W is N(0, 0.02²) bf16, X N(0, 1), both drawn on the device. Every output is poisoned (NaN), then
// checked against a float64 product on the host over every 7th output row (dequantised NF4 for
// the NF4 kernels, the bf16 W for cuBLAS); all T·out outputs must be written. Timing by
// bench/cuda/common.cuh's time_all on lora's context stream: alternating batches of 10 calls,
// 15 rounds, rotated order, one untimed call per round, medians; weights rotate among copies
// that together exceed 3× L2.
// CSV (ours.csv's columns): name,in,out,tokens,r,ms,extra with extra = GB/s over
// out·in/2 + out·in/64·4 + T·(in + out)·2 bytes; check_* rows carry the relative error in extra.
// LORA_PEERS_OURS (set by CMakeLists.txt from the headers it finds): 1 = lora::DeviceNF4 with
// lora::nf4_gemm, 2 = lora::detail::Nf4Parts with lora::detail::nf4_gemm, 0 = no ours rows.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <lora/quant/nf4.hpp>
#if LORA_PEERS_OURS
#include <lora/cuda.hpp>
#endif

#include "../cuda/common.cuh"  // lora::bench::time_all, the timing of bench/cuda

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

// bitsandbytes' entry points, declared as csrc/kernels.cu and csrc/gemm_4bit.cu define them
// (bnb_bfloat16 is __nv_bfloat16 and bnb_stream_t cudaStream_t on CUDA; NF4 is DataType_t 2).
template <typename T, int THREADS, int BITS>
__global__ void kgemm_4bit_inference_naive(int M, int N, int K, T* __restrict__ const A, unsigned char* B,
                                           float* absmax, const float* datatype, T* out, int lda, int ldb, int ldc,
                                           int blocksize);
template <typename T, int QBLOCK_SIZE, int DATA_TYPE>
__global__ void kQuantizeBlockwiseSmall(float* code, T* __restrict__ const A, float* absmax, unsigned char* out,
                                        float* __restrict__ const rand, const int rand_offset, const int n);
extern "C" void cgemm_4bit_bf16(const __nv_bfloat16* A, const std::uint8_t* B, const float* absmax,
                                const std::uint8_t* absmax_8bit, const float* absmax_code,
                                const float* absmax_offset, __nv_bfloat16* out, const __nv_bfloat16* bias, int M,
                                int N, int K, int blocksize, int quant_type, cudaStream_t stream);

namespace {

#define CK(x) check_cuda((x), #x, __LINE__)
void check_cuda(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "bnb_gemv: %s failed at line %d: %s\n", what, line, cudaGetErrorString(e));
    std::exit(1);
  }
}
void check_blas(cublasStatus_t s, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "bnb_gemv: cuBLAS status %d at line %d\n", static_cast<int>(s), line);
    std::exit(1);
  }
}
#define CB(x) check_blas((x), __LINE__)

using bf16 = __nv_bfloat16;
FILE* csv = stdout;
cudaStream_t stream;

void emit(const char* name, long in, long out, long T, double ms, double extra) {
  std::fprintf(csv, "%s,%ld,%ld,%ld,0,%.5f,%.5g\n", name, in, out, T, ms, extra);
  std::fflush(csv);
}

__device__ std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// p[i] = N(0, scale²) by Box-Muller on a counter hash (seed, i).
__global__ void fill_normal(bf16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    const std::uint64_t h = splitmix(seed * 0x100000001B3ull + i);
    const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777217.0f);
    const float u2 = static_cast<float>((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
    p[i] = __float2bfloat16(scale * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

std::vector<float> to_host_float(const bf16* d, std::size_t n) {
  std::vector<bf16> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (std::size_t i = 0; i < n; ++i) f[i] = __bfloat162float(h[i]);
  return f;
}

/// Every 7th row of W as float64, for the references (w(j, k) for j = 0, 7, 14, …).
std::vector<double> sampled_rows(long out, long in, const std::function<double(long, long)>& w) {
  std::vector<double> r;
  r.reserve(static_cast<std::size_t>((out + 6) / 7 * in));
  for (long j = 0; j < out; j += 7)
    for (long k = 0; k < in; ++k) r.push_back(w(j, k));
  return r;
}

/// ‖y − ref‖ / ‖ref‖ over every 7th output column j of Y [T × out] (ref = X·Wᵀ in float64 over
/// the sampled rows); -1 if any of the T·out outputs is not finite (unwritten: still the NaN poison).
double rel_error(const bf16* Yd, long T, long out, long in, const std::vector<float>& X,
                 const std::vector<double>& rows) {
  const auto Y = to_host_float(Yd, static_cast<std::size_t>(T * out));
  for (float v : Y)
    if (!std::isfinite(v)) return -1;
  double num = 0, den = 0;
  for (long j = 0, s = 0; j < out; j += 7, ++s)
    for (long t = 0; t < T; ++t) {
      const double* w = rows.data() + s * in;
      const float* x = X.data() + t * in;
      double ref = 0;
      for (long k = 0; k < in; ++k) ref += static_cast<double>(x[k]) * w[k];
      const double d = Y[t * out + j] - ref;
      num += d * d;
      den += ref * ref;
    }
  return std::sqrt(num / den);
}

bool failed = false;

void bench_shape(cublasHandle_t h, long out, long in, const float* code_dev, int l2) {
  const std::size_t n = static_cast<std::size_t>(out) * in;
  const int bs = 64;
  const double wbytes = n * 2.0, qbytes = n / 2.0 + n / 64.0 * 4;
  const int sets = std::max(4, static_cast<int>(3.0 * l2 / wbytes) + 1);
  const int qsets = std::max(4, static_cast<int>(3.0 * l2 / qbytes) + 1);
  std::vector<bf16*> W(sets);
  std::vector<std::uint8_t*> P(qsets);
  std::vector<float*> M(qsets);
  for (int s = 0; s < sets; ++s) {
    CK(cudaMalloc(&W[s], n * sizeof(bf16)));
    fill_normal<<<1024, 256, 0, stream>>>(W[s], n, 1000 + s + out, 0.02f);
    CK(cudaGetLastError());
  }
  for (int s = 0; s < qsets; ++s) {  // bitsandbytes' own quantiser (their quantizeBlockwise at blocksize 64)
    CK(cudaMalloc(&P[s], n / 2));
    CK(cudaMalloc(&M[s], n / bs * sizeof(float)));
    kQuantizeBlockwiseSmall<bf16, 64, 2><<<static_cast<unsigned>(n / bs), 32, 0, stream>>>(
        nullptr, W[s % sets], M[s], P[s], nullptr, 0, static_cast<int>(n));
    CK(cudaGetLastError());
  }
  CK(cudaStreamSynchronize(stream));
#if LORA_PEERS_OURS == 1
  std::vector<lora::DeviceNF4> ours(qsets);
  for (int s = 0; s < qsets; ++s) {
    ours[s].packed = lora::DeviceBuffer<std::uint8_t>(n / 2);
    ours[s].absmax = lora::DeviceBuffer<float>(n / bs);
    CK(cudaMemcpy(ours[s].packed.data(), P[s], n / 2, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(ours[s].absmax.data(), M[s], n / bs * sizeof(float), cudaMemcpyDeviceToDevice));
    ours[s].rows = out;
    ours[s].cols = in;
    ours[s].blocksize = bs;
  }
  auto ctx = lora::CudaContext::thread_default();
#elif LORA_PEERS_OURS == 2
  std::vector<lora::detail::Nf4Parts> ours(qsets);
  for (int s = 0; s < qsets; ++s) {
    ours[s].packed = P[s];
    ours[s].absmax = M[s];
    ours[s].rows = out;
    ours[s].cols = in;
    ours[s].blocksize = bs;
  }
  auto ctx = lora::CudaContext::thread_default();
#endif
  // Host copies of set 0 for the references.
  const auto w0 = to_host_float(W[0], n);
  std::vector<std::uint8_t> p0(n / 2);
  std::vector<float> m0(n / bs);
  CK(cudaMemcpy(p0.data(), P[0], n / 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(m0.data(), M[0], n / bs * sizeof(float), cudaMemcpyDeviceToHost));
  auto w_bf16 = [&](long j, long k) { return static_cast<double>(w0[static_cast<std::size_t>(j * in + k)]); };
  auto w_nf4 = [&](long j, long k) {
    const std::size_t i = static_cast<std::size_t>(j * in + k);
    const int c = (i & 1) ? (p0[i >> 1] & 0x0F) : (p0[i >> 1] >> 4);
    return static_cast<double>(lora::quant::nf4_code[static_cast<std::size_t>(c)]) * m0[i / bs];
  };
  const auto rows_bf16 = sampled_rows(out, in, w_bf16), rows_nf4 = sampled_rows(out, in, w_nf4);

  for (long T : {1L, 2L, 4L, 8L, 16L}) {
    bf16 *X = nullptr, *Y = nullptr;
    CK(cudaMalloc(&X, T * in * sizeof(bf16)));
    CK(cudaMalloc(&Y, T * out * sizeof(bf16)));
    fill_normal<<<64, 256, 0, stream>>>(X, static_cast<std::size_t>(T * in), 77 + T, 1.0f);
    CK(cudaGetLastError());
    const auto xh = to_host_float(X, static_cast<std::size_t>(T * in));
    const float one = 1.f, zero = 0.f;
    std::vector<std::string> names;
    std::vector<std::function<void(int)>> fns;
    std::vector<bool> quantised;
    names.push_back("cublas_bf16");
    quantised.push_back(false);
    fns.push_back([&, T](int i) {  // row-major Y = X·Wᵀ as bench/cuda's detail::gemm calls it
      CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(T), static_cast<int>(in),
                      &one, W[i % sets], CUDA_R_16BF, static_cast<int>(in), X, CUDA_R_16BF, static_cast<int>(in),
                      &zero, Y, CUDA_R_16BF, static_cast<int>(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    });
    if (T == 1) {  // bitsandbytes' gemv_4bit: M = out rows of W, N = 1, K = in, lda = out, ldb = in/2, ldc = out
      names.push_back("bnb_gemv_naive");
      quantised.push_back(true);
      fns.push_back([&](int i) {
        kgemm_4bit_inference_naive<bf16, 128, 16><<<static_cast<unsigned>((out + 3) / 4), 128, 0, stream>>>(
            static_cast<int>(out), 1, static_cast<int>(in), X, P[i % qsets], M[i % qsets], code_dev, Y,
            static_cast<int>(out), static_cast<int>((in + 1) / 2), static_cast<int>(out), bs);
      });
    }
    names.push_back("bnb_gemm_4bit");
    quantised.push_back(true);
    fns.push_back([&, T](int i) {
      cgemm_4bit_bf16(X, P[i % qsets], M[i % qsets], nullptr, nullptr, nullptr, Y, nullptr, static_cast<int>(T),
                      static_cast<int>(out), static_cast<int>(in), bs, 2, stream);
    });
#if LORA_PEERS_OURS
    const lora::DeviceView<const lora::bfloat16> Xv{reinterpret_cast<const lora::bfloat16*>(X), T, in, in};
    const lora::DeviceView<lora::bfloat16> Yv{reinterpret_cast<lora::bfloat16*>(Y), T, out, out};
    names.push_back("ours_nf4_gemm");
    quantised.push_back(true);
#if LORA_PEERS_OURS == 1
    fns.push_back([&](int i) { lora::nf4_gemm<lora::bfloat16>(ours[i % qsets], Xv, Yv, *ctx); });
#else
    fns.push_back([&](int i) { lora::detail::nf4_gemm<lora::bfloat16>(ours[i % qsets], Xv, Yv, *ctx); });
#endif
#endif
    // Correctness first: poison, one call on set 0, compare.
    for (std::size_t f = 0; f < fns.size(); ++f) {
      CK(cudaMemsetAsync(Y, 0xFF, T * out * sizeof(bf16), stream));
      fns[f](0);
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      const double e = rel_error(Y, T, out, in, xh, quantised[f] ? rows_nf4 : rows_bf16);
      const std::string n = "check_" + names[f];
      emit(n.c_str(), in, out, T, 0, e);
      const bool bad = !(e >= 0 && e <= 2e-2);
      failed = failed || bad;
      std::fprintf(stderr, "bnb_gemv %ld->%ld T %2ld %-15s rel. error %.2e%s\n", in, out, T, names[f].c_str(), e,
                   bad ? "  FAILED" : "");
    }
    // All of them on one stream (lora's context stream), one rotating set.
    const auto t = lora::bench::time_all(*lora::CudaContext::thread_default(), fns, 10, 15, 3);
    const double bytes = n / 2.0 + n / 64.0 * 4 + T * (in + out) * 2.0;
    for (std::size_t f = 0; f < fns.size(); ++f)
      emit(names[f].c_str(), in, out, T, t[f], (quantised[f] ? bytes : n * 2.0 + T * (in + out) * 2.0) / t[f] / 1e6);
    std::fprintf(stderr, "bnb_gemv %ld->%ld T %2ld (W sets %d, NF4 sets %d):", in, out, T, sets, qsets);
    for (std::size_t f = 0; f < fns.size(); ++f)
      std::fprintf(stderr, " %s %.1f us (%.2fx cuBLAS)", names[f].c_str(), t[f] * 1e3, t[0] / t[f]);
    std::fprintf(stderr, "\n");
    CK(cudaFree(X));
    CK(cudaFree(Y));
  }
  for (auto p : W) CK(cudaFree(p));
  for (auto p : P) CK(cudaFree(p));
  for (auto p : M) CK(cudaFree(p));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) csv = std::fopen(argv[1], "w");
  if (!csv) return 1;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "bnb_gemv: %s, %d SMs, L2 %d MB; ours: %s\n", prop.name, prop.multiProcessorCount,
               prop.l2CacheSize >> 20, LORA_PEERS_OURS ? "yes" : "no (API not recognised)");
  std::fprintf(csv, "name,in,out,tokens,r,ms,extra\n");
  stream = lora::CudaContext::thread_default()->stream();  // the stream time_all records its events on
  cublasHandle_t h;
  CB(cublasCreate(&h));
  CB(cublasSetStream(h, stream));
  void* ws = nullptr;
  CK(cudaMalloc(&ws, 32 << 20));
  CB(cublasSetWorkspace(h, ws, 32 << 20));
  float* code_dev = nullptr;  // the NF4 code table their gemv_4bit takes (bnb's get_4bit_type("nf4"))
  CK(cudaMalloc(&code_dev, 16 * sizeof(float)));
  CK(cudaMemcpy(code_dev, lora::quant::nf4_code.data(), 16 * sizeof(float), cudaMemcpyHostToDevice));
  bench_shape(h, 14336, 4096, code_dev, prop.l2CacheSize);  // W 14336 × 4096 (4096 → 14336)
  bench_shape(h, 4096, 14336, code_dev, prop.l2CacheSize);  // W 4096 × 14336 (14336 → 4096)
  CK(cudaFree(code_dev));
  CK(cudaFree(ws));
  cublasDestroy(h);
  if (csv != stdout) std::fclose(csv);
  if (failed) std::fprintf(stderr, "bnb_gemv: FAILED (a relative error over 2e-2 or an unwritten output above)\n");
  return failed ? 1 : 0;
}
