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

__device__ __forceinline__ void mbar_init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
/// One bulk copy (copy engine) of `bytes` (multiple of 16, both ends 16-byte aligned) from
/// global to shared memory; completion is counted on `bar`.
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, std::uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_u32(dst)),
               "l"(src), "r"(bytes), "r"(shared_u32(bar))
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
  // The shared-memory limit raised to the largest layout (bs = 64); a capacity per blocksize.
  static std::atomic<int> cap[4][16] = {};
  const int bi = bs == 64 ? 0 : bs == 128 ? 1 : bs == 256 ? 2 : 3;
  const int c = persistent_capacity(kernel, KS * 32, smem, nf4_bulk_smem_bytes<KS, S>(64), cap[bi]);
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


// ---- The tensor-core kernel that nf4_gemm used before nf4_stream_kernel ------------------------

/// (Kept for comparison; nf4_gemm used it for 2…16 tokens until nf4_stream_kernel.)
///
/// A block of KS warps owns 16 rows of W; warp w takes the 64-weight groups w, w + KS, …
/// of those rows (split K), and the KS partial sums meet in shared memory. Per group a
/// lane loads 8 packed bytes of two rows (row l/4 and l/4 + 8, bytes 8·(l%4) … +8, i.e.
/// 16 consecutive weights each), turns each byte into a pair of codes in the activation
/// type through a lane-private 256-entry table (one conflict-free 4-byte shared load per
/// two weights), and feeds four mma.m16n8k16 (f32 accumulation) with B = the matching 16
/// activations of token l/4 (+ 8 for the second n-tile), which need no conversion. The
/// K order inside a group is permuted identically for A and B, so the sum is unchanged.
/// A group lies in one quantisation block (blocksize ≥ 64, K % 64 == 0), so its product
/// is scaled by that block's absmax (float) once. Codes are rounded to the activation
/// type (2^-9 relative for bf16, as bitsandbytes' own 4-bit inference kernel rounds the
/// dequantised weight), products and sums are float.
/// Groups are loaded P at a time, the next P while the current ones are multiplied.
template <class T, int NT, int KS, int P>
__global__ void __launch_bounds__(KS * 32) nf4_mma_kernel(const T* __restrict__ X, long ldx, int tokens, int K,
                                                          const std::uint8_t* __restrict__ packed,
                                                          const float* __restrict__ absmax, int bs, int nOut,
                                                          T* __restrict__ Y, long ldy) {
  __shared__ std::uint32_t lut[256 * 32];
  __shared__ float red[KS > 1 ? KS - 1 : 1][NT][4][32];
  __shared__ float code16[16];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x < 16) code16[threadIdx.x] = nf4_values[threadIdx.x];
  __syncthreads();
  for (int i = threadIdx.x; i < 256 * 32; i += KS * 32) {
    const int b = i / 32;
    lut[i] = mma_traits<T>::pack(code16[b >> 4], code16[b & 15]);
  }
  __syncthreads();
  const int gid = lane / 4, q = lane % 4;
  const int tiles = (nOut + 15) / 16;
  // Persistent blocks: the table is built once per block, then tiles of 16 rows follow.
  for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
  const int row0 = tile * 16;
  const int rA = min(row0 + gid, nOut - 1), rB = min(row0 + gid + 8, nOut - 1);
  const std::uint8_t* pA = packed + static_cast<long>(rA) * (K / 2) + 8 * q;
  const std::uint8_t* pB = packed + static_cast<long>(rB) * (K / 2) + 8 * q;
  const long eA = static_cast<long>(rA) * K, eB = static_cast<long>(rB) * K;
  const int groups = K / 64;
  const std::uint32_t lane_off = static_cast<std::uint32_t>(lane) * 4u;
  const char* lut_base = reinterpret_cast<const char*>(lut);

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

  // This lane's token rows of X (token gid, gid + 8); tokens past `tokens` read as zeros.
  const T* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int t = gid + 8 * n;
    xok[n] = t < tokens;
    xrow[n] = X + static_cast<long>(xok[n] ? t : 0) * ldx + 16 * q;
  }

  uint2 wa0[P], wb0[P], wa1[P], wb1[P];
  float aa0[P], ab0[P], aa1[P], ab1[P];
  auto load = [&](int g0, uint2 (&wa)[P], uint2 (&wb)[P], float (&aa)[P], float (&ab)[P]) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int g = g0 + p * KS;
      if (g < groups) {
        wa[p] = __ldg(reinterpret_cast<const uint2*>(pA + 32 * g));
        wb[p] = __ldg(reinterpret_cast<const uint2*>(pB + 32 * g));
        aa[p] = __ldg(absmax + (eA + 64 * g) / bs);
        ab[p] = __ldg(absmax + (eB + 64 * g) / bs);
      }
    }
  };
  auto compute = [&](int g0, const uint2 (&wa)[P], const uint2 (&wb)[P], const float (&aa)[P],
                     const float (&ab)[P]) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int g = g0 + p * KS;
      if (g >= groups) break;
      uint4 xv[NT][2];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (xok[n]) {
          xv[n][0] = __ldg(reinterpret_cast<const uint4*>(xrow[n] + 64 * g));
          xv[n][1] = __ldg(reinterpret_cast<const uint4*>(xrow[n] + 64 * g + 8));
        } else {
          xv[n][0] = xv[n][1] = make_uint4(0, 0, 0, 0);
        }
      }
      float d[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) d[n][i] = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // bytes j and j + 4 of each row's 8: weights 2j, 2j+1 and 8+2j, 9+2j of the lane's 16
        auto lookup = [&](std::uint32_t word, int byte) {
          const std::uint32_t off = (((word >> (8 * byte)) & 0xffu) << 7) | lane_off;
          return *reinterpret_cast<const std::uint32_t*>(lut_base + off);
        };
        std::uint32_t a[4];
        a[0] = lookup(wa[p].x, j);  // row gid,     k 2q, 2q+1       (logical)
        a[1] = lookup(wb[p].x, j);  // row gid + 8
        a[2] = lookup(wa[p].y, j);  // row gid,     k 8 + 2q, 9 + 2q
        a[3] = lookup(wb[p].y, j);  // row gid + 8
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const std::uint32_t* xw = reinterpret_cast<const std::uint32_t*>(&xv[n][0]);
          mma_traits<T>::mma(d[n], a, xw[j], xw[4 + j]);
        }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][0] = fmaf(aa[p], d[n][0], acc[n][0]);
        acc[n][1] = fmaf(aa[p], d[n][1], acc[n][1]);
        acc[n][2] = fmaf(ab[p], d[n][2], acc[n][2]);
        acc[n][3] = fmaf(ab[p], d[n][3], acc[n][3]);
      }
    }
  };
  const int step = P * KS;
  int g0 = warp;
  if (g0 < groups) load(g0, wa0, wb0, aa0, ab0);
  while (g0 < groups) {
    if (g0 + step < groups) load(g0 + step, wa1, wb1, aa1, ab1);
    compute(g0, wa0, wb0, aa0, ab0);
    g0 += step;
    if (g0 >= groups) break;
    if (g0 + step < groups) load(g0 + step, wa0, wb0, aa0, ab0);
    compute(g0, wa1, wb1, aa1, ab1);
    g0 += step;
  }
  // Split-K partial sums meet in warp 0.
  if (KS > 1) {
    if (warp > 0)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp - 1][n][i][lane] = acc[n][i];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int w = 0; w < KS - 1; ++w)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[n][i] += red[w][n][i][lane];
    }
    __syncthreads();  // red is reused by the next tile
  }
  // c0, c1: row gid, tokens 2q, 2q + 1; c2, c3: row gid + 8 (+ 8 tokens per n-tile)
  if (warp == 0)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = 8 * n + 2 * q + (i & 1), row = row0 + gid + (i >= 2 ? 8 : 0);
        if (t < tokens && row < nOut) Y[static_cast<long>(t) * ldy + row] = from_float<T>(acc[n][i]);
      }
  }  // tile
}

