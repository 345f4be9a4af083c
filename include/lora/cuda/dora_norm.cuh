#pragma once
// DoRA's weight-norm GEMM on tensor cores (docs/cuda.md, "DoRA"):
//   PG = M·Aᵀ   [rows × r] in float,  M = [W; A] (the fused block's first out + r rows), A [r × K]
// (N = r ≤ 32). Each block owns a [row range × K range] of M, streams its 64 × 64 tiles
// through a cp.async pipeline (the layout of dy_pass_kernel, grad.cuh) and multiplies them by
// the block's A slice (held in shared memory) with mma.m16n8k16; the K ranges are chosen so
// that the grid fills the device. Each block writes float partial sums, and a second kernel
// adds them in a fixed order, so the result does not depend on the schedule;
// dora_norm_fused_kernel computes the row norms straight from the partials in one launch.

#include <lora/cuda/grad.cuh>
#include <lora/cuda/kernels.cuh>
#include <lora/cuda/runtime.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace lora::detail {

constexpr int norm_gemm_threads = 128;  // 4 warps, 16 rows of a 64-row tile each
constexpr int norm_gemm_stages = 8;     // M tiles in the pipeline (8 KB each)

/// Shapes of norm_gemm_kernel for N = 8·NJ columns (NJ 2: r ≤ 16; NJ 4: r ≤ 32).
template <int NJ>
struct norm_gemm_shape {
  static constexpr int N = NJ * 8;
  /// Most 64-row tiles per block (each warp keeps 16 rows × N sums per tile in registers).
  static constexpr int TT = 4;
  /// Most 64-wide K tiles per block: the A slice [N × 64·KT_MAX] is 32 KB of shared memory.
  static constexpr int KT_MAX = NJ == 2 ? 16 : 8;
  static constexpr int smem_bytes(int kt) { return norm_gemm_stages * 64 * 64 * 2 + kt * N * 64 * 2; }
};

/// One block: row tiles [⌊p·RT/P⌋, ⌊(p+1)·RT/P⌋) × K tiles [⌊q·KT/Q⌋, ⌊(q+1)·KT/Q⌋) of M
/// [rows × K] (p, q = blockIdx.x, .y). The A slice of the K range goes to shared memory first
/// (cp.async group 0; rows n ≥ r and columns ≥ K as zeros), stored like the M tiles: per K
/// tile [N × 64], 16-byte chunk ch of row n at ch ^ (n % 8). M tiles stream K tile outer, row
/// tile inner, so each warp loads its B fragments (k = K, n = row of A: ldmatrix, not
/// transposed) once per K tile. Partials: part[q][rows][N] (columns ≥ r are zeros).
template <class T, int NJ>
__global__ void __launch_bounds__(norm_gemm_threads)
    norm_gemm_kernel(const T* __restrict__ M, long ldm, int rows, int K, const T* __restrict__ A, long lda, int r,
                     int RT, int P, int KT, int Q, float* __restrict__ part) {
  using Sh = norm_gemm_shape<NJ>;
  constexpr int N = Sh::N, TT = Sh::TT, ST = norm_gemm_stages;
  extern __shared__ __align__(128) unsigned char norm_gemm_smem[];
  T* tiles = reinterpret_cast<T*>(norm_gemm_smem);
  T* as = tiles + ST * 64 * 64;  // [nkt][N][64]
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const long p = blockIdx.x, q = blockIdx.y;
  const int rt0 = static_cast<int>(p * RT / P), nrt = static_cast<int>((p + 1) * RT / P) - rt0;
  const int kt0 = static_cast<int>(q * KT / Q), nkt = static_cast<int>((q + 1) * KT / Q) - kt0;
  const int ntiles = nrt * nkt;

  for (int c = tid; c < nkt * N * 8; c += norm_gemm_threads) {
    const int kt = c / (N * 8), n = (c / 8) % N, ch = c % 8;
    const int k = (kt0 + kt) * 64 + ch * 8;
    const bool ok = n < r && k < K;
    cp_async16(smem_u32(as + (kt * N + n) * 64 + ((ch ^ (n & 7)) << 3)), ok ? A + n * lda + k : A, ok ? 16 : 0);
  }
  cp_async_commit();

  // Tile i = (K tile i / nrt, row tile i % nrt).
  auto load_tile = [&](int i) {
    load_tile64<norm_gemm_threads>(tiles + (i % ST) * 64 * 64, M, ldm, (rt0 + i % nrt) * 64, rows,
                                   (kt0 + i / nrt) * 64, K, tid);
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }

  const int g = lane >> 2, qd = lane & 3, mi = lane >> 3, r8 = lane & 7;
  float acc[TT][NJ][4] = {};
  for (int kt = 0; kt < nkt; ++kt) {
    std::uint32_t bfr[4][NJ][2];  // A of this K tile as mma B operands
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      if (tt < nrt) {  // the same for the whole block
        const int i = kt * nrt + tt;
        cp_async_wait<ST - 2>();  // the A slice and tile i have landed
        __syncthreads();          // ... for every thread; tile i − 1's stage is free
        if (i + ST - 1 < ntiles) load_tile(i + ST - 1);
        cp_async_commit();
        if (tt == 0) {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks)
#pragma unroll
            for (int np = 0; np < NJ / 2; ++np) {
              // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) of this
              // 16 × 16 block: b0, b1 of column group 2np, then of 2np + 1.
              std::uint32_t v[4];
              const int n = 16 * np + ((mi >> 1) << 3) + r8, ch = 2 * ks + (mi & 1);
              ldsm_x4(v, smem_u32(as + (kt * N + n) * 64 + ((ch ^ (n & 7)) << 3)));
              set_b_pair<NJ>(bfr[ks], np, v);
            }
        }
        const T* tile = tiles + (i % ST) * 64 * 64;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) strip_mma<T, NJ>(acc[tt], tile, bfr[ks], ks, warp, lane);
      }
    }
  }
  cp_async_wait<0>();  // nothing in flight when the block exits
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    if (tt >= nrt) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = (rt0 + tt) * 64 + 16 * warp + g + 8 * h;
      if (row < rows) {
        float* dst = part + (q * rows + row) * N + 2 * qd;
#pragma unroll
        for (int n = 0; n < NJ; ++n)
          *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(acc[tt][n][2 * h], acc[tt][n][2 * h + 1]);
      }
    }
  }
}

