#pragma once
// Many adapters for one base layer on the GPU: the device side of
// lora/multi/adapter_set.hpp. A batch whose tokens use different adapters runs
// the base GEMM once (cuBLAS) and the adapters' low-rank paths as one shrink
// and one expand kernel over segments of tokens (SGMV-style). See docs/multi.md.
//
//   lora::multi::AdapterSet<bfloat16, lora::cuda> set(4096, 4096);
//   int a = set.add("math", A_math, B_math, 2.0);     // or from_host(cpu_set)
//   auto seg = set.segments(ids);                      // once per batch, reused by every layer
//   set.apply(W, X, seg, Y);                           // Y = X·Wᵀ + Σ per token s_i·(x·A_iᵀ)·B_iᵀ
//   set.replace(a, "math", A2, B2, 1.0);               // hot-swap; the others stay loaded

#include <lora/cuda/kernels.cuh>
#include <lora/cuda/nf4.cuh>
#include <lora/cuda/runtime.hpp>
#include <lora/multi/adapter_set.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace lora::multi {

namespace detail {

/// One adapter as the kernels see it: A [r × in] and Bᵀ [r × out], both row-major
/// and contiguous. rank 0 marks a free slot.
template <class T>
struct DeviceSlotEntry {
  const T* A = nullptr;
  const T* Bt = nullptr;
  int rank = 0;
  float scaling = 0.f;
};

/// Up to sgmv_tile_tokens consecutive positions [begin, begin + count) of the
/// grouped token order, all of one adapter.
struct SegmentTile {
  int adapter;
  int begin;
  int count;
};

constexpr int sgmv_threads = 128;
constexpr int sgmv_tile_tokens = 8;
/// Positions of one segment per block of the per-chunk expand (one warp each: they read the
/// same rows of Bᵀ, which L1 serves, so L2 sends Bᵀ once per chunk, not per tile of 8).
constexpr int sgmv_chunk_tokens = 16;
constexpr int sgmv_rank_group = 8;          // ranks per block of the CUDA-core shrink
constexpr int sgmv_expand_rank_group = 16;  // Bᵀ rows the expand has in flight per thread
constexpr int sgmv_max_rank = 1024;  // expand keeps a [tile × r] block of U in shared memory
constexpr int sgmv_max_split = 16;

template <class T, int N>
__device__ __forceinline__ void ldg_vec(const T* p, float* out) {
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = lora::detail::to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = lora::detail::to_float(__ldg(p + i));
  }
}
template <class T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = lora::detail::to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = lora::detail::to_float(p[i]);
  }
}
template <class T, int N>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
  if constexpr (N * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = lora::detail::from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = lora::detail::from_float<T>(v[i]);
  }
}

/// N elements of T kept as they are loaded (one 16-byte load when N·sizeof(T) = 16), to be
/// converted to float when used: a load in flight costs its raw registers only.
template <class T, int N>
struct RawVec {
  alignas(N * sizeof(T) == 16 ? 16 : N * sizeof(T) == 8 ? 8 : alignof(T)) T v[N];
  __device__ __forceinline__ void ldg(const T* p) {
    if constexpr (N * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(p));
    } else if constexpr (N * sizeof(T) == 8) {
      *reinterpret_cast<uint2*>(v) = __ldg(reinterpret_cast<const uint2*>(p));
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = __ldg(p + i);
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = lora::detail::from_float<T>(0.f);
  }
  __device__ __forceinline__ float operator[](int i) const { return lora::detail::to_float(v[i]); }
};

/// Rows j0 … j0 + RG − 1 of Bᵀ [r × out] at columns col … col + VW − 1, zeros for rows past
/// the rank and for lanes past the last column (!live).
template <class T, int VW, int RG>
__device__ __forceinline__ void load_bt_rows(RawVec<T, VW> (&b)[RG], const T* Bt, int j0, int r, int out, int col,
                                             bool live) {
#pragma unroll
  for (int g = 0; g < RG; ++g) {
    if (live && j0 + g < r)
      b[g].ldg(Bt + static_cast<long>(j0 + g) * out + col);
    else
      b[g].zero();
  }
}

/// Shrink: U[split][p, j] = s·Σ_{k in split} X[order[p], k]·A[j, k] for the
/// positions p of one tile (≤ TT tokens, one adapter) and all its ranks j, over
/// the split's range of K (gridDim.y splits; expand sums them) and the ranks
/// [RG·z, RG·z + RG) of blockIdx.z (blocks past the adapter's rank exit). The
/// block's threads stride over K in VW-wide chunks (16-byte loads when
/// VW·sizeof(T) = 16); each A element is read once per tile and feeds all its
/// tokens; the partial sums are reduced across the block. Float accumulation.
/// BT: the factor is the adapter's Bᵀ [r × K] instead of A (the backward's s·dY·B, K = out).
template <class T, int VW, int TT, int RG, bool BT = false>
__global__ void __launch_bounds__(sgmv_threads) sgmv_shrink_kernel(
    const T* __restrict__ X, long ldx, int in, const SegmentTile* __restrict__ tiles, const int* __restrict__ order,
    const DeviceSlotEntry<T>* __restrict__ table, float* __restrict__ U, int ldu, long split_stride,
    int chunks_per_split) {
  const SegmentTile tile = tiles[blockIdx.x];
  const DeviceSlotEntry<T> e = table[tile.adapter];
  const T* const F = BT ? e.Bt : e.A;
  const int j0 = static_cast<int>(blockIdx.z) * RG;
  if (j0 >= e.rank) return;  // the whole block: no barrier is skipped
  const int chunks = in / VW;
  const int c0 = static_cast<int>(blockIdx.y) * chunks_per_split;
  const int c1 = min(chunks, c0 + chunks_per_split);
  float* Us = U + static_cast<long>(blockIdx.y) * split_stride;
  const T* xrow[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) xrow[t] = X + static_cast<long>(order[tile.begin + min(t, tile.count - 1)]) * ldx;

  __shared__ float part[sgmv_threads / 32][TT * RG];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  {
    float acc[TT][RG];
#pragma unroll
    for (int t = 0; t < TT; ++t)
#pragma unroll
      for (int g = 0; g < RG; ++g) acc[t][g] = 0.f;
    for (int c = c0 + static_cast<int>(threadIdx.x); c < c1; c += sgmv_threads) {
      float a[RG][VW];
#pragma unroll
      for (int g = 0; g < RG; ++g) ldg_vec<T, VW>(F + static_cast<long>(min(j0 + g, e.rank - 1)) * in + c * VW, a[g]);
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t < tile.count) {
          float x[VW];
          ldg_vec<T, VW>(xrow[t] + c * VW, x);
#pragma unroll
          for (int g = 0; g < RG; ++g)
#pragma unroll
            for (int i = 0; i < VW; ++i) acc[t][g] = fmaf(x[i], a[g][i], acc[t][g]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t)
#pragma unroll
      for (int g = 0; g < RG; ++g) {
        const float v = lora::detail::warp_sum<float>(acc[t][g]);
        if (lane == 0) part[warp][t * RG + g] = v;
      }
    __syncthreads();
    for (int i = threadIdx.x; i < TT * RG; i += sgmv_threads) {
      const int t = i / RG, j = j0 + i % RG;
      if (t >= tile.count || j >= e.rank) continue;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < sgmv_threads / 32; ++w) v += part[w][i];
      Us[static_cast<long>(tile.begin + t) * ldu + j] = e.scaling * v;
    }
  }
}

/// Warps per block of the tensor-core shrink, and 32-wide K chunks each warp has in flight.
constexpr int sgmv_mma_warps = 4;
constexpr int sgmv_mma_unroll = 4;