template <class T, int NT, int KS, int P>
void launch_nf4_mma(const T* X, long ldx, int tokens, int K, const std::uint8_t* packed, const float* absmax, int bs,
                    int nOut, T* Y, long ldy, cudaStream_t stream) {
  auto kernel = nf4_mma_kernel<T, NT, KS, P>;
  static std::atomic<int> cap[16] = {};
  const unsigned blocks =
      std::min<unsigned>(ceil_div(nOut, 16), static_cast<unsigned>(persistent_capacity(kernel, KS * 32, 0, 0, cap)));
  kernel<<<blocks, KS * 32, 0, stream>>>(X, ldx, tokens, K, packed, absmax, bs, nOut, Y, ldy);
}


// ---- Memory skeletons: the streaming kernel's loads without its arithmetic -----------------------

/// Reads the NF4 codes and absmax of W exactly as a persistent streaming kernel with KS warps
/// and 4 groups (256 weights) per warp step would, S-1 steps ahead, and only XORs them
/// together: the bandwidth ceiling of a load pattern. MAP 0: the mma fragment's pattern (lane
/// (gid, q) reads 8 bytes of rows gid and gid + 8 per group: eight 32-byte pieces of eight rows
/// per instruction); MAP 1: contiguous (lane l reads 16 bytes of row l/8 + 4i: four 128-byte
/// pieces of four rows per instruction).
template <int KS, int MAP, int S>
__global__ void __launch_bounds__(KS * 32) nf4_read_probe(const std::uint8_t* __restrict__ packed,
                                                          const float* __restrict__ absmax, int K, int nOut,
                                                          unsigned* __restrict__ out) {
  constexpr int G = 4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane / 4, q = lane % 4;
  const int groups = K / 64, span = KS * G;
  const int nks = (groups + span - 1) / span;
  const int tiles = (nOut + 15) / 16;
  const int bid = static_cast<int>(blockIdx.x), nb = static_cast<int>(gridDim.x);
  const int steps = (tiles > bid ? (tiles - 1 - bid) / nb + 1 : 0) * nks;
  uint4 w[S][2];
  float am[S][G];
  unsigned x = 0;
  auto load = [&](int b, int st) {
    if (st >= steps) return;
    const int tile = bid + (st / nks) * nb, gw = (st % nks) * span + warp * G;
    if (gw >= groups) return;
    const int row0 = tile * 16;
    if constexpr (MAP == 0) {
      const int rA = min(row0 + gid, nOut - 1), rB = min(row0 + gid + 8, nOut - 1);
      const std::uint8_t* pA = packed + static_cast<long>(rA) * (K / 2) + 8 * q + 32 * gw;
      const std::uint8_t* pB = packed + static_cast<long>(rB) * (K / 2) + 8 * q + 32 * gw;
      const uint2 a0 = __ldg(reinterpret_cast<const uint2*>(pA)), a1 = __ldg(reinterpret_cast<const uint2*>(pA + 32));
      const uint2 a2 = __ldg(reinterpret_cast<const uint2*>(pA + 64)), a3 = __ldg(reinterpret_cast<const uint2*>(pA + 96));
      const uint2 b0 = __ldg(reinterpret_cast<const uint2*>(pB)), b1 = __ldg(reinterpret_cast<const uint2*>(pB + 32));
      const uint2 b2 = __ldg(reinterpret_cast<const uint2*>(pB + 64)), b3 = __ldg(reinterpret_cast<const uint2*>(pB + 96));
      w[b][0] = make_uint4(a0.x, a0.y, a1.x, a1.y);
      w[b][1] = make_uint4(a2.x ^ b0.x, a2.y ^ b0.y, a3.x ^ b1.x, a3.y ^ b1.y ^ b2.x ^ b2.y ^ b3.x ^ b3.y);
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r0 = min(row0 + lane / 8 + 8 * i, nOut - 1), r1 = min(row0 + lane / 8 + 8 * i + 4, nOut - 1);
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(packed + static_cast<long>(r0) * (K / 2) + 32 * gw + 16 * (lane % 8)));
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(packed + static_cast<long>(r1) * (K / 2) + 32 * gw + 16 * (lane % 8)));
        w[b][i] = make_uint4(u.x ^ v.x, u.y ^ v.y, u.z ^ v.z, u.w ^ v.w);
      }
    }
    if (lane < 16) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(absmax + static_cast<long>(min(row0 + lane, nOut - 1)) * groups + gw));
      am[b][0] = v.x; am[b][1] = v.y; am[b][2] = v.z; am[b][3] = v.w;
    }
  };
  auto use = [&](int b) {
    x ^= w[b][0].x ^ w[b][0].y ^ w[b][0].z ^ w[b][0].w ^ w[b][1].x ^ w[b][1].y ^ w[b][1].z ^ w[b][1].w;
    x ^= __float_as_uint(am[b][0]) ^ __float_as_uint(am[b][1]) ^ __float_as_uint(am[b][2]) ^ __float_as_uint(am[b][3]);
  };