/// PG[i][j] = Σ_q part[q][i][j] for j < r: one thread per element, the partials added in q order.
__global__ inline void norm_gemm_reduce_kernel(const float* __restrict__ part, int Q, int rows, int N, int r,
                                               float* __restrict__ PG, long ldpg) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(rows) * r) return;
  const long row = i / r;
  const int j = static_cast<int>(i % r);
  float v = 0.f;
  for (int q = 0; q < Q; ++q) v += part[(static_cast<long>(q) * rows + row) * N + j];
  PG[row * ldpg + j] = v;
}

/// True when norm_gemm can run: 16-bit T, 1 ≤ r ≤ 32, A [≥ r × K] beside M [rows × K], K a
/// multiple of 8, every row of M and A starting on 16 bytes.
template <class T>
bool norm_gemm_ok(DeviceView<const T> M, DeviceView<const T> A, Index r) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    return r >= 1 && r <= 32 && A.rows >= r && A.cols == M.cols && M.cols % 8 == 0 && M.ld % 8 == 0 &&
           A.ld % 8 == 0 && aligned(M.data, 16) && aligned(A.data, 16) && M.rows <= (Index{1} << 30) &&
           M.cols <= (Index{1} << 30);
  }
}

/// The launch shape for RT row tiles and KT K tiles: P row ranges (of at most TT tiles) × Q K
/// ranges (of at most kt_max tiles). Q starts at its least (fewest partial sums), P fills
/// `blocks` (the blocks the device holds at once) up to one row tile per range, and Q grows
/// only when the row ranges alone cannot fill it.
struct norm_gemm_grid {
  int RT = 0, KT = 0, P = 0, Q = 0;
  int N = 0;  ///< floats per row of a partial (launch_norm_gemm sets it)
};
inline norm_gemm_grid norm_gemm_plan(Index rows, Index K, int TT, int kt_max, int blocks) {
  norm_gemm_grid p;
  p.RT = static_cast<int>((rows + 63) / 64);
  p.KT = static_cast<int>((K + 63) / 64);
  if (p.RT == 0 || p.KT == 0) return p;
  p.Q = (p.KT + kt_max - 1) / kt_max;
  p.P = std::clamp(blocks / p.Q, (p.RT + TT - 1) / TT, p.RT);
  if (p.P == p.RT) p.Q = std::min(p.KT, std::max(p.Q, blocks / p.P));
  return p;
}

/// norm_gemm for N = 8·NJ columns; `phases` 1 launches only the partial sums, 2 only the
/// reduction, 3 both.
template <class T, int NJ>
norm_gemm_grid launch_norm_gemm(cudaStream_t stream, DeviceView<const T> M, DeviceView<const T> A, Index r,
                                DeviceView<float> PG, DeviceBuffer<float>& scratch, int blocks, int phases = 3) {
  using Sh = norm_gemm_shape<NJ>;
  auto kernel = norm_gemm_kernel<T, NJ>;
  constexpr int smem_max = Sh::smem_bytes(Sh::KT_MAX);
  const int c = persistent_capacity(kernel, norm_gemm_threads, smem_max, smem_max);
  const Index rows = M.rows, K = M.cols;
  norm_gemm_grid p = norm_gemm_plan(rows, K, Sh::TT, Sh::KT_MAX, blocks > 0 ? blocks : c);
  p.N = Sh::N;
  if (p.P == 0) {  // no rows, or K = 0 (PG = 0)
    if (rows > 0 && (phases & 2))
      LORA_CUDA_CHECK(cudaMemset2DAsync(PG.data, PG.ld * sizeof(float), 0, r * sizeof(float), rows, stream));
    return p;
  }
  const std::size_t need = static_cast<std::size_t>(p.Q) * rows * Sh::N;
  if (scratch.size() < need) scratch = DeviceBuffer<float>(need);
  if (phases & 1) {
    const int kt_block = (p.KT + p.Q - 1) / p.Q;
    kernel<<<dim3(static_cast<unsigned>(p.P), static_cast<unsigned>(p.Q)), norm_gemm_threads,
             Sh::smem_bytes(kt_block), stream>>>(M.data, M.ld, static_cast<int>(rows), static_cast<int>(K), A.data,
                                                 A.ld, static_cast<int>(r), p.RT, p.P, p.KT, p.Q, scratch.data());
    LORA_CUDA_CHECK_LAUNCH("norm_gemm_kernel");
  }
  if (phases & 2) {
    norm_gemm_reduce_kernel<<<ceil_div(rows * r, 256), 256, 0, stream>>>(
        scratch.data(), p.Q, static_cast<int>(rows), Sh::N, static_cast<int>(r), PG.data, PG.ld);
    LORA_CUDA_CHECK_LAUNCH("norm_gemm_reduce_kernel");
  }
  return p;
}