/// Shrink on the tensor cores (bf16/half): the same U as sgmv_shrink_kernel, for the 16 ranks
/// [16·z, 16·z + 16) of blockIdx.z and one K-split (blockIdx.y) of one tile (≤ 8 tokens).
/// One mma.m16n8k16 computes A[16 ranks × 16 k]·X_tileᵀ[16 k × 8 tokens] in f32: the cross-lane
/// reduction of the CUDA-core kernel (five shuffles per sum) is the tensor core's. Per 32-wide
/// K chunk lane (g, q) = (lane / 4, lane % 4) loads 16 bytes (k = 8q … 8q + 7 of the chunk) of
/// A's rows g and g + 8 and of the tile's token g, and feeds two mma: the order of k inside a
/// chunk is the same permutation for A and X, which leaves the sum unchanged. Warps stride over
/// the split's chunks, sgmv_mma_unroll of them loaded before any is multiplied; the warps'
/// 16 × 8 results meet in shared memory. Rows past the rank and tokens past the tile's count
/// read a valid row (clamped) and are not stored. Needs in % 32 == 0 and 16-byte aligned rows.
/// BT: the factor is Bᵀ [r × K] instead of A, as in sgmv_shrink_kernel.
template <class T, bool BT = false>
__global__ void __launch_bounds__(sgmv_mma_warps * 32) sgmv_shrink_mma_kernel(
    const T* __restrict__ X, long ldx, int in, const SegmentTile* __restrict__ tiles, const int* __restrict__ order,
    const DeviceSlotEntry<T>* __restrict__ table, float* __restrict__ U, int ldu, long split_stride,
    int chunks_per_split) {
  constexpr int NW = sgmv_mma_warps, UN = sgmv_mma_unroll;
  const SegmentTile tile = tiles[blockIdx.x];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, q = lane % 4;
  const T* xr = X + static_cast<long>(order[tile.begin + min(g, tile.count - 1)]) * ldx + q * 8;
  const DeviceSlotEntry<T> e = table[tile.adapter];
  const int j0 = static_cast<int>(blockIdx.z) * 16;
  if (j0 >= e.rank) return;  // the whole block: no barrier is skipped
  const T* const F = BT ? e.Bt : e.A;
  const T* alo = F + static_cast<long>(min(j0 + g, e.rank - 1)) * in + q * 8;
  const T* ahi = F + static_cast<long>(min(j0 + g + 8, e.rank - 1)) * in + q * 8;
  const int c0 = static_cast<int>(blockIdx.y) * chunks_per_split;
  const int c1 = min(in / 32, c0 + chunks_per_split);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  for (int c = c0 + warp; c < c1; c += NW * UN) {
    uint4 ra[UN], rb[UN], rx[UN];
#pragma unroll
    for (int u = 0; u < UN; ++u) {
      const int k = (c + u * NW) * 32;
      if (c + u * NW < c1) {
        ra[u] = __ldg(reinterpret_cast<const uint4*>(alo + k));
        rb[u] = __ldg(reinterpret_cast<const uint4*>(ahi + k));
        rx[u] = __ldg(reinterpret_cast<const uint4*>(xr + k));
      }
    }
#pragma unroll
    for (int u = 0; u < UN; ++u)
      if (c + u * NW < c1) {
        lora::detail::mma_traits<T>::mma(d, {ra[u].x, rb[u].x, ra[u].y, rb[u].y}, rx[u].x, rx[u].y);
        lora::detail::mma_traits<T>::mma(d, {ra[u].z, rb[u].z, ra[u].w, rb[u].w}, rx[u].z, rx[u].w);
      }
  }
  __shared__ float red[NW][32][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) red[warp][lane][i] = d[i];
  __syncthreads();
  // Thread i sums element i % 4 of lane i / 4 over the warps: d0, d1 are ranks g, tokens
  // 2q, 2q + 1; d2, d3 ranks g + 8.
  const int i = static_cast<int>(threadIdx.x), l = i / 4, k = i % 4;
  const int row = l / 4 + (k >= 2 ? 8 : 0), tok = 2 * (l % 4) + (k & 1);
  float v = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) v += red[w][l][k];
  if (tok < tile.count && j0 + row < e.rank)
    U[static_cast<long>(blockIdx.y) * split_stride + static_cast<long>(tile.begin + tok) * ldu + j0 + row] =
        e.scaling * v;
}

/// Expand: Y[order[p], n] += Σ_j U[p, j]·Bᵀ[j, n] for the positions of one tile
/// and a block of VW·sgmv_threads output columns (gridDim.y blocks), in place:
/// Y is read and written once, Bᵀ rows are read with coalesced 16-byte loads.
/// The block's work is one chain of memory round trips, so it is kept short:
/// tile → (table entry, token order) → (the first RG rows of Bᵀ, Y's rows, U) all in
/// flight together → multiply–add → store. The Bᵀ rows are loaded before U is staged
/// and Y's rows straight into the accumulators (an earlier version waited for U's
/// staging before loading Bᵀ, and for one row per rank before that). U's K-splits are
/// summed while the tile's [count × r] block is staged in shared memory, zero-padded to
/// a multiple of RG; Bᵀ rows past the rank are not loaded (zeros).
/// AT: the factor is the adapter's A [r × out] instead of Bᵀ (the backward's dX += Gb·A, out = in).
template <class T, int VW, int TT, int RG, bool AT = false>
__global__ void __launch_bounds__(sgmv_threads) sgmv_expand_kernel(
    const float* __restrict__ U, int ldu, long split_stride, int splits, const SegmentTile* __restrict__ tiles,
    const int* __restrict__ order, const DeviceSlotEntry<T>* __restrict__ table, T* __restrict__ Y, long ldy, int out,
    T* __restrict__ D, long ldd) {
  extern __shared__ float u[];  // [TT × rp]
  const SegmentTile tile = tiles[blockIdx.x];
  const int col = (static_cast<int>(blockIdx.y) * sgmv_threads + static_cast<int>(threadIdx.x)) * VW;
  const bool live = col < out;
  const DeviceSlotEntry<T> e = table[tile.adapter];
  const int r = e.rank, rp = (r + RG - 1) / RG * RG;
  const T* const F = AT ? e.A : e.Bt;
  RawVec<T, VW> b[RG];
  load_bt_rows(b, F, 0, r, out, col, live);
  // With D (SgmvSchedule::delta) the sums start at 0 and go to D's row of the position.
  float acc[TT][VW];
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    if (!D && live && t < tile.count)
      load_vec<T, VW>(Y + static_cast<long>(order[tile.begin + t]) * ldy + col, acc[t]);
    else
#pragma unroll
      for (int i = 0; i < VW; ++i) acc[t][i] = 0.f;
  }
  for (int i = threadIdx.x; i < TT * rp; i += sgmv_threads) {
    const int t = i / rp, j = i % rp;
    float v = 0.f;
    if (t < tile.count && j < r)
      for (int s = 0; s < splits; ++s) v += U[s * split_stride + static_cast<long>(tile.begin + t) * ldu + j];
    u[i] = v;
  }
  __syncthreads();
  if (!live) return;
  for (int j0 = 0; j0 < r; j0 += RG) {
    if (j0 > 0) load_bt_rows(b, F, j0, r, out, col, true);
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (t < tile.count) {
#pragma unroll
        for (int g = 0; g < RG; ++g) {
          const float uj = u[t * rp + j0 + g];  // 0 past the rank, where b is 0 too
#pragma unroll
          for (int i = 0; i < VW; ++i) acc[t][i] = fmaf(uj, b[g][i], acc[t][i]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TT; ++t)
    if (t < tile.count)
      store_vec<T, VW>((D ? D + static_cast<long>(tile.begin + t) * ldd : Y + static_cast<long>(order[tile.begin + t]) * ldy) +
                           col,
                       acc[t]);
}

/// Expand with one warp per token: Y[order[p], n] += Σ_j U[p, j]·Bᵀ[j, n] for the position
/// p = tile.begin + 4·blockIdx.z + warp of one tile (warps past the tile's count exit) and the
/// 32·VW columns of blockIdx.y, lane l owning VW of them. Four times the warps of
/// sgmv_expand_kernel, each with the same 16 rows of Bᵀ in flight (16-byte loads; the block's
/// warps read the same rows, which L1 serves), so that many more loads are in flight when the
/// tiles are few tokens each (ncu, 64 adapters × 4 tokens: 1.9 warps per scheduler, 0.37
/// eligible, long-scoreboard stalls). Lane j < r loads U[p, j] (the K-splits summed) and
/// the ranks are broadcast by shuffles: no shared memory, no barrier. The chain of memory
/// round trips is tile → (table entry, order) → (Bᵀ, U, Y) → store. AT: A instead of Bᵀ.
/// WB warps per block (4; sgmv_chunk_tokens for the per-chunk expand, whose tiles are chunks
/// of up to that many positions of one segment).
template <class T, int VW, bool AT = false, int WB = 4>
__global__ void __launch_bounds__(WB * 32) sgmv_expand_token_kernel(
    const float* __restrict__ U, int ldu, long split_stride, int splits, const SegmentTile* __restrict__ tiles,
    const int* __restrict__ order, const DeviceSlotEntry<T>* __restrict__ table, T* __restrict__ Y, long ldy, int out,
    T* __restrict__ D, long ldd) {
  constexpr int RG = 16;
  const SegmentTile tile = tiles[blockIdx.x];
  const int t = static_cast<int>(blockIdx.z) * WB + static_cast<int>(threadIdx.x) / 32;
  if (t >= tile.count) return;  // the whole warp
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int col = (static_cast<int>(blockIdx.y) * 32 + lane) * VW;
  const bool live = col < out;  // lanes past the end still take part in the shuffles
  const int pos = tile.begin + t;
  const DeviceSlotEntry<T> e = table[tile.adapter];
  const int r = e.rank;
  const T* const F = AT ? e.A : e.Bt;
  RawVec<T, VW> b[RG];
  load_bt_rows(b, F, 0, r, out, col, live);
  T* dst = D ? D + static_cast<long>(pos) * ldd + col : Y + static_cast<long>(order[pos]) * ldy + col;
  float acc[VW];
  if (!D && live)
    load_vec<T, VW>(dst, acc);
  else
#pragma unroll
    for (int i = 0; i < VW; ++i) acc[i] = 0.f;
  for (int j0 = 0; j0 < r; j0 += 32) {
    float uj = 0.f;  // U[pos, j0 + lane], 0 past the rank
    if (j0 + lane < r)
      for (int s = 0; s < splits; ++s) uj += U[s * split_stride + static_cast<long>(pos) * ldu + j0 + lane];
    for (int k0 = j0; k0 < min(j0 + 32, r); k0 += RG) {
      if (k0 > 0) load_bt_rows(b, F, k0, r, out, col, live);
#pragma unroll
      for (int g = 0; g < RG; ++g) {
        const float u = __shfl_sync(0xffffffffu, uj, (k0 - j0 + g) & 31);  // 0 past the rank, as b is
#pragma unroll
        for (int i = 0; i < VW; ++i) acc[i] = fmaf(u, b[g][i], acc[i]);
      }
    }
  }
  if (live) store_vec<T, VW>(dst, acc);
}

/// dst[order[p], c] += src[p, c] for VW consecutive columns per thread (grid: positions ×
/// column blocks); tokens appear once in order, so no two threads touch one element.
template <class T, int VW>
__global__ void __launch_bounds__(sgmv_threads) add_rows_kernel(const T* __restrict__ src, long lds,
                                                                const int* __restrict__ order, int cols,
                                                                T* __restrict__ dst, long ldd) {
  const long p = blockIdx.x;
  const int col = (static_cast<int>(blockIdx.y) * sgmv_threads + static_cast<int>(threadIdx.x)) * VW;
  if (col >= cols) return;
  float a[VW], b[VW];
  T* d = dst + static_cast<long>(order[p]) * ldd + col;
  load_vec<T, VW>(d, a);
  load_vec<T, VW>(src + p * lds + col, b);
#pragma unroll
  for (int i = 0; i < VW; ++i) a[i] += b[i];
  store_vec<T, VW>(d, a);
}

/// The backward's weight gradients: a chunk of ≤ sgmv_grad_chunk consecutive positions of
/// segment `seg` (adapter `adapter`). slot −1: the segment is this one chunk and the block writes
/// the adapter's dA, dB; slot ≥ 0: the segment has several chunks and the block writes partial
/// sums into partial slot `slot`, which sgmv_grad_reduce_kernel adds in order.
struct GradItem {
  int adapter, seg, begin, count, slot;
};
/// A segment of several chunks: its partial slots [first, first + slots).
struct GradReduce {
  int adapter, seg, first, slots;
};
constexpr int sgmv_grad_chunk = 128;
constexpr int sgmv_grad_rank_group = 16;
constexpr int sgmv_grad_threads = 128;

/// roff[k] = Σ_{k' < k} round4(rank of segment k' 's adapter), k = 0 … nseg: where segment k's
/// dA (at roff[k]·in) and dB (at the dB block + roff[k]·out) start in the gradient storage.
/// From the device table, so the offsets are those of the ranks the kernels read. One block.
template <class T>
__global__ void __launch_bounds__(256) grad_offsets_kernel(const int* __restrict__ seg_adapter, int nseg,
                                                         const DeviceSlotEntry<T>* __restrict__ table,
                                                         long* __restrict__ roff) {
  __shared__ long warp_sums[8];
  __shared__ long carry;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int b = 0; b < nseg; b += 256) {
    const int k = b + static_cast<int>(threadIdx.x);
    const long v = k < nseg ? (table[seg_adapter[k]].rank + 3) / 4 * 4 : 0;
    long inc = v;  // inclusive scan in the warp, then over the warps
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const long o = __shfl_up_sync(0xffffffffu, inc, d);
      if (lane >= d) inc += o;
    }
    if (lane == 31) warp_sums[warp] = inc;
    __syncthreads();
    long before = carry;
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    if (k < nseg) roff[k] = before + inc - v;
    __syncthreads();
    if (threadIdx.x == 255) carry = before + inc;
    __syncthreads();
  }
  if (threadIdx.x == 0) roff[nseg] = carry;
}