#pragma unroll
  for (int i = 0; i < S - 1; ++i) load(i, i);
  for (int st = 0; st < steps; st += S) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
      load((i + S - 1) % S, st + i + S - 1);
      if (st + i < steps) use(i);
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = x;
}

template <int KS, int MAP, int S>
void launch_nf4_read_probe(const std::uint8_t* packed, const float* absmax, int K, int nOut, unsigned* out,
                           cudaStream_t stream) {
  auto kernel = nf4_read_probe<KS, MAP, S>;
  static std::atomic<int> cap[16] = {};
  const unsigned blocks =
      std::min<unsigned>(ceil_div(nOut, 16), static_cast<unsigned>(persistent_capacity(kernel, KS * 32, 0, 0, cap)));
  kernel<<<blocks, KS * 32, 0, stream>>>(packed, absmax, K, nOut, out);
}

// ---- Byte-pair table GEMV on the CUDA cores (one bf16 token, K = 4096, blocksize 64) -------------
//
// Measured on the H100 (2026-11-24, three runs of tune_nf4; cuBLAS bf16 GEMV 43.05-43.91 us,
// 41.16-41.57 us in a graph; copy 3000 GB/s):
//   nf4_pair_kernel RW2 R8 (first form)          15.76-15.96 us (69-70% of copy), 14.79-14.84 in a graph
//   nf4_pair2_kernel RW4 R4 (no PC, A0 X0)       14.64-14.68 us (75%), 13.66-13.67 in a graph (81%)
//   nf4_pair2_kernel RW4 R4 (no PC, A1 X1)       14.68 / 14.70 us (75%), 13.72 / 13.80 in a graph
//   the library's nf4_gemv_kernel                24.63-24.90 us, 23.48-23.63 in a graph
// i.e. 2.95-3.00x cuBLAS per launch (3.02-3.04x in a graph), as fast as the read-only probes of
// the same bytes (14.36-14.63 us), and no faster with W resident in L2 (14.53 us): the time
// follows the SM clock (Nsight Compute at 1.56 GHz: 18.1 us). A1 X1 cut the executed
// instructions from 6.84 M to 5.65 M (371 per batch of 4 rows and warp: 256 are PRMT + LDS.64 +
// FFMA) without changing the time: what is left is the shared-memory pipe (LDS.64 = two
// wavefronts per two weights; MIO throttle 1.9 and short scoreboard 1.6 cycles per instruction)
// and the 18% of elapsed cycles in which an SM has no block (table build, first loads, tail).

/// Dynamic shared memory of nf4_pair_kernel: the 64 KB table (twice that with ALIGN, so that a
/// 64 KB-aligned copy fits), then the partial sums [RW][2 slots][4 K-warps][32].
template <int RW, bool ALIGN>
constexpr int nf4_pair_smem_bytes() {
  return (ALIGN ? 2 : 1) * 65536 + RW * 2 * 4 * 32 * 4;
}