/// PG = M·A[0:r]ᵀ ([rows × r], float) for M [rows × K] and A [≥ r × K] (DoRA: M = [W; A]), from
/// one pass over M on tensor cores. Check norm_gemm_ok first. `blocks` > 0 overrides the target
/// block count (tests and bench/cuda use it); partial sums live in `scratch` (grown as needed):
/// scratch[(q·rows + i)·N + j], q < Q, with Q and N in the returned grid. `phases` 1 stops
/// there (PG untouched; dora_weight_norm adds the partials itself), 2 only adds them, 3 both.
template <class T>
norm_gemm_grid norm_gemm(const CudaContext& ctx, DeviceView<const T> M, DeviceView<const T> A, Index r,
                         DeviceView<float> PG, DeviceBuffer<float>& scratch, int blocks = 0, int phases = 3) {
  if (r <= 16) return launch_norm_gemm<T, 2>(ctx.stream(), M, A, r, PG, scratch, blocks, phases);
  return launch_norm_gemm<T, 4>(ctx.stream(), M, A, r, PG, scratch, blocks, phases);
}

constexpr int dora_norm_fused_threads = 64;

/// DoRA's row norms straight from PG's partial sums part[q][i][j] (q < Q, i < out + r, row
/// stride `stride` ≥ r; Q = 1 and stride r for a finished PG):
///   p_n = Σ_q part[q][n][:],  G = Σ_q part[q][out + :][:],
///   norm[n] = sqrt(‖w_n‖² + 2s·b_n·p_n + s²·b_n·G·b_nᵀ),  c[n] = m[n] / norm[n] (when c).
/// Every block adds G's partials into shared memory; one thread per row n. The partials are
/// added in q order, as in norm_gemm_reduce_kernel. When PG is given (ld r), P and G are
/// written there too. N ≥ r (16 or 32).
template <class T, int N>
__global__ void __launch_bounds__(dora_norm_fused_threads)
    dora_norm_fused_kernel(const float* __restrict__ part, int Q, long stride, int out, int r,
                           const float* __restrict__ wn2, const T* __restrict__ B, long ldb, float s,
                           const float* __restrict__ m, float* __restrict__ norm, float* __restrict__ c,
                           float* __restrict__ PG) {
  __shared__ float Gs[N][N];
  const long rows = static_cast<long>(out) + r;
  for (int e = static_cast<int>(threadIdx.x); e < N * N; e += dora_norm_fused_threads) {
    const int i = e / N, j = e % N;
    float v = 0.f;
    if (i < r && j < r) {
      for (int q = 0; q < Q; ++q) v += part[(q * rows + out + i) * stride + j];
      if (PG && blockIdx.x == 0) PG[(static_cast<long>(out) + i) * r + j] = v;
    }
    Gs[i][j] = v;
  }
  __syncthreads();
  const int n = static_cast<int>(blockIdx.x) * dora_norm_fused_threads + static_cast<int>(threadIdx.x);
  if (n >= out) return;
  float b[N], p[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    b[j] = j < r ? to_float(B[static_cast<long>(n) * ldb + j]) : 0.f;
    p[j] = 0.f;
  }
  for (int q = 0; q < Q; ++q) {
    const float* src = part + (q * rows + n) * stride;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < r) p[j] += src[j];
  }
  float cross = 0.f, quad = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float gb = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) gb = fmaf(Gs[i][j], b[j], gb);
    cross = fmaf(b[i], p[i], cross);
    quad = fmaf(b[i], gb, quad);
  }
  if (PG)
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < r) PG[static_cast<long>(n) * r + j] = p[j];
  const float v = sqrtf(fmaxf(wn2[n] + 2.f * s * cross + s * s * quad, 0.f));
  norm[n] = v;
  if (c) c[n] = m[n] / v;
}