/// dA and dB of a mixed batch: for the chunk's positions p (tokens order[p] of one adapter),
///   dA[j, c] = Σ_p Gb[p, j]·X[order[p], c]     (blockIdx.y < col_blocks_a: c < in)
///   dB[c, j] = Σ_p dY[order[p], c]·H[p, j]     (the other column blocks: c < out)
/// for the sgmv_grad_rank_group ranks j of blockIdx.z. Gb and H are the shrink kernels' float
/// partial sums (their K-splits added here). Each thread owns VW consecutive columns (VW = 4:
/// one 8- or 16-byte load of a row per token, so that a warp's float4 stores of a dA row are
/// 512 contiguous bytes) × the rank group in float accumulators; the chunk's Gb or H values and
/// row indices are staged in shared memory. dB's rows are r floats, so the block's [columns ×
/// ranks] tile goes through shared memory and leaves as contiguous runs of each row's ranks (a
/// thread per element: whole sectors, where storing each thread's own rows wrote half sectors
/// 512 bytes apart and ran at ≈ 1.1 TB/s). Every output element is written once, and sums run
/// in position order: the result does not depend on the schedule.
template <class T, int VW>
__global__ void __launch_bounds__(sgmv_grad_threads) sgmv_grad_kernel(
    const T* __restrict__ X, long ldx, const T* __restrict__ dY, long ldy, int in, int out,
    const float* __restrict__ UG, long ssg, int splits_g, const float* __restrict__ UH, long ssh, int splits_h,
    int ldu, const GradItem* __restrict__ items, const int* __restrict__ order,
    const DeviceSlotEntry<T>* __restrict__ table, const long* __restrict__ roff, float* __restrict__ dA_base,
    float* __restrict__ dB_base, float* __restrict__ partials, long slot_stride, int col_blocks_a) {
  constexpr int RG = sgmv_grad_rank_group, CH = sgmv_grad_chunk, UN = 4, NT = sgmv_grad_threads;
  constexpr int BC = NT * VW, TP = BC + 4;  // the block's columns; tile row pitch (16-byte aligned)
  __shared__ float Ls[CH][RG];
  __shared__ int rows[CH];
  __shared__ __align__(16) float tile[RG][TP];
  const GradItem it = items[blockIdx.x];
  const int r = table[it.adapter].rank;
  const int j0 = static_cast<int>(blockIdx.z) * RG;
  if (j0 >= r) return;  // the whole block
  const bool is_a = static_cast<int>(blockIdx.y) < col_blocks_a;
  const int cb = is_a ? static_cast<int>(blockIdx.y) : static_cast<int>(blockIdx.y) - col_blocks_a;
  const int cols = is_a ? in : out;
  const T* const R = is_a ? X : dY;
  const long ldr = is_a ? ldx : ldy;
  const float* const U = is_a ? UG : UH;
  const long ss = is_a ? ssg : ssh;
  const int splits = is_a ? splits_g : splits_h;
  const int tid = static_cast<int>(threadIdx.x);
  for (int i = tid; i < it.count * RG; i += NT) {
    const int t = i / RG, g = i % RG;
    float v = 0.f;
    if (j0 + g < r)
      for (int s = 0; s < splits; ++s) v += U[s * ss + static_cast<long>(it.begin + t) * ldu + j0 + g];
    Ls[t][g] = v;
  }
  for (int i = tid; i < it.count; i += NT) rows[i] = order[it.begin + i];
  __syncthreads();
  const int c0 = cb * BC, col = c0 + tid * VW;
  const bool live = col < cols;
  float acc[RG][VW];
#pragma unroll
  for (int g = 0; g < RG; ++g)
#pragma unroll
    for (int i = 0; i < VW; ++i) acc[g][i] = 0.f;
  if (live) {
    int t = 0;
    for (; t + UN <= it.count; t += UN) {
      RawVec<T, VW> x[UN];
#pragma unroll
      for (int u = 0; u < UN; ++u) x[u].ldg(R + static_cast<long>(rows[t + u]) * ldr + col);
#pragma unroll
      for (int u = 0; u < UN; ++u)
#pragma unroll
        for (int g = 0; g < RG; ++g) {
          const float l = Ls[t + u][g];
#pragma unroll
          for (int i = 0; i < VW; ++i) acc[g][i] = fmaf(l, x[u][i], acc[g][i]);
        }
    }
    for (; t < it.count; ++t) {
      RawVec<T, VW> x;
      x.ldg(R + static_cast<long>(rows[t]) * ldr + col);
#pragma unroll
      for (int g = 0; g < RG; ++g) {
        const float l = Ls[t][g];
#pragma unroll
        for (int i = 0; i < VW; ++i) acc[g][i] = fmaf(l, x[i], acc[g][i]);
      }
    }
  }
  float* dst;
  if (it.slot < 0)
    dst = is_a ? dA_base + roff[it.seg] * in : dB_base + roff[it.seg] * out;
  else
    dst = partials + it.slot * slot_stride + (is_a ? 0L : static_cast<long>(r) * in);
  const int L = min(RG, r - j0);  // live ranks of the group
  if (is_a) {
    // Row j of dA: VW consecutive floats per thread (16-byte aligned when VW == 4: in, the
    // offsets and the slot stride are multiples of 4).
    if (!live) return;
#pragma unroll
    for (int g = 0; g < RG; ++g) {
      if (g >= L) break;
      float* d = dst + static_cast<long>(j0 + g) * in + col;
      if constexpr (VW == 4) {
        *reinterpret_cast<float4*>(d) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      } else {
#pragma unroll
        for (int i = 0; i < VW; ++i) d[i] = acc[g][i];
      }
    }
    return;
  }
  // dB: the [BC × L] tile through shared memory, then row c's ranks j0 … j0 + L − 1 (contiguous
  // in dB) written by consecutive threads.
#pragma unroll
  for (int g = 0; g < RG; ++g) {
    if constexpr (VW == 4) {
      *reinterpret_cast<float4*>(&tile[g][tid * 4]) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    } else {
#pragma unroll
      for (int i = 0; i < VW; ++i) tile[g][tid * VW + i] = acc[g][i];
    }
  }
  __syncthreads();
  const int nc = min(BC, cols - c0);
  for (int e = tid; e < nc * L; e += NT) {
    const int cl = e / L, j = e % L;
    dst[static_cast<long>(c0 + cl) * r + j0 + j] = tile[j][cl];
  }
}

/// The segments of several chunks: dA and dB = the sum of their partial slots, in slot order.
/// A slot holds the adapter's [r × in] dA, then its [out × r] dB.
template <class T>
__global__ void __launch_bounds__(256) sgmv_grad_reduce_kernel(const GradReduce* __restrict__ red,
                                                               const DeviceSlotEntry<T>* __restrict__ table,
                                                               const long* __restrict__ roff, int in, int out,
                                                               const float* __restrict__ partials, long slot_stride,
                                                               float* __restrict__ dA_base,
                                                               float* __restrict__ dB_base) {
  const GradReduce rd = red[blockIdx.x];
  const long r = table[rd.adapter].rank, na = r * in, n = na + r * out;
  const float* src = partials + rd.first * slot_stride;
  for (long e = static_cast<long>(blockIdx.y) * 256 + threadIdx.x; e < n; e += static_cast<long>(gridDim.y) * 256) {
    float v = 0.f;
#pragma unroll 8
    for (int s = 0; s < rd.slots; ++s) v += src[s * slot_stride + e];
    if (e < na)
      dA_base[roff[rd.seg] * in + e] = v;
    else
      dB_base[roff[rd.seg] * out + (e - na)] = v;
  }
}