/// y[n] = Σ_k x[k]·code(W[n, k])·absmax(n, k/64) for one bf16 token, K = 4096, blocksize 64.
///
/// A block has 4 K-warps × RW row-warps. K-warp kw's lane l owns the 32 weights
/// k0 = 1024·kw + 32·l … k0 + 31 of every row (16 packed bytes = one uint4, one quantisation
/// block) and keeps those 32 activations as floats in registers for the whole kernel. A
/// row-warp group (the 4 K-warps with the same rw) takes batches of R rows; each block gets a
/// contiguous range of batches, dealt round-robin to its RW groups. Per byte of codes (two
/// weights): one PRMT forms the shared address of the lane's private float2 entry
/// (nf4[b >> 4], nf4[b & 15]) — table laid out [256 bytes][32 lanes] of float2, entry (b, l)
/// at b·256 + 8·l, conflict-free per half-warp; with ALIGN the table sits at a 64 KB-aligned
/// shared address, so the PRMT takes bytes 0, 2, 3 from the lane's base and byte 1 from the
/// code word and the load is LDS.64 [R]; without, the PRMT gives b·256 + 8·l and an IADD adds
/// the table's base (dynamic shared memory starts at 0x400 on sm_90). Then 2 FFMA. The lane's 32-term sum is scaled by its
/// absmax once. The R rows' sums of a warp are reduced by a transposing butterfly (xor 16,
/// 8, … : R/2 + R/4 + … shuffles, leaving lane l with row l >> (5 − log2 R)), the 4 K-warps
/// meet in shared memory behind a named barrier of the group (two slots), and K-warp 0
/// finishes the sum (xor shuffles over the remaining lanes) and writes y in bf16.
/// The next D batches' codes and absmax are in flight in registers while a batch computes (row r
/// of batch j + D is loaded as soon as row r of batch j has been multiplied).
/// Products and sums are float (codes exact). Needs K == 4096, blocksize 64, X 16-byte aligned.
template <int RW, int R, int D, bool ALIGN, int MINB>
__global__ void __launch_bounds__(RW * 128, MINB)
    nf4_pair_kernel(const __nv_bfloat16* __restrict__ X, int K, const std::uint8_t* __restrict__ packed,
                    const float* __restrict__ absmax, int nOut, __nv_bfloat16* __restrict__ Y) {
  constexpr int KW = 4, L = R == 2 ? 4 : R == 4 ? 3 : R == 8 ? 2 : 1;
  static_assert(R == 2 || R == 4 || R == 8 || R == 16, "R must be 2, 4, 8 or 16");
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int kw = warp % KW, rw = warp / KW;
  constexpr int red_bytes = RW * 2 * KW * 32 * 4;
  const std::uint32_t sbase = shared_u32(smem);
  std::uint32_t tab;  // shared address of the table
  unsigned char* redp;
  if constexpr (ALIGN) {
    tab = (sbase + 0xffffu) & ~0xffffu;
    const std::uint32_t gap = tab - sbase;
    redp = smem + (gap >= static_cast<std::uint32_t>(red_bytes) ? 0u : gap + 65536u);
  } else {
    tab = sbase;
    redp = smem + 65536;
  }
  float2* tabp = reinterpret_cast<float2*>(smem + (tab - sbase));
  float* red = reinterpret_cast<float*>(redp) + rw * 2 * KW * 32;

  // This block's batches [b0, b1); this group's are b0 + rw, b0 + rw + RW, …
  const int nbat = (nOut + R - 1) / R;
  const int b0 = static_cast<int>(static_cast<long>(blockIdx.x) * nbat / gridDim.x);
  const int b1 = static_cast<int>(static_cast<long>(blockIdx.x + 1) * nbat / gridDim.x);
  const int nmine = b1 - b0 > rw ? (b1 - b0 - rw + RW - 1) / RW : 0;
  const int k0 = kw * 1024 + lane * 32;
  const std::uint8_t* pk = packed + k0 / 2;
  const float* am = absmax + k0 / 64;
  const long rowb = K / 2, rowa = K / 64;

  uint4 c[D][R];
  float a[D][R];
  auto load_row = [&](uint4& cr, float& ar, int j, int r) {
    const int row = min((b0 + rw + j * RW) * R + r, nOut - 1);
    const std::uint8_t* p = pk + row * rowb;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(cr.x), "=r"(cr.y), "=r"(cr.z), "=r"(cr.w)
                 : "l"(p));
    ar = __ldg(am + row * rowa);
  };
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (d < nmine)
#pragma unroll
      for (int r = 0; r < R; ++r) load_row(c[d][r], a[d][r], d, r);

  // The activations, as floats, while the first codes are in flight.
  float x[32];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(X + k0) + q);
    const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      x[8 * q + 2 * j] = __uint_as_float(w[j] << 16);
      x[8 * q + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  }
  for (int i = static_cast<int>(threadIdx.x); i < 256 * 32; i += RW * 128) {
    const int e = i / 32;
    tabp[i] = make_float2(nf4_values[e >> 4], nf4_values[e & 15]);
  }
  __syncthreads();

  const std::uint32_t base = ALIGN ? (tab | static_cast<std::uint32_t>(lane) * 8u) : static_cast<std::uint32_t>(lane) * 8u;
  auto lookup = [&](std::uint32_t word, int byte) {
    const std::uint32_t off = __byte_perm(word, base, 0x7604u | (static_cast<std::uint32_t>(byte) << 4));
    float2 v;
    if constexpr (ALIGN) {
      asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(off));
    } else {
      v = *reinterpret_cast<const float2*>(smem + off);
    }
    return v;
  };

  int slot = 0;
  for (int j = 0; j < nmine; j += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int jj = j + d;
      if (jj < nmine) {  // the same for the group's 4 K-warps
        // Row by row, so that a row's codes are dead after its 16 lookups and the load of the
        // same row of batch jj + D can go out at once (a batch of lead time for D = 1).
        float p[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float s0 = 0.f, s1 = 0.f;  // two chains of 16 FFMA
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const std::uint32_t w = q == 0 ? c[d][r].x : q == 1 ? c[d][r].y : q == 2 ? c[d][r].z : c[d][r].w;
              const float2 t = lookup(w, i);
              s0 = fmaf(t.x, x[8 * q + 2 * i], s0);
              s1 = fmaf(t.y, x[8 * q + 2 * i + 1], s1);
            }
          p[r] = (s0 + s1) * a[d][r];
          if (jj + D < nmine) load_row(c[d][r], a[d][r], jj + D, r);
        }
        // Transposing butterfly: after it lane l holds (part of) row l >> L.
#pragma unroll
        for (int s = 0; (R >> s) > 1; ++s) {
          const int n = R >> s, m = 16 >> s;
          const bool hi = (lane & m) != 0;
#pragma unroll
          for (int i = 0; i < n / 2; ++i) {
            const float send = hi ? p[i] : p[i + n / 2];
            const float keep = hi ? p[i + n / 2] : p[i];
            p[i] = keep + __shfl_xor_sync(0xffffffffu, send, m);
          }
        }
        float* rs = red + slot * KW * 32;
        rs[kw * 32 + lane] = p[0];
        asm volatile("bar.sync %0, %1;" ::"r"(1 + rw), "n"(KW * 32) : "memory");
        if (kw == 0) {
          float v = p[0];
#pragma unroll
          for (int w = 1; w < KW; ++w) v += rs[w * 32 + lane];
#pragma unroll
          for (int m = 1; m < (1 << L); m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
          const int row = (b0 + rw + jj * RW) * R + (lane >> L);
          if ((lane & ((1 << L) - 1)) == 0 && row < nOut) Y[row] = __float2bfloat16_rn(v);
        }
        slot ^= 1;
      }
    }
  }
}

