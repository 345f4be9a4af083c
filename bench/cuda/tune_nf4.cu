// tune_nf4 [out.csv]: variants of the single-token NF4 GEMV (W 14336 × 4096, blocksize 64,
// bf16 x/y) against cuBLAS bf16 GEMV and the copy bandwidth, in one run, with each
// variant's relative error against a float32 cuBLAS product of the dequantised W.
// Four weight sets rotate so that every call reads W from device memory (33 MB of NF4
// would otherwise sit in the 50 MB L2). Also T = 16: the fused kernel against
// dequantise + cuBLAS. Each single-token variant is also timed as a CUDA graph of its launches
// (GPU time without the host launch cost). Used to pick the parameters of nf4_gemm
// (docs/performance.md).
#include <lora/cuda/nf4.cuh>
#include <lora/cuda/runtime.hpp>
#include <lora/core/random.hpp>

#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

// An experiment kept for the record (docs/performance.md, "NF4 at one token"): the same
// tensor-core arithmetic as nf4_mma_kernel, fed by a ring of bulk copies (copy engine +
// mbarrier) instead of per-lane loads. Measured slower than the library's kernels on the
// H100 (32-48 us against 24.4 us at one token), so nf4_gemm does not use it.
namespace lora::detail {

// ---- Bulk-copy-fed tensor-core GEMV (1…8 tokens) ----------------------------------------------

/// Weights of a row per pipeline stage of nf4_bulk_kernel.
constexpr int nf4_bulk_kc = 2048;

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
/// One bulk copy (copy engine) of `bytes` (multiple of 16, both ends 16-byte aligned) from
/// global to shared memory; completion is counted on `bar`.
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, std::uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

/// Shared-memory layout of one stage: 16 rows of codes (nf4_bulk_kc / 2 bytes each, rows
/// 32 bytes apart beyond that so that the eight rows of an mma fragment fall in different
/// banks), then the 16 rows' absmax (nf4_bulk_kc / bs floats each + 16 bytes of padding).
struct nf4_bulk_layout {
  int code_stride, amax_stride, stage_bytes;
  __host__ __device__ explicit nf4_bulk_layout(int bs)
      : code_stride(nf4_bulk_kc / 2 + 32),
        amax_stride(nf4_bulk_kc / bs * 4 + 16),
        stage_bytes(16 * (nf4_bulk_kc / 2 + 32) + 16 * (nf4_bulk_kc / bs * 4 + 16)) {}
};

template <int KS, int S>
constexpr int nf4_bulk_smem_bytes(int bs) {
  return nf4_mma_lut_bytes + S * (16 * (nf4_bulk_kc / 2 + 32) + 16 * (nf4_bulk_kc / bs * 4 + 16)) +
         (KS - 1) * 4 * 32 * 4 + S * 8;
}

/// NF4 GEMM for 1…8 tokens (bf16/half) with the weights streamed by the copy engine.
///
/// A persistent block owns the tiles of 16 rows blockIdx.x, blockIdx.x + gridDim.x, …; a tile
/// is walked in chunks of nf4_bulk_kc weights, and every (tile, chunk) is one stage of an
/// S-deep ring in shared memory: warp 0 issues 32 bulk copies (each row's codes and absmax)
/// that complete on the stage's mbarrier, S stages ahead of the consumers, so that about
/// S × 19 KB per block are in flight regardless of what the warps are doing. The KS warps
/// split each chunk's 64-weight groups and multiply them on the tensor cores exactly as
/// nf4_mma_kernel does (lane-private code table, one mma.m16n8k16 per 16 weights of 16
/// rows, absmax applied once per group, f32 accumulation); tokens past `tokens` are zero
/// columns. Needs K % (4·bs) == 0, 64 ≤ bs ≤ 512, rows of X 16-byte aligned.
template <class T, int KS, int S>
__global__ void __launch_bounds__(KS * 32) nf4_bulk_kernel(const T* __restrict__ X, long ldx, int tokens, int K,
                                                           const std::uint8_t* __restrict__ packed,
                                                           const float* __restrict__ absmax, int bs, int nOut,
                                                           T* __restrict__ Y, long ldy) {
  extern __shared__ __align__(128) unsigned char smem[];
  const nf4_bulk_layout L(bs);
  std::uint32_t* lut = reinterpret_cast<std::uint32_t*>(smem);
  unsigned char* stages = smem + nf4_mma_lut_bytes;
  float* red = reinterpret_cast<float*>(stages + S * L.stage_bytes);
  std::uint64_t* bars = reinterpret_cast<std::uint64_t*>(red + (KS - 1) * 4 * 32);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane / 4, q = lane % 4;

  const int tiles = (nOut + 15) / 16;
  const int chunks = (K + nf4_bulk_kc - 1) / nf4_bulk_kc;
  const int mine = (tiles - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  const int total = mine * chunks;
  const long rowK2 = K / 2, rowKb = K / bs;

  // Stage st: tile blockIdx.x + (st / chunks)·gridDim.x, chunk st % chunks, into slot st % S.
  auto issue = [&](int st) {
    const int slot = st % S;
    const int row0 = (static_cast<int>(blockIdx.x) + (st / chunks) * static_cast<int>(gridDim.x)) * 16;
    const int k0 = (st % chunks) * nf4_bulk_kc, kc = min(nf4_bulk_kc, K - k0);
    const int rows = min(16, nOut - row0);
    const unsigned cbytes = kc / 2, abytes = kc / bs * 4;
    if (lane == 0) mbar_expect_tx(&bars[slot], rows * (cbytes + abytes));
    __syncwarp();
    if (lane < rows) {
      const long row = row0 + lane;
      unsigned char* st0 = stages + slot * L.stage_bytes;
      bulk_g2s(st0 + lane * L.code_stride, packed + row * rowK2 + k0 / 2, cbytes, &bars[slot]);
      bulk_g2s(st0 + 16 * L.code_stride + lane * L.amax_stride, absmax + row * rowKb + k0 / bs, abytes,
               &bars[slot]);
    }
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&bars[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 0)
    for (int st = 0; st < S && st < total; ++st) issue(st);
  // The code table is built while the first stages are in flight.
  for (int i = threadIdx.x; i < 256 * 32; i += KS * 32) {
    const int b = i / 32;
    lut[i] = mma_traits<T>::pack(nf4_values[b >> 4], nf4_values[b & 15]);
  }
  __syncthreads();

  const std::uint32_t lane_off = static_cast<std::uint32_t>(lane) * 4u;
  const char* lut_base = reinterpret_cast<const char*>(lut);
  const bool xok = gid < tokens;
  const T* xrow = X + static_cast<long>(xok ? gid : 0) * ldx + 16 * q;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

  for (int st = 0; st < total; ++st) {
    const int slot = st % S, chunk = st % chunks;
    const int k0 = chunk * nf4_bulk_kc, kc = min(nf4_bulk_kc, K - k0);
    mbar_wait(&bars[slot], static_cast<unsigned>(st / S) & 1u);
    const unsigned char* codes = stages + slot * L.stage_bytes;
    const unsigned char* amax = codes + 16 * L.code_stride;
    const unsigned char* cA = codes + gid * L.code_stride + 8 * q;
    const unsigned char* cB = cA + 8 * L.code_stride;
    const float* aA = reinterpret_cast<const float*>(amax + gid * L.amax_stride);
    const float* aB = reinterpret_cast<const float*>(amax + (gid + 8) * L.amax_stride);
    const int groups = kc / 64;
    // The warp's groups of this chunk (nf4_bulk_kc / 64 / KS of them): all loads first, then
    // independent mma chains, so that the warp has every group's latency in flight at once.
    constexpr int GPW = nf4_bulk_kc / 64 / KS;
    uint2 wa[GPW], wb[GPW];
    float sa[GPW], sb[GPW];
    uint4 xv0[GPW], xv1[GPW];
#pragma unroll
    for (int u = 0; u < GPW; ++u) {
      const int g = min(warp + u * KS, groups - 1);
      wa[u] = *reinterpret_cast<const uint2*>(cA + 32 * g);
      wb[u] = *reinterpret_cast<const uint2*>(cB + 32 * g);
      sa[u] = warp + u * KS < groups ? aA[(64 * g) / bs] : 0.f;
      sb[u] = warp + u * KS < groups ? aB[(64 * g) / bs] : 0.f;
      xv0[u] = xv1[u] = make_uint4(0, 0, 0, 0);
      if (xok) {
        xv0[u] = __ldg(reinterpret_cast<const uint4*>(xrow + k0 + 64 * g));
        xv1[u] = __ldg(reinterpret_cast<const uint4*>(xrow + k0 + 64 * g + 8));
      }
    }
    float d[GPW][4];
#pragma unroll
    for (int u = 0; u < GPW; ++u)
#pragma unroll
      for (int i = 0; i < 4; ++i) d[u][i] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int u = 0; u < GPW; ++u) {
        auto lookup = [&](std::uint32_t word) {
          const std::uint32_t off = (((word >> (8 * j)) & 0xffu) << 7) | lane_off;
          return *reinterpret_cast<const std::uint32_t*>(lut_base + off);
        };
        const std::uint32_t a[4] = {lookup(wa[u].x), lookup(wb[u].x), lookup(wa[u].y), lookup(wb[u].y)};
        const std::uint32_t* x0 = reinterpret_cast<const std::uint32_t*>(&xv0[u]);
        const std::uint32_t* x1 = reinterpret_cast<const std::uint32_t*>(&xv1[u]);
        mma_traits<T>::mma(d[u], a, x0[j], x1[j]);
      }
#pragma unroll
    for (int u = 0; u < GPW; ++u) {
      acc[0] = fmaf(sa[u], d[u][0], acc[0]);
      acc[1] = fmaf(sa[u], d[u][1], acc[1]);
      acc[2] = fmaf(sb[u], d[u][2], acc[2]);
      acc[3] = fmaf(sb[u], d[u][3], acc[3]);
    }
    const bool last = chunk == chunks - 1;
    if (last && KS > 1 && warp > 0)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[((warp - 1) * 4 + i) * 32 + lane] = acc[i];
    __syncthreads();  // the slot is consumed (and the partial sums are in `red`)
    if (warp == 0 && st + S < total) issue(st + S);
    if (last) {
      if (warp == 0) {
        for (int w = 0; w < KS - 1; ++w)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i] += red[(w * 4 + i) * 32 + lane];
        const int row0 = (static_cast<int>(blockIdx.x) + (st / chunks) * static_cast<int>(gridDim.x)) * 16;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int t = 2 * q + (i & 1), row = row0 + gid + (i >= 2 ? 8 : 0);
          if (t < tokens && row < nOut) Y[static_cast<long>(t) * ldy + row] = from_float<T>(acc[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = 0.f;
      if (KS > 1) __syncthreads();  // `red` is rewritten at the next tile's last chunk
    }
  }
}

template <class T, int KS, int S>
void launch_nf4_bulk(const T* X, long ldx, int tokens, int K, const std::uint8_t* packed, const float* absmax,
                     int bs, int nOut, T* Y, long ldy, cudaStream_t stream) {
  auto kernel = nf4_bulk_kernel<T, KS, S>;
  const int smem = nf4_bulk_smem_bytes<KS, S>(bs);
  // Raise the kernel's shared-memory limit once (to the largest layout, bs = 64) and keep the
  // resident blocks × SMs of each device (up to 16 devices) for the persistent grid.
  static std::atomic<int> cap[16][4] = {};
  int dev = 0;
  LORA_CUDA_CHECK(cudaGetDevice(&dev));
  const int bi = bs == 64 ? 0 : bs == 128 ? 1 : bs == 256 ? 2 : 3;
  int c = cap[dev & 15][bi].load(std::memory_order_relaxed);
  if (c == 0) {
    LORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         nf4_bulk_smem_bytes<KS, S>(64)));
    int per_sm = 0, sms = 0;
    LORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, KS * 32, smem));
    LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    c = std::max(1, per_sm) * sms;
    cap[dev & 15][bi].store(c, std::memory_order_relaxed);
  }
  const unsigned blocks = std::min<unsigned>(ceil_div(nOut, 16), static_cast<unsigned>(c));
  kernel<<<blocks, KS * 32, smem, stream>>>(X, ldx, tokens, K, packed, absmax, bs, nOut, Y, ldy);
}