/// dora_norm_fused_kernel for r ≤ 32 (false otherwise: the caller uses dora_norm_kernel).
template <class T>
bool dora_norm_fused(cudaStream_t stream, const float* part, int Q, long stride, Index out, Index r,
                     const float* wn2, const T* B, long ldb, float s, const float* m, float* norm, float* c,
                     float* PG) {
  if (r < 1 || r > 32 || out < 1) return false;
  const unsigned grid = ceil_div(out, dora_norm_fused_threads);
  if (r <= 16)
    dora_norm_fused_kernel<T, 16><<<grid, dora_norm_fused_threads, 0, stream>>>(
        part, Q, stride, static_cast<int>(out), static_cast<int>(r), wn2, B, ldb, s, m, norm, c, PG);
  else
    dora_norm_fused_kernel<T, 32><<<grid, dora_norm_fused_threads, 0, stream>>>(
        part, Q, stride, static_cast<int>(out), static_cast<int>(r), wn2, B, ldb, s, m, norm, c, PG);
  LORA_CUDA_CHECK_LAUNCH("dora_norm_fused_kernel");
  return true;
}


/// dora_norm_kernel's result for r ≤ 64 with one warp per row: lane k holds b_n[k] and
/// p_n[k] (and k + 32), G lives in shared memory (row stride r + 1: no bank conflicts), so a
/// row costs r shuffles instead of r² loads of B and G. P [out × r] and G [r × r] are
/// contiguous (ld r); dynamic shared memory r·(r + 1) floats.
template <class T>
__global__ void __launch_bounds__(256)
    dora_norm_rows_kernel(const float* __restrict__ wn2, const float* __restrict__ P, const float* __restrict__ G,
                          const T* __restrict__ B, long ldb, int out, int r, float s, const float* __restrict__ m,
                          float* __restrict__ norm, float* __restrict__ c) {
  extern __shared__ float dora_norm_rows_g[];
  for (int e = static_cast<int>(threadIdx.x); e < r * r; e += static_cast<int>(blockDim.x))
    dora_norm_rows_g[(e / r) * (r + 1) + e % r] = G[e];
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) & 31, warps = static_cast<int>(blockDim.x) / 32;
  const int k0 = lane, k1 = lane + 32;
  for (int n = static_cast<int>(blockIdx.x) * warps + static_cast<int>(threadIdx.x) / 32; n < out;
       n += static_cast<int>(gridDim.x) * warps) {
    const float b0 = k0 < r ? to_float(B[static_cast<long>(n) * ldb + k0]) : 0.f;
    const float b1 = k1 < r ? to_float(B[static_cast<long>(n) * ldb + k1]) : 0.f;
    const float p0 = k0 < r ? P[static_cast<long>(n) * r + k0] : 0.f;
    const float p1 = k1 < r ? P[static_cast<long>(n) * r + k1] : 0.f;
    float g0 = 0.f, g1 = 0.f;  // (G·b_n) at k0, k1
    for (int j = 0; j < r; ++j) {
      const float bj = __shfl_sync(0xffffffffu, j < 32 ? b0 : b1, j & 31);
      if (k0 < r) g0 = fmaf(dora_norm_rows_g[k0 * (r + 1) + j], bj, g0);
      if (k1 < r) g1 = fmaf(dora_norm_rows_g[k1 * (r + 1) + j], bj, g1);
    }
    const float cross = warp_sum<float>(fmaf(b0, p0, b1 * p1));
    const float quad = warp_sum<float>(fmaf(b0, g0, b1 * g1));
    if (lane == 0) {
      const float v = sqrtf(fmaxf(wn2[n] + 2.f * s * cross + s * s * quad, 0.f));
      norm[n] = v;
      if (c) c[n] = m[n] / v;
    }
  }
}

/// The row norms from finished P, G (PG [(out + r) × r]): dora_norm_rows_kernel for r ≤ 64,
/// dora_norm_kernel (one thread per row) above.
template <class T>
void dora_norm_from_pg(cudaStream_t stream, const float* wn2, const float* PG, const T* B, long ldb, Index out,
                       Index r, float s, const float* m, float* norm, float* c) {
  if (out < 1) return;
  if (r <= 64) {
    const int smem = static_cast<int>(r * (r + 1) * sizeof(float));
    dora_norm_rows_kernel<T><<<ceil_div(out, 8), 256, smem, stream>>>(wn2, PG, PG + out * r, B, ldb,
                                                                      static_cast<int>(out), static_cast<int>(r), s,
                                                                      m, norm, c);
    LORA_CUDA_CHECK_LAUNCH("dora_norm_rows_kernel");
    return;
  }
  dora_norm_kernel<T><<<ceil_div(out, 128), 128, 0, stream>>>(wn2, PG, PG + out * r, B, ldb, static_cast<int>(out),
                                                              static_cast<int>(r), s, m, norm, c);
  LORA_CUDA_CHECK_LAUNCH("dora_norm_kernel");
}

// ---- DoRA's forward for a few tokens in one pass over W (docs/cuda.md, "DoRA") ----
//
// One tensor-core pass computes, from W read once,
//   R = [W; A]·[A; X]ᵀ   [(out + r) × N] in float partial sums, N = 16 or 32 ≥ r + T, and
//   ‖w_n‖² = Σ_k W[n, k]²  (from the same W fragments, partial sums too),
// i.e. for row n of W: p_n = W_n·Aᵀ (r) and (X·Wᵀ)[:, n] (T); for A's rows: G = A·Aᵀ and X·Aᵀ.
// A second kernel (dora_pass_epilogue_kernel) adds the partials in a fixed order and writes
//   norm_n = sqrt(‖w_n‖² + 2s·b_n·p_n + s²·b_n·G·b_nᵀ),  c_n = m_n / norm_n,
//   Y[t, n] = c_n·((X·Wᵀ)[t, n] + s·(X·Aᵀ)[t, :]·b_n)
// so W, A, B and m may all change between calls: nothing is cached.