template <int RW, int R, int D, bool ALIGN, int MINB>
void launch_nf4_pair(const __nv_bfloat16* X, int K, const std::uint8_t* packed, const float* absmax, int bs, int nOut,
                     __nv_bfloat16* Y, cudaStream_t stream) {
  if (K != 4096 || bs != 64) fail("nf4_pair_kernel: needs K 4096 and blocksize 64, got {} and {}", K, bs);
  auto kernel = nf4_pair_kernel<RW, R, D, ALIGN, MINB>;
  constexpr int smem = nf4_pair_smem_bytes<RW, ALIGN>();
  static std::atomic<int> cap[16] = {};
  const int c = persistent_capacity(kernel, RW * 128, smem, smem, cap);
  const unsigned blocks = std::min<unsigned>(ceil_div(ceil_div(nOut, R), RW), static_cast<unsigned>(c));
  static std::atomic<bool> told{false};
  if (!told.exchange(true)) {
    cudaFuncAttributes fa{};
    LORA_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    std::fprintf(stderr, "  [pair RW%d R%d D%d A%d B%d: %u blocks of %d threads, %d registers, %d B local, %d B smem]\n",
                 RW, R, D, int(ALIGN), MINB, blocks, RW * 128, fa.numRegs, int(fa.localSizeBytes), smem);
  }
  kernel<<<blocks, RW * 128, smem, stream>>>(X, K, packed, absmax, nOut, Y);
}

/// nf4_pair_kernel with less bookkeeping per row (the second round of this experiment): K is
/// the constant 4096, so a row's codes are LDG [ptr + r·2048] and its absmax LDG [ptr + r·256]
/// off two pointers that advance once per batch; nOut % R == 0 (no clamping); the last batch is
/// peeled, so the loads of the next batch need no branch. With PC (producer/consumer) the 3
/// K-warps 1…3 do not wait for K-warp 0 to finish a batch: per slot (2) a FULL and an EMPTY
/// named barrier (bar.arrive by whoever does not wait), so they run up to two batches ahead;
/// without PC one bar.sync of the group per batch, as before. Needs RW ≤ 4 with PC (4 barrier
/// ids per group; id 0 is reused after the block's one __syncthreads).
/// ALIGN: the table at a 64 KB-aligned shared address (dynamic shared memory starts at 0x400 on
/// sm_90, so without it every lookup pays an IADD of the base: 64 per batch of 4 rows; with it
/// the PRMT alone forms the address, at the price of 2 × 64 KB of shared memory per block).
/// XPIN: the activations converted by volatile asm, so that the compiler keeps the 32 floats
/// instead of re-converting them from bf16 inside the loop (32 instructions per batch).
template <int RW, int R, bool PC, int MINB, bool ALIGN = false, bool XPIN = false>
__global__ void __launch_bounds__(RW * 128, MINB)
    nf4_pair2_kernel(const __nv_bfloat16* __restrict__ X, const std::uint8_t* __restrict__ packed,
                     const float* __restrict__ absmax, int nOut, __nv_bfloat16* __restrict__ Y) {
  constexpr int KW = 4, L = R == 2 ? 4 : R == 4 ? 3 : R == 8 ? 2 : 1;
  static_assert(R == 2 || R == 4 || R == 8 || R == 16, "R must be 2, 4, 8 or 16");
  static_assert(!PC || RW <= 4, "PC needs 4 barrier ids per row group");
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int kw = warp % KW, rw = warp / KW;
  constexpr std::uint32_t red_bytes = RW * 2 * KW * 32 * 4;
  const std::uint32_t sbase = shared_u32(smem);
  const std::uint32_t tab = ALIGN ? (sbase + 0xffffu) & ~0xffffu : sbase;  // shared address of the table
  const std::uint32_t gap = tab - sbase;
  float2* tabp = reinterpret_cast<float2*>(smem + gap);
  float* red = reinterpret_cast<float*>(smem + (ALIGN && gap >= red_bytes ? 0u : gap + 65536u)) + rw * 2 * KW * 32;

  const int nbat = nOut / R;
  const int b0 = static_cast<int>(static_cast<long>(blockIdx.x) * nbat / gridDim.x);
  const int b1 = static_cast<int>(static_cast<long>(blockIdx.x + 1) * nbat / gridDim.x);
  const int nmine = b1 - b0 > rw ? (b1 - b0 - rw + RW - 1) / RW : 0;
  const int k0 = kw * 1024 + lane * 32;
  const long row0 = static_cast<long>(b0 + rw) * R;
  const std::uint8_t* pc = packed + row0 * 2048 + k0 / 2;
  const float* pa = absmax + row0 * 64 + k0 / 64;
  constexpr long cstep = static_cast<long>(RW) * R * 2048, astep = static_cast<long>(RW) * R * 64;

  uint4 c[R];
  float a[R];
  auto load_batch_row = [&](int r) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(c[r].x), "=r"(c[r].y), "=r"(c[r].z), "=r"(c[r].w)
                 : "l"(pc + r * 2048));
    a[r] = __ldg(pa + r * 64);
  };
  if (nmine > 0)