/// A second stream and its events: the shrink runs beside the base GEMM (apply), the
/// shrinks and weight gradients beside the dX GEMM (backward).
struct ForkJoin {
  Stream side;
  cudaEvent_t fork = nullptr, join = nullptr, mid = nullptr;  // mid: the backward's gb is ready
  ForkJoin() {
    LORA_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    LORA_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    LORA_CUDA_CHECK(cudaEventCreateWithFlags(&mid, cudaEventDisableTiming));
  }
  ~ForkJoin() {
    if (fork) cudaEventDestroy(fork);
    if (join) cudaEventDestroy(join);
    if (mid) cudaEventDestroy(mid);
  }
  ForkJoin(const ForkJoin&) = delete;
  ForkJoin& operator=(const ForkJoin&) = delete;
};

}  // namespace detail

/// Tokens grouped by adapter (make_segments on the host) and cut into tiles of
/// ≤ 8 tokens (and, for the per-chunk expand, chunks of ≤ sgmv_chunk_tokens), uploaded once;
/// build it once per batch and reuse it for every layer whose set numbers adapters the same way.
struct DeviceSegments {
  Index tokens = 0;              ///< the T the ids were given for
  Index covered = 0;             ///< tokens with an adapter (ids ≠ −1)
  std::vector<int> adapters;     ///< adapter id of each segment (checked again at apply)
  std::vector<Index> begin;      ///< segment k covers positions [begin[k], begin[k + 1]) of order
  int tiles = 0;
  int chunks = 0;  ///< the same positions in chunks of ≤ sgmv_chunk_tokens (SgmvExpand::per_chunk)
  DeviceBuffer<detail::SegmentTile> tile_buf;  ///< the tiles, then the chunks
  const detail::SegmentTile* chunk_list() const { return tile_buf.data() + tiles; }
  DeviceBuffer<int> order;       ///< token indices grouped by adapter, [covered]
  std::vector<int> host_order;   ///< the same on the host
  /// The backward's work lists in one buffer: the adapter of each segment [adapters.size()],
  /// then grad_items detail::GradItem, then grad_reduces detail::GradReduce (chunks of
  /// ≤ sgmv_grad_chunk positions; grad_slots partial slots for the segments of several chunks).
  DeviceBuffer<int> grad_meta;
  int grad_items = 0, grad_reduces = 0, grad_slots = 0;
  const int* seg_adapter() const { return grad_meta.data(); }
  const detail::GradItem* grad_item_list() const {
    return reinterpret_cast<const detail::GradItem*>(grad_meta.data() + adapters.size());
  }
  const detail::GradReduce* grad_reduce_list() const {
    return reinterpret_cast<const detail::GradReduce*>(grad_item_list() + grad_items);
  }
};

/// How apply() orders its three steps.
/// serial:  shrink, base GEMM, expand on the set's stream;
/// overlap: the shrink runs on a second stream beside the base GEMM (it only
///          reads X), the expand waits for both;
/// delta:   shrink and expand both run beside the base GEMM, the expand writing the
///          adapters' rows into a scratch buffer, and one vectorised pass adds them
///          to Y after the GEMM (the expand leaves the critical path; Y's adapter
///          rows are read and written once more).
enum class SgmvSchedule { serial, overlap, delta };

/// Which expand kernel apply() uses.
/// per_token: one warp per token and 32·8 columns (sgmv_expand_token_kernel): four times the
///            warps, and many more loads in flight when tiles hold few tokens (the default;
///            docs/performance.md compares them);
/// per_tile:  one thread per 8 columns of a whole tile (sgmv_expand_kernel): each Bᵀ row is
///            read once per tile.
/// per_chunk: one warp per token as per_token, the block's 16 warps the positions of a chunk
///            of up to sgmv_chunk_tokens of one segment: L2 sends Bᵀ once per chunk, not per
///            block of 4 tokens (docs/performance.md, the expand at T 4096 counted).
enum class SgmvExpand { per_token, per_tile, per_chunk };

/// Gradients of a mixed batch on the device (W frozen): dA[id] [r × in] and
/// dB[id] [out × r] in float for every adapter the batch used (empty views for the
/// others), dX [T × in] in the storage scalar. dA and dB are windows into one
/// allocation (`storage`), so a batch of many adapters costs one cudaMalloc, not two
/// per adapter; `to_host(g.dA[id])` copies one out.
template <class Scalar>
struct DeviceBatchedGradients {
  DeviceBuffer<float> storage;
  std::vector<DeviceView<float>> dA, dB;
  DeviceMatrix<Scalar> dX;
};

/// Adapters for one base layer [out × in] in device memory, addressed by a
/// stable id like AdapterSet (add / insert / replace / remove leave the others
/// loaded and their ids unchanged). Each adapter owns A [r × in] and Bᵀ
/// [r × out]; a device table of (A, Bᵀ, r, s) per id lets the kernels gather
/// any adapter by index. Ranks and scalings may differ per adapter.
/// Changes are stream-ordered: forwards queued before a replace see the old
/// factors. Not for concurrent use from several host threads.
/// The member functions of AdapterSet<S, cpu> (add, insert, replace, remove, find,
/// segments, apply, forward, from_host, to_host), with device views; apply/forward come in a
/// form that writes a caller's Y and one that returns a new DeviceMatrix.
template <class Scalar>
class AdapterSet<Scalar, cuda> {
  static_assert(is_device_scalar_v<Scalar>, "AdapterSet<S, cuda>: Scalar must be float, bfloat16 or half");

 public:
  using scalar_type = Scalar;
  using view = DeviceView<Scalar>;
  using cview = DeviceView<const Scalar>;
  /// overlap is the default (docs/performance.md compares the schedules).
  SgmvSchedule schedule = SgmvSchedule::overlap;
  /// bf16/half with in % 32 == 0 and 16-byte aligned rows of X: the shrink runs on the tensor
  /// cores (sgmv_shrink_mma_kernel); false forces the CUDA-core kernel (the float path).
  bool tensor_core_shrink = true;
  SgmvExpand expand_kernel = SgmvExpand::per_token;
  /// backward: the shrinks and weight gradients on a second stream beside the dX GEMM (true),
  /// or everything on the set's stream.
  bool backward_overlap = true;
  /// backward with W, on two streams, from this many tokens: gb·A goes into a scratch beside the
  /// dX GEMM (the expand leaves the path after the GEMM) and one pass adds it to dX. Off by
  /// default: the add pass cost more than it hid where measured (docs/performance.md).
  Index backward_delta_tokens = Index(1) << 40;

  AdapterSet(Index in_features, Index out_features, std::shared_ptr<CudaContext> ctx = {})
      : in_(in_features), out_(out_features), ctx_(ctx ? std::move(ctx) : CudaContext::thread_default()) {
    if (in_ < 1 || out_ < 1)
      lora::detail::fail("AdapterSet<cuda>: in_features and out_features must be at least 1, got in = {}, out = {}",
                         in_, out_);
    int dev = 0;
    LORA_CUDA_CHECK(cudaGetDevice(&dev));
    LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
  }

  /// Copies every adapter of a CPU set to the device under the same ids and names.
  template <class S2>
  static AdapterSet from_host(const AdapterSet<S2, cpu>& set, std::shared_ptr<CudaContext> ctx = {}) {
    AdapterSet d(set.in_features(), set.out_features(), std::move(ctx));
    for (int id = 0; id < set.capacity(); ++id)
      if (set.contains(id)) {
        const auto& s = set.at(id);
        d.insert(id, s.name, s.A.template cast<Scalar>(), s.B.template cast<Scalar>(), s.scaling);
      }
    return d;
  }