constexpr int dora_pass_threads = 128;  // as norm_gemm_kernel: 4 warps, 16 rows of a 64-row tile each

/// The two 16-bit values of an mma operand register as floats.
template <class T>
__device__ __forceinline__ float2 pair_to_float2(std::uint32_t v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
  } else {
    __half2 h;
    *reinterpret_cast<std::uint32_t*>(&h) = v;
    return __half22float2(h);
  }
}

/// norm_gemm_kernel's schedule (row tiles × K tiles per block, cp.async pipeline, swizzled
/// 64 × 64 tiles) over M = [W; A] (two row pointers: W's out rows, then A's r rows), with the
/// mma B operand [A; X] (rows n < r from A, r ≤ n < r + T from X, zeros up to N), plus the
/// squares of W's elements from the same A-operand fragments. Partials: part[q][rows][N],
/// sq[q][rows] (rows = out + r). Triggers its dependents at once (the epilogue waits). As a
/// programmatic dependent launch (`pdl`) it prefetches its first W tiles into L2, then waits
/// (griddepcontrol.wait) before it reads anything through shared memory; launched plainly, the
/// wait returns at once. ROW_OUTER: a block walks its K range row tile by row tile (each row
/// of W read front to back, the B fragments reloaded per tile) instead of K tile by K tile.
template <class T, int NJ, bool ROW_OUTER>
__global__ void __launch_bounds__(dora_pass_threads)
    dora_pass_kernel(const T* __restrict__ W, long ldw, int out, const T* __restrict__ A, long lda, int r,
                     const T* __restrict__ X, long ldx, int tokens, int K, int RT, int P, int KT, int Q,
                     float* __restrict__ part, float* __restrict__ sq, bool pdl) {
  using Sh = norm_gemm_shape<NJ>;
  constexpr int N = Sh::N, TT = Sh::TT, ST = norm_gemm_stages;
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  extern __shared__ __align__(128) unsigned char dora_pass_smem[];
  T* tiles = reinterpret_cast<T*>(dora_pass_smem);
  T* as = tiles + ST * 64 * 64;  // [nkt][N][64]
  const int rows = out + r;
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const long p = blockIdx.x, q = blockIdx.y;
  const int rt0 = static_cast<int>(p * RT / P), nrt = static_cast<int>((p + 1) * RT / P) - rt0;
  const int kt0 = static_cast<int>(q * KT / Q), nkt = static_cast<int>((q + 1) * KT / Q) - kt0;
  const int ntiles = nrt * nkt;
  if (pdl) {
    // The first ST − 1 tiles of W into L2 (one 128-byte row of a tile per thread) while the
    // previous kernel finishes: a later write to W would land in L2 as well, so nothing stale is read.
    for (int i = 0; i < ST - 1 && i < ntiles; ++i) {
      const int gr = (rt0 + (ROW_OUTER ? i / nkt : i % nrt)) * 64 + tid;
      const int gc = (kt0 + (ROW_OUTER ? i % nkt : i / nrt)) * 64;
      if (tid < 64 && gr < out && gc < K) asm volatile("prefetch.global.L2 [%0];" ::"l"(W + static_cast<long>(gr) * ldw + gc));
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }

  for (int c = tid; c < nkt * N * 8; c += dora_pass_threads) {
    const int kt = c / (N * 8), n = (c / 8) % N, ch = c % 8;
    const int k = (kt0 + kt) * 64 + ch * 8;
    const bool ok = n < r + tokens && k < K;
    const T* src = n < r ? A + static_cast<long>(n) * lda + k : X + static_cast<long>(n - r) * ldx + k;
    cp_async16(smem_u32(as + (kt * N + n) * 64 + ((ch ^ (n & 7)) << 3)), ok ? src : A, ok ? 16 : 0);
  }
  cp_async_commit();

  // Tile i = (K tile i / nrt, row tile i % nrt), or with ROW_OUTER (row tile i / nkt, K tile
  // i % nkt); row gr of M is W's row gr or A's row gr − out.
  auto load_tile = [&](int i) {
    T* dst = tiles + (i % ST) * 64 * 64;
    const int row0 = (rt0 + (ROW_OUTER ? i / nkt : i % nrt)) * 64, col0 = (kt0 + (ROW_OUTER ? i % nkt : i / nrt)) * 64;
#pragma unroll
    for (int e = 0; e < 64 * 8 / dora_pass_threads; ++e) {
      const int c = tid + e * dora_pass_threads, row = c >> 3, ch = c & 7;
      const int gr = row0 + row, gc = col0 + ch * 8;
      const bool ok = gr < rows && gc < K;
      const T* src = gr < out ? W + static_cast<long>(gr) * ldw + gc : A + static_cast<long>(gr - out) * lda + gc;
      cp_async16(smem_u32(dst + row * 64 + ((ch ^ (row & 7)) << 3)), ok ? src : W, ok ? 16 : 0);
    }
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }

  const int g = lane >> 2, qd = lane & 3, mi = lane >> 3, r8 = lane & 7;
  float acc[TT][NJ][4] = {};
  float ss[TT][2] = {};  // Σ W² of rows g and g + 8 of the warp's strip, this lane's columns
  std::uint32_t bfr[4][NJ][2];
  auto load_b = [&](int kt) {  // [A; X] of K tile kt as mma B operands
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
      for (int np = 0; np < NJ / 2; ++np) {
        std::uint32_t v[4];
        const int n = 16 * np + ((mi >> 1) << 3) + r8, ch = 2 * ks + (mi & 1);
        ldsm_x4(v, smem_u32(as + (kt * N + n) * 64 + ((ch ^ (n & 7)) << 3)));
        set_b_pair<NJ>(bfr[ks], np, v);
      }
  };
  // Tile i into acc / sums: wait for it, free the previous stage, queue tile i + ST − 1.
  auto step = [&](int i) {
    cp_async_wait<ST - 2>();
    __syncthreads();
    if (i + ST - 1 < ntiles) load_tile(i + ST - 1);
    cp_async_commit();
  };
  auto multiply = [&](int i, float(&a)[NJ][4], float(&sums)[2]) {
    const T* tile = tiles + (i % ST) * 64 * 64;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      std::uint32_t fa[4];  // fa[0], fa[2]: row g; fa[1], fa[3]: row g + 8 (mma's A layout)
      const int row = 16 * warp + (lane & 15), ch = 2 * ks + (lane >> 4);
      ldsm_x4(fa, smem_u32(tile + row * 64 + ((ch ^ (row & 7)) << 3)));
#pragma unroll
      for (int n = 0; n < NJ; ++n) mma_traits<T>::mma(a[n], fa, bfr[ks][n][0], bfr[ks][n][1]);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 u = pair_to_float2<T>(fa[h]), v = pair_to_float2<T>(fa[h + 2]);
        sums[h] = fmaf(u.x, u.x, fmaf(u.y, u.y, fmaf(v.x, v.x, fmaf(v.y, v.y, sums[h]))));
      }
    }
  };
  if constexpr (ROW_OUTER) {
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      if (tt < nrt) {
        for (int kt = 0; kt < nkt; ++kt) {
          const int i = tt * nkt + kt;
          step(i);
          load_b(kt);
          multiply(i, acc[tt], ss[tt]);
        }
      }
    }
  } else {
    for (int kt = 0; kt < nkt; ++kt) {
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) {
        if (tt < nrt) {
          const int i = kt * nrt + tt;
          step(i);
          if (tt == 0) load_b(kt);
          multiply(i, acc[tt], ss[tt]);
        }
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    if (tt >= nrt) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = ss[tt][h];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      const int row = (rt0 + tt) * 64 + 16 * warp + g + 8 * h;
      if (row < rows) {
        float* dst = part + (q * rows + row) * N + 2 * qd;
#pragma unroll
        for (int n = 0; n < NJ; ++n)
          *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(acc[tt][n][2 * h], acc[tt][n][2 * h + 1]);
        if (qd == 0) sq[q * rows + row] = v;
      }
    }
  }
}