#pragma unroll
    for (int r = 0; r < R; ++r) load_batch_row(r);

  float x[32];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(X + k0) + q);
    const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (XPIN) {
        asm volatile("mov.b32 %0, %1;" : "=f"(x[8 * q + 2 * j]) : "r"(w[j] << 16));
        asm volatile("mov.b32 %0, %1;" : "=f"(x[8 * q + 2 * j + 1]) : "r"(w[j] & 0xffff0000u));
      } else {
        x[8 * q + 2 * j] = __uint_as_float(w[j] << 16);
        x[8 * q + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      }
    }
  }
  for (int i = static_cast<int>(threadIdx.x); i < 256 * 32; i += RW * 128) {
    const int e = i / 32;
    tabp[i] = make_float2(nf4_values[e >> 4], nf4_values[e & 15]);
  }
  __syncthreads();

  const std::uint32_t base = (ALIGN ? tab : 0u) | static_cast<std::uint32_t>(lane) * 8u;
  __nv_bfloat16* yp = Y + row0 + (lane >> L);  // K-warp 0's output of the batch
  auto step = [&](int jj, auto more) {
    float p[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const std::uint32_t w = q == 0 ? c[r].x : q == 1 ? c[r].y : q == 2 ? c[r].z : c[r].w;
          const std::uint32_t off = __byte_perm(w, base, 0x7604u | (static_cast<std::uint32_t>(i) << 4));
          float2 t;
          if constexpr (ALIGN)
            asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(t.x), "=f"(t.y) : "r"(off));
          else
            t = *reinterpret_cast<const float2*>(smem + off);
          s0 = fmaf(t.x, x[8 * q + 2 * i], s0);
          s1 = fmaf(t.y, x[8 * q + 2 * i + 1], s1);
        }
      p[r] = (s0 + s1) * a[r];
      if constexpr (decltype(more)::value) {
        if (r == 0) {
          pc += cstep;
          pa += astep;
        }
        load_batch_row(r);
      }
    }
#pragma unroll
    for (int s = 0; (R >> s) > 1; ++s) {
      const int n = R >> s, m = 16 >> s;
      const bool hi = (lane & m) != 0;
#pragma unroll
      for (int i = 0; i < n / 2; ++i) {
        const float send = hi ? p[i] : p[i + n / 2];
        const float keep = hi ? p[i + n / 2] : p[i];
        p[i] = keep + __shfl_xor_sync(0xffffffffu, send, m);
      }
    }
    const int slot = jj & 1;
    float* rs = red + slot * KW * 32;
    const int full = PC ? 4 * rw + slot : 1 + rw, empty = 4 * rw + 2 + slot;
    if (kw != 0) {
      if constexpr (PC) {
        if (jj >= 2) asm volatile("bar.sync %0, %1;" ::"r"(empty), "n"(KW * 32) : "memory");
        rs[kw * 32 + lane] = p[0];
        asm volatile("bar.arrive %0, %1;" ::"r"(full), "n"(KW * 32) : "memory");
      } else {
        rs[kw * 32 + lane] = p[0];
        asm volatile("bar.sync %0, %1;" ::"r"(full), "n"(KW * 32) : "memory");
      }
    } else {
      asm volatile("bar.sync %0, %1;" ::"r"(full), "n"(KW * 32) : "memory");
      float v = p[0];
#pragma unroll
      for (int w = 1; w < KW; ++w) v += rs[w * 32 + lane];
      if constexpr (PC)
        if (jj + 2 < nmine) asm volatile("bar.arrive %0, %1;" ::"r"(empty), "n"(KW * 32) : "memory");
#pragma unroll
      for (int m = 1; m < (1 << L); m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
      if ((lane & ((1 << L) - 1)) == 0) *yp = __float2bfloat16_rn(v);
      yp += RW * R;
    }
  };
  int jj = 0;
#pragma unroll 1
  for (; jj + 1 < nmine; ++jj) step(jj, std::true_type{});
  if (jj < nmine) step(jj, std::false_type{});
}

template <int RW, int R, bool PC, int MINB, bool ALIGN = false, bool XPIN = false>
void launch_nf4_pair2(const __nv_bfloat16* X, int K, const std::uint8_t* packed, const float* absmax, int bs, int nOut,
                      __nv_bfloat16* Y, cudaStream_t stream) {
  if (K != 4096 || bs != 64 || nOut % R)
    fail("nf4_pair2_kernel: needs K 4096, blocksize 64, rows % {} == 0; got {}, {}, {}", R, K, bs, nOut);
  auto kernel = nf4_pair2_kernel<RW, R, PC, MINB, ALIGN, XPIN>;
  constexpr int smem = (ALIGN ? 2 : 1) * 65536 + RW * 2 * 4 * 32 * 4;
  static std::atomic<int> cap[16] = {};
  const int c = persistent_capacity(kernel, RW * 128, smem, smem, cap);
  const unsigned blocks = std::min<unsigned>(ceil_div(nOut / R, RW), static_cast<unsigned>(c));
  static std::atomic<bool> told{false};
  if (!told.exchange(true)) {
    cudaFuncAttributes fa{};
    LORA_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
    std::fprintf(stderr,
                 "  [pair2 RW%d R%d PC%d B%d A%d X%d: %u blocks of %d threads, %d registers, %d B local, %d B smem]\n",
                 RW, R, int(PC), MINB, int(ALIGN), int(XPIN), blocks, RW * 128, fa.numRegs, int(fa.localSizeBytes),
                 smem);
  }
  kernel<<<blocks, RW * 128, smem, stream>>>(X, packed, absmax, nOut, Y);
}