  /// The CPU set with the same ids, names, factors and scalings (synchronises).
  AdapterSet<Scalar, cpu> to_host() const {
    AdapterSet<Scalar, cpu> h(in_, out_);
    for (int id = 0; id < capacity(); ++id)
      if (contains(id)) {
        const Matrix<Scalar> Bt = lora::to_host(this->Bt(id));
        h.insert(id, name(id), lora::to_host(A(id)), Bt.transpose(), scaling(id));
      }
    return h;
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  CudaContext& context() const { return *ctx_; }
  std::size_t size() const {
    return static_cast<std::size_t>(std::count_if(slots_.begin(), slots_.end(), [](auto& s) { return s != nullptr; }));
  }
  int capacity() const { return static_cast<int>(slots_.size()); }
  bool contains(int id) const { return id >= 0 && id < capacity() && slots_[static_cast<std::size_t>(id)] != nullptr; }
  const std::string& name(int id) const { return slot(id).name; }
  Index rank(int id) const { return slot(id).rank; }
  double scaling(int id) const { return slot(id).scaling; }
  std::optional<int> find(std::string_view name) const {
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i] && slots_[i]->name == name) return static_cast<int>(i);
    return std::nullopt;
  }
  Index max_rank() const {
    Index r = 0;
    for (auto& s : slots_)
      if (s) r = std::max(r, s->rank);
    return r;
  }
  /// A [r × in] of adapter id, on the device.
  cview A(int id) const { return slot(id).A.view(); }
  /// Bᵀ [r × out] of adapter id (B transposed, so that expand reads rows of it).
  cview Bt(int id) const { return slot(id).Bt.view(); }

  /// Adds factors A [r × in], B [out × r] with scaling s (the lowest free id is returned).
  int add(std::string name, const MatrixRef<Scalar>& A, const MatrixRef<Scalar>& B, double scaling) {
    int id = 0;
    while (contains(id)) ++id;
    put(id, std::move(name), A, B, scaling, -1);
    return id;
  }
  /// Adds a CPU LowRankAdapter (its scaling() as it is now).
  template <class S, ScalingPolicy P>
  int add(std::string name, const LowRankAdapter<S, cpu, P>& ad) {
    check_orientation(name, ad.fan_in_fan_out());
    return add(std::move(name), ad.A().template cast<Scalar>(), ad.B().template cast<Scalar>(), ad.scaling());
  }
  /// Adds at a chosen free id (to share one numbering across layers).
  void insert(int id, std::string name, const MatrixRef<Scalar>& A, const MatrixRef<Scalar>& B, double scaling) {
    if (id < 0) lora::detail::fail("AdapterSet<cuda>: cannot insert adapter '{}' at negative id {}", name, id);
    if (contains(id))
      lora::detail::fail("AdapterSet<cuda>: cannot insert adapter '{}' at id {}: '{}' is there", name, id,
                         slots_[static_cast<std::size_t>(id)]->name);
    put(id, std::move(name), A, B, scaling, -1);
  }
  /// Replaces adapter id (rank and scaling may change); the others stay loaded.
  void replace(int id, std::string name, const MatrixRef<Scalar>& A, const MatrixRef<Scalar>& B, double scaling) {
    if (!contains(id)) lora::detail::fail("AdapterSet<cuda>: cannot replace id {}: no such adapter", id);
    put(id, std::move(name), A, B, scaling, id);
  }
  template <class S, ScalingPolicy P>
  void replace(int id, std::string name, const LowRankAdapter<S, cpu, P>& ad) {
    check_orientation(name, ad.fan_in_fan_out());
    replace(id, std::move(name), ad.A().template cast<Scalar>(), ad.B().template cast<Scalar>(), ad.scaling());
  }
  /// Unloads adapter id (work already queued still sees it); the id may be reused.
  void remove(int id) {
    if (!contains(id)) lora::detail::fail("AdapterSet<cuda>: cannot remove id {}: no such adapter", id);
    entries_[static_cast<std::size_t>(id)] = {};
    upload_table();
    slots_[static_cast<std::size_t>(id)].reset();  // cudaFree waits for queued kernels
  }

  /// Groups tokens by adapter (ids[t] = −1: base only) and uploads the grouping.
  DeviceSegments segments(std::span<const int> ids) const {
    const Segments s = detail::make_segments(*this, ids, static_cast<Index>(ids.size()));
    DeviceSegments d;
    d.tokens = static_cast<Index>(ids.size());
    d.covered = static_cast<Index>(s.order.size());
    d.adapters = s.adapter;
    d.begin = s.begin;
    // tiles of ≤ n positions of one segment: tiles (8) and chunks, one after the other in one buffer
    std::vector<detail::SegmentTile> tiles;
    const auto cut = [&](Index n) {
      for (std::size_t k = 0; k < s.adapter.size(); ++k)
        for (Index b = s.begin[k]; b < s.begin[k + 1]; b += n)
          tiles.push_back(
              {s.adapter[k], static_cast<int>(b), static_cast<int>(std::min<Index>(n, s.begin[k + 1] - b))});
    };
    cut(detail::sgmv_tile_tokens);
    d.tiles = static_cast<int>(tiles.size());
    cut(detail::sgmv_chunk_tokens);
    d.chunks = static_cast<int>(tiles.size()) - d.tiles;
    std::vector<int> order(s.order.begin(), s.order.end());
    d.host_order = order;
    d.tile_buf = DeviceBuffer<detail::SegmentTile>(tiles.size());
    d.order = DeviceBuffer<int>(order.size());
    // The backward's lists: segment adapters, chunks, and the segments of several chunks.
    std::vector<detail::GradItem> items;
    std::vector<detail::GradReduce> reduces;
    for (std::size_t k = 0; k < s.adapter.size(); ++k) {
      const Index b0 = s.begin[k], n = s.begin[k + 1] - b0;
      const int chunks = static_cast<int>((n + detail::sgmv_grad_chunk - 1) / detail::sgmv_grad_chunk);
      if (chunks > 1) reduces.push_back({s.adapter[k], static_cast<int>(k), d.grad_slots, chunks});
      for (int c = 0; c < chunks; ++c) {
        const Index b = b0 + static_cast<Index>(c) * detail::sgmv_grad_chunk;
        items.push_back({s.adapter[k], static_cast<int>(k), static_cast<int>(b),
                         static_cast<int>(std::min<Index>(detail::sgmv_grad_chunk, b0 + n - b)),
                         chunks > 1 ? d.grad_slots++ : -1});
      }
    }
    d.grad_items = static_cast<int>(items.size());
    d.grad_reduces = static_cast<int>(reduces.size());
    static_assert(sizeof(detail::GradItem) == 5 * sizeof(int) && sizeof(detail::GradReduce) == 4 * sizeof(int));
    std::vector<int> meta(s.adapter.begin(), s.adapter.end());
    const auto append = [&meta](const auto& v) {
      const int* p = reinterpret_cast<const int*>(v.data());
      meta.insert(meta.end(), p, p + v.size() * sizeof(v[0]) / sizeof(int));
    };
    append(items);
    append(reduces);
    d.grad_meta = DeviceBuffer<int>(meta.size());
    if (!tiles.empty()) {
      LORA_CUDA_CHECK(cudaMemcpyAsync(d.tile_buf.data(), tiles.data(), tiles.size() * sizeof(tiles[0]),
                                      cudaMemcpyHostToDevice, ctx_->stream()));
      LORA_CUDA_CHECK(cudaMemcpyAsync(d.order.data(), order.data(), order.size() * sizeof(int),
                                      cudaMemcpyHostToDevice, ctx_->stream()));
      LORA_CUDA_CHECK(cudaMemcpyAsync(d.grad_meta.data(), meta.data(), meta.size() * sizeof(int),
                                      cudaMemcpyHostToDevice, ctx_->stream()));
      ctx_->synchronize();  // the host vectors die here
    }
    return d;
  }

  /// The mixed-adapter layer: Y = X·Wᵀ (one cuBLAS GEMM for all T tokens) and,
  /// per token t with adapter i = ids[t] ≠ −1, Y[t] += s_i·(X[t]·A_iᵀ)·B_iᵀ
  /// (shrink and expand kernels, float accumulation, Y updated in place).
  void apply(cview W, cview X, const DeviceSegments& seg, view Y) const {
    lora::detail::require(W.rows == out_ && W.cols == in_, "AdapterSet<cuda>: ", "base weight W", W.rows, W.cols,
                          out_, in_);
    apply_over(
        [&](view y) {
          lora::detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, true, X.rows, out_, in_, 1.f, X, W, 0.f, y);
        },
        X, seg, Y);
  }
  /// The same over an NF4 base (QLoRA serving): Y = X·dequant(Wq)ᵀ + the adapters' terms. For
  /// 1…16 bf16/half tokens where the NF4 copy-ring kernel applies (blocksize 64, in % 256 == 0,
  /// in ≤ 4096, out % 8 == 0) and the batch's adapters come to at most min(16, in / 256) pieces of
  /// 16 ranks: one pass over Wq (detail::nf4_gemm_lora: each piece's s·X·Aᵀ for its tokens,
  /// rounded to S, by every block of the NF4 kernel for a single piece and by a small kernel
  /// before it for more, then the NF4 kernel adds the pieces' products with Bᵀ in its epilogue,
  /// Y rounded once; `schedule` does not apply). Otherwise the base product by
  /// quant::nf4_matmul (the fused NF4 kernels for 1…16 tokens, dequantise + cuBLAS above) in the
  /// base GEMM's place, then the adapters' paths. Wq [out × in] must be on the set's CUDA context.
  template <class Q>
    requires std::same_as<Q, quant::Nf4Tensor<cuda>>
  void apply(const Q& Wq, cview X, const DeviceSegments& seg, view Y) const {
    if (Wq.shape().size() != 2)
      lora::detail::fail("AdapterSet<cuda>: NF4 base weight must be 2-D [out x in], got {} dimensions",
                         Wq.shape().size());
    lora::detail::require(Wq.rows() == out_ && Wq.cols() == in_, "AdapterSet<cuda>: ", "NF4 base weight", Wq.rows(),
                          Wq.cols(), out_, in_);
    if (&Wq.context() != ctx_.get())
      lora::detail::fail("AdapterSet<cuda>: the NF4 base weight and the adapter set are on different CUDA contexts");
    if (nf4_fused(Wq, X, seg, Y)) return;
    apply_over([&](view y) { quant::nf4_matmul<Scalar>(Wq, X, y); }, X, seg, Y);
  }
  /// The same over any base product: base(Y) writes Y = X·Wᵀ for all T tokens on the set's
  /// stream (a caller's own weight format); the shrink may run beside it on a second stream
  /// (SgmvSchedule), the expand after it.
  template <class BaseProduct>
    requires std::invocable<BaseProduct&, view>
  void apply_over(BaseProduct&& base, cview X, const DeviceSegments& seg, view Y) const {
    check_batch(X, seg, Y);
    const bool delta = schedule == SgmvSchedule::delta && seg.tiles > 0;
    const bool overlap = (schedule == SgmvSchedule::overlap || delta) && seg.tiles > 0;
    if (overlap) {
      if (!fork_) fork_ = std::make_unique<detail::ForkJoin>();
      LORA_CUDA_CHECK(cudaEventRecord(fork_->fork, ctx_->stream()));
      LORA_CUDA_CHECK(cudaStreamWaitEvent(fork_->side.get(), fork_->fork, 0));
    }
    const Plan p = plan(X, seg);
    const cudaStream_t side = overlap ? fork_->side.get() : ctx_->stream();
    if (seg.tiles > 0) shrink(X, seg, p, side);
    view D;
    if (delta) {
      const std::size_t need = static_cast<std::size_t>(seg.covered) * static_cast<std::size_t>(out_);
      if (delta_.size() < need) {
        ctx_->synchronize();  // earlier calls may still use the old buffer
        LORA_CUDA_CHECK(cudaStreamSynchronize(side));
        delta_ = DeviceBuffer<Scalar>(need);
      }
      D = view{delta_.data(), seg.covered, out_, out_};
      expand(seg, p, Y, side, D);
    }
    base(Y);
    if (overlap) {
      LORA_CUDA_CHECK(cudaEventRecord(fork_->join, fork_->side.get()));
      LORA_CUDA_CHECK(cudaStreamWaitEvent(ctx_->stream(), fork_->join, 0));
    }
    if (delta)
      add_rows(D, seg, Y);
    else if (seg.tiles > 0)
      expand(seg, p, Y, ctx_->stream());
  }
  DeviceMatrix<Scalar> apply(cview W, cview X, std::span<const int> ids) const {
    check_ids(X, ids);
    DeviceMatrix<Scalar> Y(X.rows, out_);
    apply(W, X, segments(ids), Y.view());
    return Y;
  }

  /// Float elements of the gradient storage of a backward over seg: dA [r × in] and dB
  /// [out × r] of every adapter the batch uses (ranks rounded up to 4: 16-byte aligned pieces).
  std::size_t gradient_elements(const DeviceSegments& seg) const {
    Index R = 0;
    for (int id : seg.adapters) R += (rank(id) + 3) / 4 * 4;
    return static_cast<std::size_t>(R) * static_cast<std::size_t>(in_ + out_);
  }

  /// Backward of apply (W frozen; W = nullptr for the adapter paths alone). For token t of
  /// adapter i (s_i, A_i, B_i):
  ///   h_t = s_i·x_t·A_iᵀ,  gb_t = s_i·dy_t·B_i,  dB_i = Σ_t dy_tᵀ·h_t,  dA_i = Σ_t gb_tᵀ·x_t,
  ///   dX = dY·W (one GEMM) + gb_t·A_i per token.
  /// h and gb come from the forward's shrink kernel (X with A, dY with Bᵀ), gb·A from its expand
  /// kernel (A in Bᵀ's place), dA and dB from one segmented kernel over chunks of ≤ 128 tokens
  /// of one adapter (and an ordered reduction for longer segments): float throughout (h and gb
  /// are not rounded to Scalar), and a fixed number of launches whatever the number of adapters.
  /// The shrinks and the weight gradients run on a second stream beside the dX GEMM.
  /// Into g: g.storage (gradient_elements(seg) floats) and g.dX are reused when large enough,
  /// so a training loop that keeps g allocates nothing after its first step; the set's scratch
  /// grows as needed (stream-ordered: no synchronisation once it is large enough).
  void backward(const cview* W, cview X, const DeviceSegments& seg, cview dY, DeviceBatchedGradients<Scalar>& g) const {
    if (W)
      lora::detail::require(W->rows == out_ && W->cols == in_, "AdapterSet<cuda>: ", "base weight W", W->rows,
                            W->cols, out_, in_);
    lora::detail::require(dY.rows == X.rows && dY.cols == out_, "AdapterSet<cuda>: ", "dY", dY.rows, dY.cols, X.rows,
                          out_);
    check_batch(X, seg, dY);
    const Index tokens = X.rows, P = seg.covered;
    if (g.dX.rows() != tokens || g.dX.cols() != in_) g.dX = DeviceMatrix<Scalar>(tokens, in_);
    g.dA.assign(static_cast<std::size_t>(capacity()), {});
    g.dB.assign(static_cast<std::size_t>(capacity()), {});
    // dA of every used adapter in segment order, then dB likewise; grad_offsets_kernel computes
    // the same offsets on the device from the table's ranks (the ones the host reads here).
    const std::size_t need = gradient_elements(seg);
    if (g.storage.size() < need) g.storage = DeviceBuffer<float>(need);
    const Index R = static_cast<Index>(need / static_cast<std::size_t>(in_ + out_));
    float* const dA_base = g.storage.data();
    float* const dB_base = dA_base + R * in_;
    {
      Index off = 0;
      for (int id : seg.adapters) {
        const Index r = rank(id);
        g.dA[static_cast<std::size_t>(id)] = DeviceView<float>{dA_base + off * in_, r, in_, in_};
        g.dB[static_cast<std::size_t>(id)] = DeviceView<float>{dB_base + off * out_, out_, r, r};
        off += (r + 3) / 4 * 4;
      }
    }
    const cudaStream_t main = ctx_->stream();
    if (P == 0) {
      if (W)
        lora::detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, false, tokens, in_, out_, 1.f, dY, *W, 0.f,
                                                   g.dX.view());
      else if (g.dX.size() > 0)
        LORA_CUDA_CHECK(cudaMemsetAsync(g.dX.data(), 0, g.dX.size() * sizeof(Scalar), main));
      return;
    }
    // Scratch: segment offsets (long), h's and gb's K-split partial sums, partial slots.
    const Plan ph = plan(X, seg, in_, false), pg = plan(dY, seg, out_, false);
    const Index rmax = max_rank();
    const long slot_stride = static_cast<long>((rmax * (in_ + out_) + 3) / 4 * 4);
    auto round64 = [](std::size_t n) { return (n + 63) / 64 * 64; };
    const std::size_t n_off = round64(2 * (seg.adapters.size() + 1)), n_h = round64(ph.u_size()),
                      n_g = round64(pg.u_size()),
                      n_p = static_cast<std::size_t>(seg.grad_slots) * static_cast<std::size_t>(slot_stride);
    if (bwd_scratch_.size() < n_off + n_h + n_g + n_p) {
      ctx_->synchronize();  // earlier backward calls may still use the old scratch (their side
                            // stream's work was joined into this stream)
      bwd_scratch_ = DeviceBuffer<float>(n_off + n_h + n_g + n_p);
    }
    long* const roff = reinterpret_cast<long*>(bwd_scratch_.data());
    float* const UH = bwd_scratch_.data() + n_off;
    float* const UG = UH + n_h;
    float* const partials = UG + n_g;

    if (!fork_) fork_ = std::make_unique<detail::ForkJoin>();
    const bool two = backward_overlap;
    const cudaStream_t side = two ? fork_->side.get() : main;
    if (two) {
      LORA_CUDA_CHECK(cudaEventRecord(fork_->fork, main));
      LORA_CUDA_CHECK(cudaStreamWaitEvent(side, fork_->fork, 0));
    }
    // Side stream: gb (then handed to the main stream's expand), h, the segment offsets, dA
    // and dB.
    shrink(dY, seg, pg, side, true, UG);
    const bool delta = two && W && tokens >= backward_delta_tokens;
    view D;
    if (delta) {
      const std::size_t nd = static_cast<std::size_t>(P) * static_cast<std::size_t>(in_);
      if (delta_.size() < nd) {
        ctx_->synchronize();  // earlier calls may still use the old buffer
        LORA_CUDA_CHECK(cudaStreamSynchronize(side));
        delta_ = DeviceBuffer<Scalar>(nd);
      }
      D = view{delta_.data(), P, in_, in_};
      expand(seg, pg, view{g.dX.data(), tokens, in_, in_}, side, D, true, UG);  // D's rows = gb·A
    } else if (two) {
      LORA_CUDA_CHECK(cudaEventRecord(fork_->mid, side));
    }
    shrink(X, seg, ph, side, false, UH);
    detail::grad_offsets_kernel<T><<<1, 256, 0, side>>>(seg.seg_adapter(), static_cast<int>(seg.adapters.size()),
                                                         table_.data(), roff);
    LORA_CUDA_CHECK_LAUNCH("grad_offsets_kernel");
    {
      const bool vec = in_ % V == 0 && out_ % V == 0 && X.ld % V == 0 && dY.ld % V == 0 &&
                       lora::detail::aligned(X.data, 16) && lora::detail::aligned(dY.data, 16);
      const int vw = vec ? 4 : 1;
      const unsigned cba = lora::detail::ceil_div(in_, detail::sgmv_grad_threads * vw),
                     cbb = lora::detail::ceil_div(out_, detail::sgmv_grad_threads * vw);
      const dim3 grid(static_cast<unsigned>(seg.grad_items), cba + cbb,
                      lora::detail::ceil_div(rmax, detail::sgmv_grad_rank_group));
      auto go = [&](auto kernel) {
        kernel<<<grid, detail::sgmv_grad_threads, 0, side>>>(
            reinterpret_cast<const T*>(X.data), X.ld, reinterpret_cast<const T*>(dY.data), dY.ld,
            static_cast<int>(in_), static_cast<int>(out_), UG, pg.split_stride, pg.splits, UH, ph.split_stride,
            ph.splits, ph.ldu, seg.grad_item_list(), seg.order.data(), table_.data(), roff, dA_base, dB_base,
            partials, slot_stride, static_cast<int>(cba));
      };
      if (vec)
        go(detail::sgmv_grad_kernel<T, 4>);
      else
        go(detail::sgmv_grad_kernel<T, 1>);
      LORA_CUDA_CHECK_LAUNCH("sgmv_grad_kernel");
      if (seg.grad_reduces > 0) {
        const unsigned blocks = static_cast<unsigned>(
            std::min<Index>(lora::detail::ceil_div(rmax * (in_ + out_), 256), 65535));
        detail::sgmv_grad_reduce_kernel<T><<<dim3(static_cast<unsigned>(seg.grad_reduces), blocks), 256, 0, side>>>(
            seg.grad_reduce_list(), table_.data(), roff, static_cast<int>(in_), static_cast<int>(out_), partials,
            slot_stride, dA_base, dB_base);
        LORA_CUDA_CHECK_LAUNCH("sgmv_grad_reduce_kernel");
      }
    }
    if (two) LORA_CUDA_CHECK(cudaEventRecord(fork_->join, side));
    // Main stream: dX = dY·W, then dX += gb·A per token (the expand kernel with A for Bᵀ).
    if (W)
      lora::detail::gemm<Scalar, Scalar, Scalar>(*ctx_, false, false, tokens, in_, out_, 1.f, dY, *W, 0.f,
                                                 g.dX.view());
    else if (g.dX.size() > 0)
      LORA_CUDA_CHECK(cudaMemsetAsync(g.dX.data(), 0, g.dX.size() * sizeof(Scalar), main));
    if (delta) {
      LORA_CUDA_CHECK(cudaStreamWaitEvent(main, fork_->join, 0));
      add_rows(D, seg, g.dX.view());
      return;
    }
    if (two) LORA_CUDA_CHECK(cudaStreamWaitEvent(main, fork_->mid, 0));
    expand(seg, pg, g.dX.view(), main, {}, true, UG);
    if (two) LORA_CUDA_CHECK(cudaStreamWaitEvent(main, fork_->join, 0));
  }
  DeviceBatchedGradients<Scalar> backward(const cview* W, cview X, const DeviceSegments& seg, cview dY) const {
    DeviceBatchedGradients<Scalar> g;
    backward(W, X, seg, dY, g);
    return g;
  }

  /// Adapter paths only, added in place: Y[t] += s_i·(X[t]·A_iᵀ)·B_iᵀ.
  void add_forward(cview X, const DeviceSegments& seg, view Y) const {
    check_batch(X, seg, Y);
    if (seg.tiles == 0) return;
    const Plan p = plan(X, seg);
    shrink(X, seg, p, ctx_->stream());
    expand(seg, p, Y, ctx_->stream());
  }
  /// Adapter paths only: s_i·(X[t]·A_iᵀ)·B_iᵀ per token (zero rows where ids[t] = −1).
  DeviceMatrix<Scalar> forward(cview X, std::span<const int> ids) const {
    check_ids(X, ids);
    DeviceMatrix<Scalar> Y(X.rows, out_);
    if (Y.size() > 0)
      LORA_CUDA_CHECK(cudaMemsetAsync(Y.data(), 0, Y.size() * sizeof(Scalar), ctx_->stream()));
    add_forward(X, segments(ids), Y.view());
    return Y;
  }

 private:
  using T = lora::detail::device_t<Scalar>;
  static constexpr int V = 16 / static_cast<int>(sizeof(Scalar));

  struct Slot {
    std::string name;
    DeviceMatrix<Scalar> A, Bt;
    Index rank = 0;
    double scaling = 1.0;
  };
  /// Launch shape of one batch: vector widths, K-splits, U's layout.
  struct Plan {
    bool vec_x = false, vec_y = false, mma = false;
    int splits = 1, chunks_per_split = 0, ldu = 0, K = 0;
    long split_stride = 0;
    std::size_t u_size() const { return static_cast<std::size_t>(splits) * static_cast<std::size_t>(split_stride); }
  };

  const Slot& slot(int id) const {
    if (!contains(id)) lora::detail::fail("AdapterSet<cuda>: no adapter with id {} (loaded: {})", id, size());
    return *slots_[static_cast<std::size_t>(id)];
  }
  static void check_orientation(const std::string& name, bool fan_in_fan_out) {
    detail::check_set_orientation("AdapterSet<cuda>", name, fan_in_fan_out);
  }

  void put(int id, std::string name, const MatrixRef<Scalar>& A, const MatrixRef<Scalar>& B, double scaling,
           int replacing) {
    detail::check_set_adapter("AdapterSet<cuda>", name, slots_, replacing, A.rows(), A.cols(), B.rows(), B.cols(),
                              scaling, in_, out_, std::min<Index>(std::min(in_, out_), detail::sgmv_max_rank));

    auto s = std::make_unique<Slot>();
    s->name = std::move(name);
    s->rank = A.rows();
    s->scaling = scaling;
    s->A = DeviceMatrix<Scalar>(A.rows(), in_);
    s->Bt = DeviceMatrix<Scalar>(A.rows(), out_);
    const Matrix<Scalar> a = A, bt = B.transpose();  // contiguous host copies
    LORA_CUDA_CHECK(cudaMemcpyAsync(s->A.data(), a.data(), a.size() * sizeof(Scalar), cudaMemcpyHostToDevice,
                                    ctx_->stream()));
    LORA_CUDA_CHECK(cudaMemcpyAsync(s->Bt.data(), bt.data(), bt.size() * sizeof(Scalar), cudaMemcpyHostToDevice,
                                    ctx_->stream()));
    if (id >= capacity()) {
      slots_.resize(static_cast<std::size_t>(id) + 1);
      entries_.resize(static_cast<std::size_t>(id) + 1);
    }
    entries_[static_cast<std::size_t>(id)] = {reinterpret_cast<const T*>(s->A.data()),
                                              reinterpret_cast<const T*>(s->Bt.data()), static_cast<int>(s->rank),
                                              static_cast<float>(scaling)};
    upload_table();  // synchronises: a, bt and the old slot may go
    slots_[static_cast<std::size_t>(id)] = std::move(s);
  }

  /// The host mirror of the table to the device (stream-ordered), growing it as ids grow.
  void upload_table() {
    if (table_.size() < entries_.size()) {
      ctx_->synchronize();
      table_ = DeviceBuffer<detail::DeviceSlotEntry<T>>(std::max<std::size_t>(entries_.size(), 2 * table_.size()));
    }
    if (!entries_.empty())
      LORA_CUDA_CHECK(cudaMemcpyAsync(table_.data(), entries_.data(), entries_.size() * sizeof(entries_[0]),
                                      cudaMemcpyHostToDevice, ctx_->stream()));
    ctx_->synchronize();
  }

  static void check_ids(cview X, std::span<const int> ids) {
    if (static_cast<Index>(ids.size()) != X.rows)
      lora::detail::fail("AdapterSet<cuda>: {} adapter ids given for {} tokens; expected one id per token", ids.size(),
                         X.rows);
  }
  /// apply over an NF4 base in one pass (see there); false (nothing launched) where it does not apply.
  bool nf4_fused(const quant::Nf4Tensor<cuda>& Wq, cview X, const DeviceSegments& seg, view Y) const {
    if constexpr (std::is_same_v<Scalar, float>) {
      return false;
    } else {
      using D = lora::detail::device_t<Scalar>;
      if (X.rows < 1 || X.rows > 16 || seg.tiles == 0) return false;
      check_batch(X, seg, Y);
      lora::detail::Nf4RingLora<D> l;
      l.bt = true;
      for (std::size_t k = 0; k < seg.adapters.size(); ++k) {
        const int id = seg.adapters[k];
        std::uint32_t mask = 0;
        for (Index p = seg.begin[k]; p < seg.begin[k + 1]; ++p)
          mask |= 1u << seg.host_order[static_cast<std::size_t>(p)];
        const Index r = rank(id);
        const cview a = A(id), bt = Bt(id);
        for (Index p0 = 0; p0 < r; p0 += 16) {
          if (l.jobs == lora::detail::nf4_lora_max_jobs) return false;
          l.job[l.jobs++] = {reinterpret_cast<const D*>(a.data) + p0 * a.ld, a.ld,
                             reinterpret_cast<const D*>(bt.data) + p0 * bt.ld, bt.ld,
                             static_cast<int>(std::min<Index>(16, r - p0)), static_cast<float>(scaling(id)), mask};
        }
      }
      const std::size_t n = static_cast<std::size_t>(l.jobs) * 256;
      if (xa_.size() < n) xa_ = DeviceBuffer<Scalar>(static_cast<std::size_t>(lora::detail::nf4_lora_max_jobs) * 256);
      l.xa = reinterpret_cast<D*>(xa_.data());
      return lora::detail::nf4_gemm_lora<Scalar>(Wq.parts(), X, Y, l, *ctx_);
    }
  }

  void check_batch(cview X, const DeviceSegments& seg, cview Y) const {
    if (X.cols != in_)
      lora::detail::fail("AdapterSet<cuda>: input X has {} columns, expected {}", X.cols, in_);
    lora::detail::require(Y.rows == X.rows && Y.cols == out_, "AdapterSet<cuda>: ", "output Y", Y.rows, Y.cols,
                          X.rows, out_);
    if (seg.tokens != X.rows)
      lora::detail::fail("AdapterSet<cuda>: segments were built for {} tokens, X has {} rows", seg.tokens, X.rows);
    for (int id : seg.adapters)
      if (!contains(id))
        lora::detail::fail("AdapterSet<cuda>: segments use adapter id {}, which is no longer loaded", id);
  }

  /// The shrink's launch shape over X [· × K] (K = in for s·X·Aᵀ, out for the backward's
  /// s·dY·B); with alloc, U_ grows to hold its partial sums.
  Plan plan(cview X, const DeviceSegments& seg, Index K = 0, bool alloc = true) const {
    if (K == 0) K = in_;
    Plan p;
    p.K = static_cast<int>(K);
    p.vec_x = K % V == 0 && X.ld % V == 0 && lora::detail::aligned(X.data, 16);
    p.mma = !std::is_same_v<Scalar, float> && tensor_core_shrink && p.vec_x && K % 32 == 0;
    const int ldu = static_cast<int>(max_rank());
    int chunks = 0, max_splits = 1, want = 1;
    if (p.mma) {
      // Tensor-core shrink: 32-wide chunks; about four blocks of four warps per SM (≈ 70
      // registers), each warp with at least two chunks.
      chunks = static_cast<int>(K / 32);
      const int groups = (ldu + 15) / 16;
      want = (4 * sms_) / std::max(seg.tiles * groups, 1);
      max_splits = chunks / (2 * detail::sgmv_mma_warps);
    } else {
      // CUDA-core shrink: K-splits up to one wave of blocks (3 per SM fit at ~166 registers):
      // each block is a short chain of dependent loads and one reduction, so a second wave
      // costs a whole chain. Every split keeps at least half a chunk per thread.
      chunks = static_cast<int>(p.vec_x ? K / V : K);
      const int groups = (ldu + detail::sgmv_rank_group - 1) / detail::sgmv_rank_group;
      want = (3 * sms_) / std::max(seg.tiles * groups, 1);
      max_splits = std::min(2 * chunks / detail::sgmv_threads, 8);
    }
    p.splits = std::clamp(std::min(want, max_splits), 1, detail::sgmv_max_split);
    p.chunks_per_split = (chunks + p.splits - 1) / p.splits;
    p.splits = (chunks + p.chunks_per_split - 1) / p.chunks_per_split;
    p.ldu = ldu;
    p.split_stride = static_cast<long>(seg.covered) * p.ldu;
    if (alloc && U_.size() < p.u_size()) U_ = DeviceBuffer<float>(p.u_size());
    return p;
  }

  /// U = s·X·Aᵀ per position (K-split partial sums), or with bt s·X·B (X = dY, K = out).
  void shrink(cview X, const DeviceSegments& seg, const Plan& p, cudaStream_t stream, bool bt = false,
              float* U = nullptr) const {
    if (bt) {
      shrink_as<true>(X, seg, p, stream, U ? U : U_.data());
    } else {
      shrink_as<false>(X, seg, p, stream, U ? U : U_.data());
    }
  }
  template <bool BT>
  void shrink_as(cview X, const DeviceSegments& seg, const Plan& p, cudaStream_t stream, float* U) const {
    const T* x = reinterpret_cast<const T*>(X.data);
    if constexpr (!std::is_same_v<Scalar, float>) {
      if (p.mma) {
        const dim3 grid(static_cast<unsigned>(seg.tiles), static_cast<unsigned>(p.splits),
                        lora::detail::ceil_div(p.ldu, 16));
        detail::sgmv_shrink_mma_kernel<T, BT><<<grid, detail::sgmv_mma_warps * 32, 0, stream>>>(
            x, X.ld, p.K, seg.tile_buf.data(), seg.order.data(), table_.data(), U, p.ldu, p.split_stride,
            p.chunks_per_split);
        LORA_CUDA_CHECK_LAUNCH("sgmv_shrink_mma_kernel");
        return;
      }
    }
    constexpr int TT = detail::sgmv_tile_tokens, RG = detail::sgmv_rank_group;
    const dim3 grid(static_cast<unsigned>(seg.tiles), static_cast<unsigned>(p.splits),
                    lora::detail::ceil_div(p.ldu, RG));
    if (p.vec_x)
      detail::sgmv_shrink_kernel<T, V, TT, RG, BT><<<grid, detail::sgmv_threads, 0, stream>>>(
          x, X.ld, p.K, seg.tile_buf.data(), seg.order.data(), table_.data(), U, p.ldu, p.split_stride,
          p.chunks_per_split);
    else
      detail::sgmv_shrink_kernel<T, 1, TT, RG, BT><<<grid, detail::sgmv_threads, 0, stream>>>(
          x, X.ld, p.K, seg.tile_buf.data(), seg.order.data(), table_.data(), U, p.ldu, p.split_stride,
          p.chunks_per_split);
    LORA_CUDA_CHECK_LAUNCH("sgmv_shrink_kernel");
  }

  /// Whether the expand takes 16-byte vectors of Y (and D).
  bool expand_vec(view Y, view D) const {
    return Y.cols % V == 0 && Y.ld % V == 0 && lora::detail::aligned(Y.data, 16) &&
           (!D.data || (D.ld % V == 0 && lora::detail::aligned(D.data, 16)));
  }
  /// Y's rows += the adapters' products U·Bᵀ, or with D (delta schedule) D's rows = them;
  /// with at, U·A instead (the backward's dX, Y = dX with in columns).
  void expand(const DeviceSegments& seg, const Plan& p, view Y, cudaStream_t stream, view D = {}, bool at = false,
              const float* U = nullptr) const {
    if (at)
      expand_as<true>(seg, p, Y, stream, D, U ? U : U_.data());
    else
      expand_as<false>(seg, p, Y, stream, D, U ? U : U_.data());
  }
  template <bool AT>
  void expand_as(const DeviceSegments& seg, const Plan& p, view Y, cudaStream_t stream, view D,
                 const float* U) const {
    constexpr int TT = detail::sgmv_tile_tokens, RG = detail::sgmv_expand_rank_group;
    const bool vec = expand_vec(Y, D);
    const int vw = vec ? V : 1;
    const Index cols = Y.cols;
    T* y = reinterpret_cast<T*>(Y.data);
    T* d = reinterpret_cast<T*>(D.data);
    // one warp per token: WB warps per block over `list` (tiles, z blocks of 4 warps each; or chunks)
    const auto per_token = [&](auto wb, const detail::SegmentTile* list, int n, unsigned z) {
      constexpr int WB = decltype(wb)::value;
      const dim3 grid(static_cast<unsigned>(n), lora::detail::ceil_div(cols, 32 * vw), z);
      if (vec)
        detail::sgmv_expand_token_kernel<T, V, AT, WB><<<grid, WB * 32, 0, stream>>>(
            U, p.ldu, p.split_stride, p.splits, list, seg.order.data(), table_.data(), y, Y.ld,
            static_cast<int>(cols), d, D.ld);
      else
        detail::sgmv_expand_token_kernel<T, 1, AT, WB><<<grid, WB * 32, 0, stream>>>(
            U, p.ldu, p.split_stride, p.splits, list, seg.order.data(), table_.data(), y, Y.ld,
            static_cast<int>(cols), d, D.ld);
      LORA_CUDA_CHECK_LAUNCH("sgmv_expand_token_kernel");
    };
    if (expand_kernel == SgmvExpand::per_chunk)
      return per_token(std::integral_constant<int, detail::sgmv_chunk_tokens>{}, seg.chunk_list(), seg.chunks, 1u);
    if (expand_kernel == SgmvExpand::per_token)
      return per_token(std::integral_constant<int, 4>{}, seg.tile_buf.data(), seg.tiles, static_cast<unsigned>(TT / 4));
    const dim3 grid(static_cast<unsigned>(seg.tiles), lora::detail::ceil_div(cols, detail::sgmv_threads * vw));
    const std::size_t rp = (static_cast<std::size_t>(p.ldu) + RG - 1) / RG * RG;
    const std::size_t smem = static_cast<std::size_t>(TT) * rp * sizeof(float);
    if (vec)
      detail::sgmv_expand_kernel<T, V, TT, RG, AT><<<grid, detail::sgmv_threads, smem, stream>>>(
          U, p.ldu, p.split_stride, p.splits, seg.tile_buf.data(), seg.order.data(), table_.data(), y, Y.ld,
          static_cast<int>(cols), d, D.ld);
    else
      detail::sgmv_expand_kernel<T, 1, TT, RG, AT><<<grid, detail::sgmv_threads, smem, stream>>>(
          U, p.ldu, p.split_stride, p.splits, seg.tile_buf.data(), seg.order.data(), table_.data(), y, Y.ld,
          static_cast<int>(cols), d, D.ld);
    LORA_CUDA_CHECK_LAUNCH("sgmv_expand_kernel");
  }

  /// Y[order[p]] += D[p] for the covered positions p (the delta schedule's last step, and
  /// the backward's dX); D and Y have the same columns.
  void add_rows(view D, const DeviceSegments& seg, view Y) const {
    const Index cols = Y.cols;
    const bool vec = cols % V == 0 && Y.ld % V == 0 && D.ld % V == 0 && lora::detail::aligned(Y.data, 16) &&
                     lora::detail::aligned(D.data, 16);
    const int vw = vec ? V : 1;
    const dim3 grid(static_cast<unsigned>(seg.covered), lora::detail::ceil_div(cols, detail::sgmv_threads * vw));
    if (vec)
      detail::add_rows_kernel<T, V><<<grid, detail::sgmv_threads, 0, ctx_->stream()>>>(
          reinterpret_cast<const T*>(D.data), D.ld, seg.order.data(), static_cast<int>(cols),
          reinterpret_cast<T*>(Y.data), Y.ld);
    else
      detail::add_rows_kernel<T, 1><<<grid, detail::sgmv_threads, 0, ctx_->stream()>>>(
          reinterpret_cast<const T*>(D.data), D.ld, seg.order.data(), static_cast<int>(cols),
          reinterpret_cast<T*>(Y.data), Y.ld);
    LORA_CUDA_CHECK_LAUNCH("add_rows_kernel");
  }

  Index in_, out_;
  std::shared_ptr<CudaContext> ctx_;
  int sms_ = 1;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<detail::DeviceSlotEntry<T>> entries_;  // host mirror of table_
  DeviceBuffer<detail::DeviceSlotEntry<T>> table_;
  mutable DeviceBuffer<float> U_;  // [splits × covered × max_rank] partial sums of s·X·Aᵀ
  mutable DeviceBuffer<Scalar> xa_;  // the one-pass NF4 apply's s·X·Aᵀ pieces [16 × 16 tokens × 16 ranks]
  mutable std::unique_ptr<detail::ForkJoin> fork_;
  mutable DeviceBuffer<float> bwd_scratch_;   // backward's segment offsets, h and gb partial sums, slots
  mutable DeviceBuffer<Scalar> delta_;  // the delta schedules' adapter rows [covered × out] (backward: × in)
};

}  // namespace lora::multi