constexpr int dora_pass_epilogue_threads = 256;  // 8 warps, one output row n at a time each

/// The loads of src[q·stride] for q0 ≤ q < q0 + 8 (zeros at q ≥ Q), issued together.
__device__ __forceinline__ void load_partials8(const float* __restrict__ src, long stride, int q0, int Q, float (&t)[8]) {
#pragma unroll
  for (int u = 0; u < 8; ++u) t[u] = q0 + u < Q ? src[(q0 + u) * stride] : 0.f;
}
/// v + Σ_q src[q·stride] for 8 ≤ q < Q, added in q order (what follows a first chunk of 8).
__device__ __forceinline__ float add_partials_from8(float v, const float* __restrict__ src, long stride, int Q) {
  for (int q0 = 8; q0 < Q; q0 += 8) {
    float t[8];
    load_partials8(src, stride, q0, Q, t);
#pragma unroll
    for (int u = 0; u < 8; ++u) v += t[u];
  }
  return v;
}
/// Σ_q src[q·stride] for q < Q, added in q order; the loads of 8 partials are issued together.
__device__ __forceinline__ float sum_partials(const float* __restrict__ src, long stride, int Q) {
  float t[8];
  load_partials8(src, stride, 0, Q, t);
  float v = 0.f;
#pragma unroll
  for (int u = 0; u < 8; ++u) v += t[u];
  return add_partials_from8(v, src, stride, Q);
}