/// Stands in for the kernel before a decode GEMV (a norm writing the token's activations):
/// x = x·one, one block, no programmatic trigger.
__global__ void touch_kernel(__nv_bfloat16* x, int n, float one) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x))
    x[i] = __float2bfloat16(__bfloat162float(x[i]) * one);
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
  variant("old fused (ROWS 4)", run_old);
  MMA(1, 8, 2);
#define STREAM(NT, WIDE, LAST)                                                                                 \
  variant("stream NT" #NT " WIDE" #WIDE " LAST" #LAST, [&](int i) {                                           \
    detail::launch_nf4_stream<T, NT, WIDE, LAST>(reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in), \
                                                 q[i % sets].packed.data(), q[i % sets].absmax.data(), 64,      \
                                                 int(out), reinterpret_cast<T*>(Y.data()), Y.view().ld,         \
                                                 ctx->stream());                                                \
  })
  STREAM(1, true, true);
  STREAM(1, true, false);
  STREAM(1, false, true);
  STREAM(1, false, false);
  // Byte-pair table on the CUDA cores (nf4_pair_kernel): RW row-warps x 4 K-warps, R rows per
  // batch, D batches of codes in flight, ALIGN: 64 KB-aligned table (one PRMT per lookup).
#define PAIR(RW, R, D, ALIGN, MINB)                                                                            \
  variant("pair RW" #RW " R" #R " D" #D " A" #ALIGN " B" #MINB, [&](int i) {                                    \
    detail::launch_nf4_pair<RW, R, D, ALIGN, MINB>(reinterpret_cast<const T*>(X.data()), int(in),              \
                                                   q[i % sets].packed.data(), q[i % sets].absmax.data(), 64,    \
                                                   int(out), reinterpret_cast<T*>(Y.data()), ctx->stream());    \
  })
  PAIR(4, 8, 1, true, 1);
  PAIR(2, 8, 1, false, 2);
#define PAIR2(RW, R, PC, MINB)                                                                                 \
  variant("pair2 RW" #RW " R" #R " PC" #PC " B" #MINB, [&](int i) {                                            \
    detail::launch_nf4_pair2<RW, R, PC, MINB>(reinterpret_cast<const T*>(X.data()), int(in),                    \
                                              q[i % sets].packed.data(), q[i % sets].absmax.data(), 64,         \
                                              int(out), reinterpret_cast<T*>(Y.data()), ctx->stream());         \
  })
  PAIR2(4, 4, false, 1);
  PAIR2(4, 4, true, 1);
  PAIR2(2, 4, true, 2);
  // Third round: 64 KB-aligned table (one PRMT per lookup) and/or activations pinned as floats.