/// Whether nf4_bulk_kernel takes this product: bf16/half, 1…8 tokens, 64 ≤ blocksize ≤ 512,
/// K % (4·blocksize) == 0, rows of X 16-byte aligned.
template <class T>
bool nf4_bulk_ok(int tokens, int K, int bs, long ldx, const void* x) {
  return (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && tokens >= 1 && tokens <= 8 && bs >= 64 &&
         bs <= 512 && K % (4 * bs) == 0 && ldx % 8 == 0 && aligned(x, 16);
}

}  // namespace lora::detail

using namespace lora;
using S = bfloat16;
using T = __nv_bfloat16;
using bench::fill_random;
using bench::time_graph_ms;

namespace {

// 20 calls a batch, 21 batches, 5 warm-up calls.
double time_ms(CudaContext& ctx, const std::function<void(int)>& fn, int batch = 20, int batches = 21) {
  return bench::time_ms(ctx, fn, batch, batches, 5);
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
  const double cub_g = time_graph_ms(*ctx, [&](int i) {
    detail::gemm<S, S, S>(*ctx, false, true, 1, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
  });
  std::fprintf(stderr, "copy %.0f GB/s; cuBLAS bf16 GEMV %.2f us (%.2f us in a graph)\n", copy_gbps, cub * 1e3,
               cub_g * 1e3);
  std::fprintf(csv, "cublas_bf16_gemv_graph,%.5f,%.1f,0\n", cub_g, out * in * 2.0 / cub_g / 1e6);

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
    const double gms = time_graph_ms(*ctx, launch);
    std::fprintf(stderr, "%-28s %8.2f us in a graph (%3.0f%% of copy)\n", "", gms * 1e3,
                 100 * nf4_bytes / gms / 1e6 / copy_gbps);
    return ms;
  };
#define MMA(NT, KS, P)                                                                                         \
  variant("mma NT" #NT " KS" #KS " P" #P, [&](int i) {                                                        \
    detail::launch_nf4_mma<T, NT, KS, P>(reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in),        \
                                         q[i % sets].packed.data(), q[i % sets].absmax.data(), 64, int(out),    \
                                         reinterpret_cast<T*>(Y.data()), Y.view().ld, ctx->stream());           \
  })