/// The epilogue of the one-pass forward (N = 16 or 32 columns of partials, r + tokens ≤ N):
/// every block first adds the partials of A's rows, S[j][k] = Σ_q part[q][out + k][j] (k < r:
/// G[j][k] for j < r, (X·Aᵀ)[j − r][k] for j ≥ r); then one warp per row n, lane j holding
/// column j of R[n, :]. Block 0 also writes s·X·Aᵀ into xa [tokens × xa_cols] (zeros past r)
/// when xa is given: the fused backward reads it there, as after LoRA's forward. Launched as a
/// programmatic dependent of dora_pass_kernel: B's row and m are read before
/// griddepcontrol.wait (the pass does not write them), the partials after it.
template <class T, int N>
__global__ void __launch_bounds__(dora_pass_epilogue_threads)
    dora_pass_epilogue_kernel(const float* __restrict__ part, const float* __restrict__ sq, int Q, int out, int r,
                              int tokens, const T* __restrict__ B, long ldb, float s, const float* __restrict__ m,
                              float* __restrict__ norm, float* __restrict__ c, T* __restrict__ Y, long ldy,
                              T* __restrict__ xa, long ldxa, int xa_cols) {
  __shared__ float S[N][N + 1];
  const int lane = static_cast<int>(threadIdx.x) & 31, warps = dora_pass_epilogue_threads / 32;
  const int n0 = static_cast<int>(blockIdx.x) * warps + static_cast<int>(threadIdx.x) / 32;
  float b = 0.f, mn = 0.f;
  if (n0 < out) {
    b = lane < r ? to_float(B[static_cast<long>(n0) * ldb + lane]) : 0.f;
    mn = m[n0];
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const long rows = static_cast<long>(out) + r;
  const int j = lane < N ? lane : N - 1;  // lanes ≥ N (N = 16) mirror lane N − 1 and write nothing
  // The first 8 partials of this thread's entries of S and of its warp's first row, all loads in
  // flight together (one round trip to L2 instead of one for S, then one for the row).
  constexpr int SE = (N * 32 + dora_pass_epilogue_threads - 1) / dora_pass_epilogue_threads;  // r < 32
  float ts[SE][8], tv[8], tw[8];
#pragma unroll
  for (int i = 0; i < SE; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * dora_pass_epilogue_threads;
    if (e < N * r) load_partials8(part + (out + e / N) * N + e % N, rows * N, 0, Q, ts[i]);
  }
  if (n0 < out) {
    load_partials8(part + static_cast<long>(n0) * N + j, rows * N, 0, Q, tv);
    load_partials8(sq + n0, rows, 0, Q, tw);
  }
#pragma unroll
  for (int i = 0; i < SE; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * dora_pass_epilogue_threads;
    if (e < N * r) {
      float v = 0.f;
#pragma unroll
      for (int u = 0; u < 8; ++u) v += ts[i][u];
      S[e % N][e / N] = add_partials_from8(v, part + (out + e / N) * N + e % N, rows * N, Q);
    }
  }
  __syncthreads();
  if (xa && blockIdx.x == 0)
    for (int e = static_cast<int>(threadIdx.x); e < tokens * xa_cols; e += dora_pass_epilogue_threads) {
      const int t = e / xa_cols, k = e % xa_cols;
      xa[static_cast<long>(t) * ldxa + k] = from_float<T>(k < r ? s * S[r + t][k] : 0.f);
    }
  for (int n = n0; n < out; n += static_cast<int>(gridDim.x) * warps) {
    float v, w2;
    if (n != n0) {
      b = lane < r ? to_float(B[static_cast<long>(n) * ldb + lane]) : 0.f;
      mn = m[n];
      v = sum_partials(part + static_cast<long>(n) * N + j, rows * N, Q);
      w2 = sum_partials(sq + n, rows, Q);
    } else {  // the first row's first 8 partials are already loaded
      v = 0.f;
      w2 = 0.f;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        v += tv[u];
        w2 += tw[u];
      }
      v = add_partials_from8(v, part + static_cast<long>(n) * N + j, rows * N, Q);
      w2 = add_partials_from8(w2, sq + n, rows, Q);
    }
    float acc = 0.f;  // (G·b_n)_j for j < r, (X·Aᵀ)[j − r, :]·b_n for j ≥ r
    for (int k = 0; k < r; ++k) acc = fmaf(S[j][k], __shfl_sync(0xffffffffu, b, k), acc);
    const float cross = warp_sum<float>(lane < r ? b * v : 0.f);
    const float quad = warp_sum<float>(lane < r ? b * acc : 0.f);
    const float nv = sqrtf(fmaxf(w2 + 2.f * s * cross + s * s * quad, 0.f));
    const float cn = mn / nv;
    if (lane >= r && lane < r + tokens) Y[static_cast<long>(lane - r) * ldy + n] = from_float<T>(cn * fmaf(s, acc, v));
    if (lane == 0) {
      norm[n] = nv;
      c[n] = cn;
    }
  }
}

/// True when dora_pass runs: 16-bit T, 1 ≤ tokens, r ≥ 1, r + tokens ≤ 32; W [out × K], A [r × K]
/// and X [tokens × K] with K a multiple of 8 and every row on 16 bytes.
template <class T>
bool dora_pass_ok(DeviceView<const T> W, DeviceView<const T> A, DeviceView<const T> X, Index r) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    const Index K = W.cols;
    return r >= 1 && X.rows >= 1 && r + X.rows <= 32 && A.rows == r && A.cols == K && X.cols == K && K % 8 == 0 &&
           W.ld % 8 == 0 && A.ld % 8 == 0 && X.ld % 8 == 0 && aligned(W.data, 16) && aligned(A.data, 16) &&
           aligned(X.data, 16) && W.rows >= 1 && W.rows + r <= (Index{1} << 30) && K <= (Index{1} << 30);
  }
}