#define PAIR3(RW, R, PC, ALIGN, XPIN)                                                                          \
  variant("pair2 RW" #RW " R" #R " PC" #PC " A" #ALIGN " X" #XPIN, [&](int i) {                               \
    detail::launch_nf4_pair2<RW, R, PC, 1, ALIGN, XPIN>(reinterpret_cast<const T*>(X.data()), int(in),          \
                                                        q[i % sets].packed.data(), q[i % sets].absmax.data(), 64, \
                                                        int(out), reinterpret_cast<T*>(Y.data()), ctx->stream()); \
  })
  PAIR3(4, 4, false, false, true);
  PAIR3(4, 4, false, true, true);
  PAIR3(4, 4, true, true, true);
  PAIR3(4, 2, false, true, true);
  variant("pair2 RW4 R4 PC1 B1, L2", [&](int) {
    detail::launch_nf4_pair2<4, 4, true, 1>(reinterpret_cast<const T*>(X.data()), int(in), q[0].packed.data(),
                                            q[0].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y.data()),
                                            ctx->stream());
  });
  variant("pair2 RW4 R4 PC0 A1 X1, L2", [&](int) {
    detail::launch_nf4_pair2<4, 4, false, 1, true, true>(reinterpret_cast<const T*>(X.data()), int(in),
                                                         q[0].packed.data(), q[0].absmax.data(), 64, int(out),
                                                         reinterpret_cast<T*>(Y.data()), ctx->stream());
  });
  variant("pair RW4 R8 D1 A1, L2", [&](int) {
    detail::launch_nf4_pair<4, 8, 1, true, 1>(reinterpret_cast<const T*>(X.data()), int(in), q[0].packed.data(),
                                              q[0].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y.data()),
                                              ctx->stream());
  });
  // The same kernels on one L2-resident weight set (33 MB of the 50 MB L2): what they cost
  // without DRAM.
  variant("stream NT1 WIDE LAST, L2", [&](int) {
    detail::launch_nf4_stream<T, 1, true, true>(reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in),
                                                q[0].packed.data(), q[0].absmax.data(), 64, int(out),
                                                reinterpret_cast<T*>(Y.data()), Y.view().ld, ctx->stream());
  });
  variant("old fused, L2", [&](int) {
    detail::nf4_gemv_kernel<T, 1, detail::nf4_rows><<<detail::ceil_div(out, detail::nf4_rows), detail::nf4_threads, 0,
                                                       ctx->stream()>>>(
        reinterpret_cast<const T*>(X.data()), X.view().ld, 1, int(in), q[0].packed.data(), q[0].absmax.data(), 64,
        int(out), reinterpret_cast<T*>(Y.data()), Y.view().ld);
  });
  {  // load-pattern ceilings (no arithmetic)
    DeviceBuffer<unsigned> sink(std::size_t(1) << 20);
#define PROBE(KS, MAP, S_)                                                                                     \
  {                                                                                                            \
    const double pms = time_ms(*ctx, [&](int i) {                                                              \
      detail::launch_nf4_read_probe<KS, MAP, S_>(q[i % sets].packed.data(), q[i % sets].absmax.data(), int(in),  \
                                                 int(out), sink.data(), ctx->stream());                          \
    });                                                                                                        \
    report("probe KS" #KS " MAP" #MAP " S" #S_, pms, 0);                                                       \
  }
    PROBE(16, 0, 2) PROBE(16, 1, 2) PROBE(8, 1, 2) PROBE(16, 1, 4)
  }
  variant("nf4_gemm (library)", [&](int i) { nf4_gemm<S>(q[i % sets], X.view(), Y.view(), *ctx); });
  // the library's byte-pair kernel with K at run time and at compile time
  variant("byte_pair K runtime", [&](int i) {
    detail::launch_nf4_byte_pair_kw<T, 0, 0>(reinterpret_cast<const T*>(X.data()), int(in), q[i % sets].packed.data(),
                                          q[i % sets].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y.data()),
                                          ctx->stream());
  });
  variant("byte_pair K 4096 bs 64", [&](int i) {
    detail::launch_nf4_byte_pair_kw<T, 4, 64>(reinterpret_cast<const T*>(X.data()), int(in), q[i % sets].packed.data(),
                                          q[i % sets].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y.data()),
                                          ctx->stream());
  });
  variant("byte_pair K 4096 bs 64 no PDL", [&](int i) {
    detail::launch_nf4_byte_pair_kw<T, 4, 64>(reinterpret_cast<const T*>(X.data()), int(in), q[i % sets].packed.data(),
                                          q[i % sets].absmax.data(), 64, int(out), reinterpret_cast<T*>(Y.data()),
                                          ctx->stream(), false);
  });
  {  // a decode chain: a kernel writes X, then the GEMV reads it (the realistic case for PDL:
     // the kernel before does not trigger early, so only the launch latency can be hidden)
    auto touch = [&] {
      detail::touch_kernel<<<1, 256, 0, ctx->stream()>>>(reinterpret_cast<T*>(X.data()), int(in), 1.f);
    };
    const double t_touch = time_ms(*ctx, [&](int) { touch(); });
    const double t_cub = time_ms(*ctx, [&](int i) {
      touch();
      detail::gemm<S, S, S>(*ctx, false, true, 1, out, in, 1.f, X.view(), W[i % sets].view(), 0.f, Y.view());
    });
    auto pair = [&](bool pdl) {
      return time_ms(*ctx, [&](int i) {
        touch();
        detail::launch_nf4_byte_pair_kw<T, 4, 64>(reinterpret_cast<const T*>(X.data()), int(in),
                                              q[i % sets].packed.data(), q[i % sets].absmax.data(), 64, int(out),
                                              reinterpret_cast<T*>(Y.data()), ctx->stream(), pdl);
      });
    };
    const double t_pdl = pair(true), t_nopdl = pair(false);
    std::fprintf(stderr,
                 "chain (touch kernel %.2f us, then the GEMV): cuBLAS %.2f us, byte_pair PDL %.2f us, no PDL %.2f us;"
                 " GEMV part (chain - touch): cuBLAS/ours %.2fx (PDL), %.2fx (no PDL)\n",
                 t_touch * 1e3, t_cub * 1e3, t_pdl * 1e3, t_nopdl * 1e3, (t_cub - t_touch) / (t_pdl - t_touch),
                 (t_cub - t_touch) / (t_nopdl - t_touch));
    std::fprintf(csv, "chain_touch,%.5f,0,0\nchain_cublas,%.5f,0,0\nchain_byte_pair_pdl,%.5f,0,0\n"
                 "chain_byte_pair_nopdl,%.5f,0,0\n", t_touch, t_cub, t_pdl, t_nopdl);
  }
  variant("old fused again", run_old);
  PAIR3(4, 4, false, true, true);  // again: run-to-run spread

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
      const double s8 = t8(detail::launch_nf4_stream<T, 1, true, true>), s88 = t8(detail::launch_nf4_stream<T, 1, false, false>);
      std::fprintf(stderr, "T8: stream WIDE LAST %.2f us, stream %.2f us\n", s8 * 1e3, s88 * 1e3);
      std::fprintf(csv, "t8_stream_ks16_g4_w,%.5f,0,0\nt8_stream_ks16_g4,%.5f,0,0\n", s8, s88);
      const double m8 = t8(detail::launch_nf4_mma<T, 1, 8, 2>), b84 = t8(detail::launch_nf4_bulk<T, 8, 4>),
                   b164 = t8(detail::launch_nf4_bulk<T, 16, 4>), b86 = t8(detail::launch_nf4_bulk<T, 8, 6>);
      std::fprintf(stderr, "T8: mma KS8 P2 %.2f us, bulk KS8 S4 %.2f us, bulk KS16 S4 %.2f us, bulk KS8 S6 %.2f us\n",
                   m8 * 1e3, b84 * 1e3, b164 * 1e3, b86 * 1e3);
      std::fprintf(csv, "t8_mma,%.5f,0,0\nt8_bulk_ks8_s4,%.5f,0,0\nt8_bulk_ks16_s4,%.5f,0,0\nt8_bulk_ks8_s6,%.5f,0,0\n", m8,
                   b84, b164, b86);
    }
    mma16(detail::launch_nf4_stream<T, 2, false, false>, "stream");
    mma16(detail::launch_nf4_stream<T, 2, false, true>, "stream_LAST");
    mma16(detail::launch_nf4_stream<T, 2, true, false>, "stream_WIDE");
    mma16(detail::launch_nf4_mma<T, 2, 8, 2>, "mma_KS8_P2");
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