#define BULK(KS, S)                                                                                            \
  variant("bulk KS" #KS " S" #S, [&](int i) {                                                                 \
    detail::launch_nf4_bulk<T, KS, S>(reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in),           \
                                      q[i % sets].packed.data(), q[i % sets].absmax.data(), 64, int(out),       \
                                      reinterpret_cast<T*>(Y.data()), Y.view().ld, ctx->stream());              \
  })
  BULK(8, 2);
  BULK(8, 4);
  BULK(8, 6);
  BULK(16, 4);
  BULK(4, 2);
  variant("old fused (ROWS 4)", run_old);
  MMA(1, 8, 2);
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
    // 8 tokens: the bulk-copy kernel against the tensor-core kernel (n-tile of 8)
    {
      DeviceMatrix<S> X8(8, in), Y8(8, out);
      fill_random(X8.view(), g, 1.0);
      auto t8 = [&](auto launch) {
        return time_ms(*ctx, [&](int i) {
          launch(reinterpret_cast<const T*>(X8.data()), X8.view().ld, 8, int(in), q[i % sets].packed.data(),
                 q[i % sets].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y8.data()), Y8.view().ld,
                 ctx->stream());
        });
      };
      const double m8 = t8(detail::launch_nf4_mma<T, 1, 8, 2>), b84 = t8(detail::launch_nf4_bulk<T, 8, 4>),
                   b164 = t8(detail::launch_nf4_bulk<T, 16, 4>), b86 = t8(detail::launch_nf4_bulk<T, 8, 6>);
      std::fprintf(stderr, "T8: mma KS8 P2 %.2f us, bulk KS8 S4 %.2f us, bulk KS16 S4 %.2f us, bulk KS8 S6 %.2f us\n",
                   m8 * 1e3, b84 * 1e3, b164 * 1e3, b86 * 1e3);
      std::fprintf(csv, "t8_mma,%.5f,0,0\nt8_bulk_ks8_s4,%.5f,0,0\nt8_bulk_ks16_s4,%.5f,0,0\nt8_bulk_ks8_s6,%.5f,0,0\n", m8,
                   b84, b164, b86);
    }
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