/// How dora_pass runs (bench_cuda times the alternatives): the pass as a programmatic
/// dependent launch, its tile order, and the epilogue's rows per warp.
struct DoraPassOptions {
  bool pdl = true;
  bool row_outer = true;
  int rows_per_warp = 1;
};

template <class T, int NJ>
norm_gemm_grid launch_dora_pass(cudaStream_t stream, DeviceView<const T> W, DeviceView<const T> A,
                                DeviceView<const T> X, Index r, const T* B, long ldb, float s, const float* m,
                                float* norm, float* c, DeviceView<T> Y, DeviceBuffer<float>& part,
                                DeviceBuffer<float>& sq, int blocks, DoraPassOptions o, T* xa,
                                long ldxa, int xa_cols) {
  using Sh = norm_gemm_shape<NJ>;
  auto kernel = o.row_outer ? dora_pass_kernel<T, NJ, true> : dora_pass_kernel<T, NJ, false>;
  constexpr int smem_max = Sh::smem_bytes(Sh::KT_MAX);
  const int cp = persistent_capacity(kernel, dora_pass_threads, smem_max, smem_max);
  const Index out = W.rows, rows = out + r, K = W.cols, tokens = X.rows;
  norm_gemm_grid p = norm_gemm_plan(rows, K, Sh::TT, Sh::KT_MAX, blocks > 0 ? blocks : cp);
  p.N = Sh::N;
  const std::size_t need = static_cast<std::size_t>(p.Q) * rows * Sh::N;
  if (part.size() < need) part = DeviceBuffer<float>(need);
  if (sq.size() < static_cast<std::size_t>(p.Q) * rows) sq = DeviceBuffer<float>(static_cast<std::size_t>(p.Q) * rows);
  const int kt_block = (p.KT + p.Q - 1) / p.Q;
  launch_maybe_pdl(kernel, dim3(static_cast<unsigned>(p.P), static_cast<unsigned>(p.Q)), dim3(dora_pass_threads),
                   Sh::smem_bytes(kt_block), stream, o.pdl, W.data, W.ld, static_cast<int>(out), A.data, A.ld,
                   static_cast<int>(r), X.data, X.ld, static_cast<int>(tokens), static_cast<int>(K), p.RT, p.P, p.KT,
                   p.Q, part.data(), sq.data(), o.pdl);
  LORA_CUDA_CHECK_LAUNCH("dora_pass_kernel");
  // Fewer rows per warp: more rows in flight, but each block adds A's partials again.
  const int rows_per_block = std::max(1, o.rows_per_warp) * dora_pass_epilogue_threads / 32;
  const unsigned grid = ceil_div(out, rows_per_block);
  launch_maybe_pdl(dora_pass_epilogue_kernel<T, Sh::N>, dim3(grid), dim3(dora_pass_epilogue_threads), 0, stream, true,
                   static_cast<const float*>(part.data()), static_cast<const float*>(sq.data()), p.Q,
                   static_cast<int>(out), static_cast<int>(r), static_cast<int>(tokens), B, ldb, s, m, norm, c, Y.data,
                   Y.ld, xa, ldxa, xa_cols);
  LORA_CUDA_CHECK_LAUNCH("dora_pass_epilogue_kernel");
  return p;
}

/// DoRA's forward for a few tokens from one pass over W (check dora_pass_ok first):
///   Y = c ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ),  c = m ⊘ n,  n_i = ‖W_i + s·B_i·A‖ (norm and c written too),
/// with ‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ, every term in float from
/// this call's W, A, B, m. Partial sums live in `part` and `sq` (grown as needed). `blocks` > 0
/// overrides the first kernel's grid target (tests). With xa, s·X·Aᵀ goes to xa [tokens × xa_cols]
/// (zeros past r): the fused path's Xp columns [in, in + rp) that LoRA's backward reads.
template <class T>
norm_gemm_grid dora_pass(const CudaContext& ctx, DeviceView<const T> W, DeviceView<const T> A, DeviceView<const T> X,
                         Index r, const T* B, long ldb, float s, const float* m, float* norm, float* c, DeviceView<T> Y,
                         DeviceBuffer<float>& part, DeviceBuffer<float>& sq, int blocks = 0, DoraPassOptions o = {},
                         T* xa = nullptr, long ldxa = 0, int xa_cols = 0) {
  if (r + X.rows <= 16)
    return launch_dora_pass<T, 2>(ctx.stream(), W, A, X, r, B, ldb, s, m, norm, c, Y, part, sq, blocks, o, xa, ldxa,
                                  xa_cols);
  return launch_dora_pass<T, 4>(ctx.stream(), W, A, X, r, B, ldb, s, m, norm, c, Y, part, sq, blocks, o, xa, ldxa,
                                xa_cols);
}

}  // namespace lora::detail
