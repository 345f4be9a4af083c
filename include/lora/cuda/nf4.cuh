#pragma once
// NF4 (QLoRA's 4-bit NormalFloat) on the GPU with bitsandbytes' arithmetic:
// one float absmax per block of `blocksize` consecutive elements of the
// flattened tensor (last block may be partial), x·(1/absmax) in float mapped
// through the threshold tree (comparisons with `>`), two codes per byte with the
// first element in the high nibble. Codes are bit-identical to the CPU path
// (lora/quant/nf4.hpp) and to bitsandbytes. quant::Nf4Tensor<cuda> holds the codes, the
// scales and (with double quantisation) their 8-bit state on the device, with the member
// functions of Nf4Tensor<cpu>; quant::nf4_matmul is the fused NF4 GEMV/GEMM for 1..16
// tokens (QLoRA decode), dequantise + cuBLAS above.

#include <lora/cuda/kernels.cuh>
#include <lora/cuda/runtime.hpp>
#include <lora/quant/double_quant.hpp>
#include <lora/quant/nf4.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace lora {

namespace detail {

/// The device parts of an NF4 tensor as the kernels take them (rows × cols, row-major
/// flattening): ceil(n / 2) packed bytes and ceil(n / blocksize) float scales.
struct Nf4Parts {
  const std::uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  Index rows = 0, cols = 0;
  int blocksize = 64;
  std::int64_t numel() const { return static_cast<std::int64_t>(rows) * cols; }
};

// The 16 NF4 values: the CPU path's table (lora/quant/nf4.hpp), in constant memory.
static __constant__ float nf4_values[16] = {
    quant::nf4_code[0],  quant::nf4_code[1],  quant::nf4_code[2],  quant::nf4_code[3],
    quant::nf4_code[4],  quant::nf4_code[5],  quant::nf4_code[6],  quant::nf4_code[7],
    quant::nf4_code[8],  quant::nf4_code[9],  quant::nf4_code[10], quant::nf4_code[11],
    quant::nf4_code[12], quant::nf4_code[13], quant::nf4_code[14], quant::nf4_code[15]};

// The device tree below spells the CPU path's thresholds out as literals; keep them equal.
static_assert(quant::nf4_thresholds[0] == -0.8480964004993439f && quant::nf4_thresholds[1] == -0.6106329262256622f &&
              quant::nf4_thresholds[2] == -0.4599952697753906f && quant::nf4_thresholds[3] == -0.33967943489551544f &&
              quant::nf4_thresholds[4] == -0.23460740596055984f && quant::nf4_thresholds[5] == -0.13791173323988914f &&
              quant::nf4_thresholds[6] == -0.045525018125772476f && quant::nf4_thresholds[7] == 0.03979014977812767f &&
              quant::nf4_thresholds[8] == 0.1202552504837513f && quant::nf4_thresholds[9] == 0.2035212516784668f &&
              quant::nf4_thresholds[10] == 0.2920137718319893f && quant::nf4_thresholds[11] == 0.3893125355243683f &&
              quant::nf4_thresholds[12] == 0.5016634166240692f && quant::nf4_thresholds[13] == 0.6427869200706482f &&
              quant::nf4_thresholds[14] == 0.8614784181118011f,
              "NF4 thresholds differ between the CPU and GPU paths");

/// bitsandbytes' dQuantizeNF4 decision tree on x = value·(1/absmax); NaN gives 0.
__device__ __forceinline__ std::uint8_t nf4_encode_device(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

/// One warp per quantisation block: absmax by warp reduction, then one byte
/// (two codes) per lane per step.
template <class T>
__global__ void nf4_quantize_kernel(const T* __restrict__ x, long n, int bs, std::uint8_t* __restrict__ packed,
                                    float* __restrict__ absmax, long nblocks) {
  const long blk = static_cast<long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (blk >= nblocks) return;
  const long e0 = blk * bs;
  const long e1 = min(n, e0 + bs);
  float m = 0.f;
  for (long e = e0 + lane; e < e1; e += 32) m = fmaxf(m, fabsf(to_float(x[e])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) absmax[blk] = m;
  const float inv = __frcp_rn(m);  // 1/absmax, correctly rounded (inf for an all-zero block)
  for (long e = e0 + 2 * lane; e < e1; e += 64) {
    const std::uint8_t hi = nf4_encode_device(__fmul_rn(to_float(x[e]), inv));
    // An odd tensor's last low nibble: the code of a zero pad, as bitsandbytes and the CPU path write it.
    const float xlo = e + 1 < e1 ? to_float(x[e + 1]) : 0.f;
    const std::uint8_t lo = nf4_encode_device(__fmul_rn(xlo, inv));
    packed[e / 2] = static_cast<std::uint8_t>((hi << 4) | lo);
  }
}

/// out[i] = code[q_i]·absmax[i / bs]: 4 packed bytes → 8 values per thread and group, so a
/// warp reads 128 contiguous bytes and writes 8·32 contiguous values per group; a block of
/// `blockDim.x` threads takes U·blockDim.x consecutive groups, thread t the groups t,
/// t + blockDim.x, …, all U loads issued before the first store (more bytes in flight).
/// Needs n % 8 == 0 and a 16-byte aligned out. CS: the stores as streaming (evict-first) stores:
/// the output is not read again by this kernel, and L2 keeps the codes' lines instead.
template <class T, int U = 1, bool CS = false>
__global__ void nf4_dequantize_kernel(const std::uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                      long groups, int bs, T* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = nf4_values[threadIdx.x];
  __syncthreads();
  const long g0 = static_cast<long>(blockIdx.x) * blockDim.x * U + threadIdx.x;
  unsigned raw[U];
  float a[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long g = g0 + static_cast<long>(u) * blockDim.x;
    raw[u] = g < groups ? __ldg(reinterpret_cast<const unsigned*>(packed) + g) : 0u;
    a[u] = g < groups ? __ldg(absmax + (g * 8) / bs) : 0.f;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long g = g0 + static_cast<long>(u) * blockDim.x;
    if (g >= groups) break;
    float v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned b = (raw[u] >> (8 * i)) & 0xffu;
      v[2 * i] = lut[b >> 4] * a[u];
      v[2 * i + 1] = lut[b & 15u] * a[u];
    }
    constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int q = 0; q < 8 / V; ++q) {
      uint4 o;
      T* e = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int i = 0; i < V; ++i) e[i] = from_float<T>(v[q * V + i]);
      if constexpr (CS)
        __stcs(reinterpret_cast<uint4*>(out + g * 8) + q, o);
      else
        reinterpret_cast<uint4*>(out + g * 8)[q] = o;
    }
  }
}
constexpr int nf4_dequantize_unroll = 2;       // groups per thread in Nf4Tensor<cuda>::dequantize_into
constexpr bool nf4_dequantize_streaming = true;  // and its stores (tune_nf4 times the alternatives)

/// Element-wise fallback for any n and alignment.
template <class T>
__global__ void nf4_dequantize_scalar_kernel(const std::uint8_t* __restrict__ packed,
                                             const float* __restrict__ absmax, long n, int bs, T* __restrict__ out) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const std::uint8_t b = packed[i / 2];
  const int q = (i % 2 == 0) ? (b >> 4) : (b & 15);
  out[i] = from_float<T>(nf4_values[q] * absmax[i / bs]);
}

constexpr int nf4_threads = 128;
constexpr int nf4_rows = 4;

/// Y[t, n] = Σ_k X[t, k]·code(W[n, k])·absmax(n, k) for tokens ≤ TMAX ≤ 16, W
/// [out × K] NF4, ROWS rows per block. Each thread takes 16 packed bytes (32
/// weights of one quantisation block) per row; codes go through a shared-memory
/// table, and absmax multiplies the 32-term partial sum once. X values are
/// loaded 8 at a time and shared by the ROWS rows.
/// Needs K % 32 == 0 and 16-byte aligned rows of X.
template <class T, int TMAX, int ROWS>
__global__ void __launch_bounds__(nf4_threads) nf4_gemv_kernel(const T* __restrict__ X, long ldx, int tokens, int K,
                                                               const std::uint8_t* __restrict__ packed,
                                                               const float* __restrict__ absmax, int bs, int nOut,
                                                               T* __restrict__ Y, long ldy) {
  __shared__ float lut[16];
  __shared__ float part[nf4_threads / 32][TMAX * ROWS];
  if (threadIdx.x < 16) lut[threadIdx.x] = nf4_values[threadIdx.x];
  __syncthreads();
  constexpr int V = vec16<T>::V;
  const int row0 = static_cast<int>(blockIdx.x) * ROWS;
  float acc[TMAX][ROWS];
#pragma unroll
  for (int t = 0; t < TMAX; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[t][r] = 0.f;
  const int chunks = K / 32;
  for (int c = threadIdx.x; c < chunks; c += nf4_threads) {
    uint4 raw[ROWS];
    float a[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, nOut - 1);
      const long e = static_cast<long>(row) * K + static_cast<long>(c) * 32;
      raw[r] = __ldg(reinterpret_cast<const uint4*>(packed + e / 2));
      a[r] = __ldg(absmax + e / bs);
    }
#pragma unroll
    for (int t = 0; t < TMAX; ++t) {
      if (t < tokens) {
        float p[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) p[r] = 0.f;
#pragma unroll
        for (int q = 0; q < 32 / V; ++q) {
          float x[V];
          vec16<T>::load(X + t * ldx + c * 32 + q * V, x);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const unsigned* wr = reinterpret_cast<const unsigned*>(&raw[r]);
#pragma unroll
            for (int i = 0; i < V; i += 2) {
              const int idx = q * V + i;  // weight index in the chunk; byte idx / 2
              const unsigned b = (wr[idx / 8] >> (8 * ((idx / 2) % 4))) & 0xffu;
              p[r] = fmaf(x[i], lut[b >> 4], p[r]);
              p[r] = fmaf(x[i + 1], lut[b & 15u], p[r]);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[t][r] = fmaf(p[r], a[r], acc[t][r]);
      }
    }
  }
  block_sum_store<nf4_threads>(acc, part, tokens, row0, nOut, 1.f, Y, ldy);
}

constexpr int nf4_mma_lut_bytes = 256 * 32 * 4;  // lane-private: entry (b, lane) at word b·32 + lane

/// Shared-memory (state space) address of a pointer into shared memory.
__device__ __forceinline__ std::uint32_t shared_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

constexpr int nf4_stream_warps = 16;  // warps per block: they split K
/// 64-weight groups per warp and step: 4 for one n-tile of tokens; 2 for two, whose
/// registers would otherwise spill.
template <int NT>
constexpr int nf4_stream_groups = NT == 1 ? 4 : 2;

/// Dynamic shared memory of nf4_stream_kernel: the code table, as much again to align it to
/// its own size, the partial sums (4 slots, or 2 for the barrier form) and 4 counters.
template <int NT, bool WIDE, bool LAST>
constexpr int nf4_stream_smem_bytes() {
  return 2 * (WIDE ? 2 : 1) * nf4_mma_lut_bytes + (LAST ? 4 : 2) * nf4_stream_warps * NT * 4 * 32 * 4 + 16;
}

/// Tensor-core NF4 GEMM for 1…16 tokens with bf16 or half activations (QLoRA decode;
/// nf4_gemm uses it for 2…16).
///
/// Persistent blocks of 16 warps own the tiles of 16 rows blockIdx.x, blockIdx.x + gridDim.x, …
/// and walk each in steps of 16·G groups of 64 weights (G = nf4_stream_groups<NT>; warp w
/// takes groups G·w … G·w + G − 1 of a step). Each lane keeps the next step's codes (8 bytes of
/// two rows per group) and the absmax (lanes 0…15: G floats of row `lane`) in flight in registers while it multiplies
/// the current ones, across tile boundaries too. A byte of two codes becomes a pair of codes
/// in the activation type through a lane-private 256-entry table in shared memory (one
/// conflict-free 4-byte load per two weights; the table is aligned to its size so that the
/// address is one byte_perm (WIDE, entries 256 bytes apart) or shift + LOP3 of the byte),
/// and feeds mma.m16n8k16 (f32 accumulation) with B = the matching 16 activations of token
/// lane/4 (+ 8 per n-tile). The K order inside a group is permuted identically for A and B,
/// so the sum is unchanged; a group lies in one quantisation block (blocksize ≥ 64), so its
/// product is scaled by that block's absmax (float) once. Codes are rounded to the
/// activation type (2^-9 relative for bf16, as bitsandbytes' own 4-bit inference kernel
/// rounds the dequantised weight); products and sums are float.
/// The 16 partial sums of a tile meet in shared memory, one barrier per tile (double-buffered),
/// or with LAST each warp leaves its sums in one of 4 slots and the last warp to arrive (a
/// shared counter) adds them and writes Y, with a block barrier only every 4 tiles. nf4_gemm
/// uses the barrier form (racecheck cannot follow LAST's hand-off); tune_nf4 times both.
/// Needs blocksize ≥ 64, K % 256 == 0, rows of X 16-byte aligned.
template <class T, int NT, bool WIDE, bool LAST>
__global__ void __launch_bounds__(nf4_stream_warps * 32)
    nf4_stream_kernel(const T* __restrict__ X, long ldx, int tokens, int K, const std::uint8_t* __restrict__ packed,
                      const float* __restrict__ absmax, int bs, int nOut, T* __restrict__ Y, long ldy) {
  constexpr int KS = nf4_stream_warps, G = nf4_stream_groups<NT>, slots = LAST ? 4 : 2;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr std::uint32_t lut_size = (WIDE ? 2 : 1) * nf4_mma_lut_bytes;
  const std::uint32_t sbase = shared_u32(smem);
  const std::uint32_t lut_addr = (sbase + lut_size - 1) & ~(lut_size - 1);
  std::uint32_t* lut = reinterpret_cast<std::uint32_t*>(smem + (lut_addr - sbase));
  float* red = reinterpret_cast<float*>(smem + (lut_addr - sbase) + lut_size);  // [slots][KS][NT·4][32]
  int* cnt = reinterpret_cast<int*>(red + slots * KS * NT * 4 * 32);
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int gid = lane / 4, q = lane % 4;
  const int groups = K / 64, span = KS * G;
  const int nks = (groups + span - 1) / span;  // steps per tile
  const int tiles = (nOut + 15) / 16;
  const int bid = static_cast<int>(blockIdx.x), nb = static_cast<int>(gridDim.x);
  const int steps = (tiles > bid ? (tiles - 1 - bid) / nb + 1 : 0) * nks;
  const std::uint32_t lane_off = lut_addr | (static_cast<std::uint32_t>(lane) * 4u);

  uint2 wa[2][G], wb[2][G];
  float am[2][G];
  auto load = [&](auto buf, int s) {
    constexpr int b = decltype(buf)::value;
    if (s >= steps) return;
    const int tile = bid + (s / nks) * nb, gw = (s % nks) * span + warp * G;
    if (gw >= groups) return;
    const int row0 = tile * 16;
    const int rA = min(row0 + gid, nOut - 1), rB = min(row0 + gid + 8, nOut - 1);
    const std::uint8_t* pA = packed + static_cast<long>(rA) * (K / 2) + 8 * q + 32 * gw;
    const std::uint8_t* pB = packed + static_cast<long>(rB) * (K / 2) + 8 * q + 32 * gw;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      wa[b][j] = __ldg(reinterpret_cast<const uint2*>(pA + 32 * j));
      wb[b][j] = __ldg(reinterpret_cast<const uint2*>(pB + 32 * j));
    }
    if (lane < 16) {
      const long e = static_cast<long>(min(row0 + lane, nOut - 1)) * K + 64L * gw;  // first weight of the groups
      if (bs == 64) {  // QLoRA's blocksize: the groups' absmax are consecutive floats
        if constexpr (G == 4) {
          const float4 v = __ldg(reinterpret_cast<const float4*>(absmax + e / 64));
          am[b][0] = v.x;
          am[b][1] = v.y;
          am[b][2] = v.z;
          am[b][3] = v.w;
        } else {
          const float2 v = __ldg(reinterpret_cast<const float2*>(absmax + e / 64));
          am[b][0] = v.x;
          am[b][1] = v.y;
        }
      } else {
#pragma unroll
        for (int j = 0; j < G; ++j) am[b][j] = __ldg(absmax + (e + 64 * j) / bs);
      }
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

  auto lookup = [&](std::uint32_t word, int byte) {
    std::uint32_t addr, v;
    if constexpr (WIDE)
      addr = __byte_perm(word, lane_off, 0x7604u | (static_cast<std::uint32_t>(byte) << 4));
    else
      addr = (((word >> (8 * byte)) & 0xffu) << 7) | lane_off;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
  };
  // This lane's 16 activations of group g for its tokens gid + 8n (zeros past `tokens`).
  auto load_x = [&](int g, uint4 (&xv)[NT][2]) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int t = gid + 8 * n;
      if (t < tokens) {
        const T* xr = X + static_cast<long>(t) * ldx + 16 * q + 64 * g;
        xv[n][0] = __ldg(reinterpret_cast<const uint4*>(xr));
        xv[n][1] = __ldg(reinterpret_cast<const uint4*>(xr + 8));
      } else {
        xv[n][0] = xv[n][1] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  auto compute = [&](auto buf, int s) {
    constexpr int b = decltype(buf)::value;
    const int ti = s / nks, ks = s % nks;
    const int row0 = (bid + ti * nb) * 16, gw = ks * span + warp * G;
    if (gw < groups) {
      [[maybe_unused]] uint4 xnext[NT][2];  // used for one n-tile only
      if constexpr (NT == 1) load_x(gw, xnext);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        uint4 xv[NT][2];
        if constexpr (NT == 1) {  // the next group's activations while this one multiplies (two n-tiles would spill)
          xv[0][0] = xnext[0][0];
          xv[0][1] = xnext[0][1];
          if (j + 1 < G) load_x(gw + j + 1, xnext);
        } else {
          load_x(gw + j, xv);
        }
        float d[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) d[n][i] = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          // bytes k and k + 4 of each row's 8: weights 2k, 2k+1 and 8+2k, 9+2k of the lane's 16
          const std::uint32_t a[4] = {lookup(wa[b][j].x, k), lookup(wb[b][j].x, k), lookup(wa[b][j].y, k),
                                      lookup(wb[b][j].y, k)};
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const std::uint32_t* xw = reinterpret_cast<const std::uint32_t*>(&xv[n][0]);
            mma_traits<T>::mma(d[n], a, xw[k], xw[4 + k]);
          }
        }
        const float sA = __shfl_sync(0xffffffffu, am[b][j], gid);
        const float sB = __shfl_sync(0xffffffffu, am[b][j], gid + 8);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[n][0] = fmaf(sA, d[n][0], acc[n][0]);
          acc[n][1] = fmaf(sA, d[n][1], acc[n][1]);
          acc[n][2] = fmaf(sB, d[n][2], acc[n][2]);
          acc[n][3] = fmaf(sB, d[n][3], acc[n][3]);
        }
      }
    }
    if (ks != nks - 1) return;
    // The tile's last step: the KS warps' partial sums meet. c0, c1 of a lane: row gid, tokens
    // 2q, 2q + 1; c2, c3: row gid + 8 (+ 8 tokens per n-tile).
    const int slot = ti % slots;
    float* rb = red + slot * KS * NT * 4 * 32;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        rb[(warp * NT * 4 + n * 4 + i) * 32 + lane] = acc[n][i];
        acc[n][i] = 0.f;
      }
    // Sums the outputs o = (row o % 16, token o / 16) from index `first` on, `stride` apart.
    auto finish = [&](int first, int stride) {
      for (int o = first; o < 16 * tokens; o += stride) {
        const int row = o % 16, t = o / 16, n = t / 8, c = t % 8;
        const int l = 4 * (row % 8) + c / 2, i = (row >= 8 ? 2 : 0) + c % 2;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < KS; ++w) v += rb[(w * NT * 4 + n * 4 + i) * 32 + l];
        if (row0 + row < nOut) Y[static_cast<long>(t) * ldy + row0 + row] = from_float<T>(v);
      }
    };
    if constexpr (LAST) {
      __threadfence_block();
      __syncwarp();
      int old = 0;
      if (lane == 0) old = atomicAdd(cnt + slot, 1);
      old = __shfl_sync(0xffffffffu, old, 0);
      if (old == KS - 1) {  // the last warp of this tile
        __syncwarp();
        __threadfence_block();
        finish(lane, 32);
        __syncwarp();
        if (lane == 0) cnt[slot] = 0;
      }
      if (slot == slots - 1) __syncthreads();  // no warp reuses a slot before its tile is summed
    } else {
      __syncthreads();
      finish(static_cast<int>(threadIdx.x), KS * 32);
    }
  };

  load(std::integral_constant<int, 0>{}, 0);
  // The code table, built while the first step's loads are in flight.
  if (threadIdx.x < slots) cnt[threadIdx.x] = 0;
  for (int i = static_cast<int>(threadIdx.x); i < 256 * 32; i += KS * 32) {
    const int byte = i / 32;
    lut[WIDE ? byte * 64 + i % 32 : i] = mma_traits<T>::pack(nf4_values[byte >> 4], nf4_values[byte & 15]);
  }
  __syncthreads();
  for (int s = 0; s < steps; s += 2) {
    load(std::integral_constant<int, 1>{}, s + 1);
    compute(std::integral_constant<int, 0>{}, s);
    if (s + 1 >= steps) break;
    load(std::integral_constant<int, 0>{}, s + 2);
    compute(std::integral_constant<int, 1>{}, s + 1);
  }
}

template <class T, int NT, bool WIDE, bool LAST>
void launch_nf4_stream(const T* X, long ldx, int tokens, int K, const std::uint8_t* packed, const float* absmax, int bs,
                       int nOut, T* Y, long ldy, cudaStream_t stream) {
  auto kernel = nf4_stream_kernel<T, NT, WIDE, LAST>;
  constexpr int smem = nf4_stream_smem_bytes<NT, WIDE, LAST>();
  const int c = persistent_capacity(kernel, nf4_stream_warps * 32, smem, smem);
  const unsigned blocks = std::min<unsigned>(ceil_div(nOut, 16), static_cast<unsigned>(c));
  kernel<<<blocks, nf4_stream_warps * 32, smem, stream>>>(X, ldx, tokens, K, packed, absmax, bs, nOut, Y, ldy);
}

// ---- One token on the CUDA cores: a lane-private byte-pair table ------------------------------

constexpr int nf4_pair_rows = 4;          // rows per batch of a row group
constexpr int nf4_pair_slice = 1024;      // weights of K per K-warp (32 per lane)
constexpr int nf4_pair_max_warps = 16;    // K-warps × row groups per block (≤ 128 registers each)
constexpr int nf4_pair_table_bytes = 256 * 32 * 8;

/// Dynamic shared memory of nf4_byte_pair_kernel: the table, then the partial sums
/// [RW row groups][2 slots][KW K-warps][32 lanes].
inline int nf4_byte_pair_smem_bytes(int KW, int RW) { return nf4_pair_table_bytes + RW * 2 * KW * 32 * 4; }

/// y[n] = Σ_k x[k]·code(W[n, k])·absmax(n, k) for one bf16/half token, rows [0, nOut) with
/// nOut % nf4_pair_rows == 0, K % 1024 == 0, K % blocksize == 0, blocksize % 32 == 0.
///
/// A block has KW = K / 1024 K-warps × RW row groups. K-warp kw's lane l owns the 32 weights
/// k0 = 1024·kw + 32·l … k0 + 31 of every row: 16 packed bytes (one 16-byte load per row), one
/// quantisation block, and 32 activations kept as floats in registers for the whole kernel.
/// Each block takes a contiguous range of batches of 4 rows, dealt round-robin to its row
/// groups. Per byte of codes (two weights): one PRMT turns the byte into the offset
/// b·256 + 8·l of the lane's private float2 entry (nf4[b >> 4], nf4[b & 15]) of a table laid
/// out [256 bytes][32 lanes] (conflict-free per half-warp), one LDS.64, two FFMA. A lane's
/// 32-term sum is scaled by its absmax once. The 4 rows' sums of a warp are reduced by a
/// transposing butterfly (xor 16, then 8: three shuffles, leaving lane l with row l >> 3), the
/// K-warps meet in shared memory behind one named barrier per row group (two slots, so a slot
/// is rewritten only after K-warp 0 has passed the next barrier), and K-warp 0 finishes the sum
/// and writes y. The next batch's codes and absmax are loaded row by row as soon as the current
/// batch's row has been multiplied. Products and sums are float, the codes exact. Launched
/// as a programmatic dependent, its table set-up overlaps the previous kernel's tail.
/// KWC > 0: K = 1024·KWC, RWC > 0: RWC row groups, BSC > 0: blocksize BSC at compile time (the
/// strides become immediates; with all three the kernel is the measured one); 0: at run time.
template <class T, int KWC = 0, int RWC = 0, int BSC = 0>
__global__ void __launch_bounds__(nf4_pair_max_warps * 32)
    nf4_byte_pair_kernel(const T* __restrict__ X, int Kr, const std::uint8_t* __restrict__ packed,
                         const float* __restrict__ absmax, int bsr, int nOut, int RWr, T* __restrict__ Y, int pdl) {
  constexpr int R = nf4_pair_rows, L = 3;  // lane l of K-warp 0 ends with row l >> L of a batch
  extern __shared__ __align__(128) unsigned char smem[];
  const int K = KWC > 0 ? KWC * nf4_pair_slice : Kr;
  const int RW = RWC > 0 ? RWC : RWr;
  const int bs = BSC > 0 ? BSC : bsr;
  const int KW = K / nf4_pair_slice;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int kw = warp % KW, rw = warp / KW;
  float2* tab = reinterpret_cast<float2*>(smem);
  float* red = reinterpret_cast<float*>(smem + nf4_pair_table_bytes) + rw * 2 * KW * 32;

  const int nbat = nOut / R;
  const int b0 = static_cast<int>(static_cast<long>(blockIdx.x) * nbat / gridDim.x);
  const int b1 = static_cast<int>(static_cast<long>(blockIdx.x + 1) * nbat / gridDim.x);
  const int nmine = b1 - b0 > rw ? (b1 - b0 - rw + RW - 1) / RW : 0;
  const int k0 = kw * nf4_pair_slice + lane * 32;
  const long row0 = static_cast<long>(b0 + rw) * R;
  const long crow = K / 2, arow = K / bs;  // bytes of codes and absmax entries per row
  const std::uint8_t* pc = packed + row0 * crow + k0 / 2;
  const float* pa = absmax + (row0 * K + k0) / bs;
  const long cstep = static_cast<long>(RW) * R * crow, astep = static_cast<long>(RW) * R * arow;

  // Programmatic dependent launch (pdl != 0): the next kernel of the stream, if launched with
  // PDL too, may take an SM as soon as one of our blocks exits; this kernel builds its table
  // and asks L2 for its first rows before it waits for the previous kernel (an L2 prefetch is
  // safe: a write by that kernel lands in L2), and reads X and W only after the wait. Without
  // PDL the first loads go out before the table build, which then hides their latency.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int threads = KWC > 0 && RWC > 0 ? KWC * RWC * 32 : static_cast<int>(blockDim.x);
  auto build_table = [&] {
    for (int i = static_cast<int>(threadIdx.x); i < 256 * 32; i += threads) {
      const int e = i / 32;  // one entry per warp and step: the constant reads are uniform
      tab[i] = make_float2(nf4_values[e >> 4], nf4_values[e & 15]);
    }
  };
  if (pdl) {
    if (nmine > 0)
#pragma unroll
      for (int r = 0; r < R; ++r) asm volatile("prefetch.global.L2 [%0];" ::"l"(pc + r * crow));
    build_table();
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }

  uint4 c[R];
  float a[R];
  auto load_row = [&](int r) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(c[r].x), "=r"(c[r].y), "=r"(c[r].z), "=r"(c[r].w)
                 : "l"(pc + r * crow));
    a[r] = __ldg(pa + r * arow);
  };
  if (nmine > 0)
#pragma unroll
    for (int r = 0; r < R; ++r) load_row(r);

  float x[32];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(X + k0) + q);
    const std::uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // a bf16 is the top half of its float
        x[8 * q + 2 * j] = __uint_as_float(w[j] << 16);
        x[8 * q + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      } else {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
        x[8 * q + 2 * j] = f.x;
        x[8 * q + 2 * j + 1] = f.y;
      }
    }
  }
  if (!pdl) build_table();
  __syncthreads();

  const std::uint32_t base = static_cast<std::uint32_t>(lane) * 8u;
  T* yp = Y + row0 + (lane >> L);  // K-warp 0's output of the batch
  const int bar = 1 + rw;          // named barrier of the row group (0 is __syncthreads)
  const int bar_threads = KW * 32;
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
          // bytes: 0 and 2, 3 from base (lane·8 < 256), 1 = code byte i: offset b·256 + lane·8
          const std::uint32_t off = __byte_perm(w, base, 0x7604u | (static_cast<std::uint32_t>(i) << 4));
          const float2 t = *reinterpret_cast<const float2*>(smem + off);
          s0 = fmaf(t.x, x[8 * q + 2 * i], s0);
          s1 = fmaf(t.y, x[8 * q + 2 * i + 1], s1);
        }
      p[r] = (s0 + s1) * a[r];
      if constexpr (decltype(more)::value) {
        if (r == 0) {
          pc += cstep;
          pa += astep;
        }
        load_row(r);
      }
    }
#pragma unroll
    for (int s = 0; (R >> s) > 1; ++s) {  // transposing butterfly: xor 16, then 8
      const int n = R >> s, m = 16 >> s;
      const bool hi = (lane & m) != 0;
#pragma unroll
      for (int i = 0; i < n / 2; ++i) {
        const float send = hi ? p[i] : p[i + n / 2];
        const float keep = hi ? p[i + n / 2] : p[i];
        p[i] = keep + __shfl_xor_sync(0xffffffffu, send, m);
      }
    }
    float* rs = red + (jj & 1) * KW * 32;
    auto sync_group = [&] {  // the thread count as an immediate where K is known
      if constexpr (KWC > 0)
        asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(KWC * 32) : "memory");
      else
        asm volatile("bar.sync %0, %1;" ::"r"(bar), "r"(bar_threads) : "memory");
    };
    if (kw != 0) {
      rs[kw * 32 + lane] = p[0];
      sync_group();
    } else {
      sync_group();
      float v = p[0];
#pragma unroll
      for (int w = 1; w < (KWC > 0 ? KWC : KW); ++w) v += rs[w * 32 + lane];
#pragma unroll
      for (int m = 1; m < (1 << L); m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
      if ((lane & ((1 << L) - 1)) == 0) *yp = from_float<T>(v);
      yp += static_cast<long>(RW) * R;
    }
  };
  int jj = 0;
#pragma unroll 1
  for (; jj + 1 < nmine; ++jj) step(jj, std::true_type{});
  if (jj < nmine) step(jj, std::false_type{});
}

/// Whether nf4_byte_pair_kernel takes this product (bf16/half, one token).
template <class T>
bool nf4_byte_pair_ok(long K, int bs, const void* x) {
  return (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && K % nf4_pair_slice == 0 &&
         K / nf4_pair_slice <= nf4_pair_max_warps && bs % 32 == 0 && K % bs == 0 && aligned(x, 16);
}

/// Row groups of a byte-pair block with KW K-warps: up to 4, at most 16 warps in all.
constexpr int nf4_pair_row_groups(int KW) { return KW >= nf4_pair_max_warps ? 1 : std::min(4, nf4_pair_max_warps / KW); }

/// One token, rows [0, nOut − nOut % 4) by nf4_byte_pair_kernel<T, KWC, …> (persistent grid);
/// the caller does the other rows.
/// With `pdl` (the default) it is a programmatic dependent launch: its blocks may start, and
/// build their table, while the previous kernel of the stream finishes.
template <class T, int KWC, int BSC>
void launch_nf4_byte_pair_kw(const T* X, int K, const std::uint8_t* packed, const float* absmax, int bs, int nOut, T* Y,
                             cudaStream_t stream, bool pdl = true) {
  const int KW = K / nf4_pair_slice;
  const int RW = nf4_pair_row_groups(KW);
  constexpr int RWC = KWC > 0 ? nf4_pair_row_groups(KWC) : 0;
  auto kernel = nf4_byte_pair_kernel<T, KWC, RWC, BSC>;
  const int smem = nf4_byte_pair_smem_bytes(KW, RW);
  const int smem_max = nf4_byte_pair_smem_bytes(1, nf4_pair_max_warps);  // the largest any shape asks for
  // Capacity per block shape: RW·KW warps of up to 128 registers, so one block of 16 warps per
  // SM, or more of smaller ones (persistent_capacity caches it per block shape).
  const int c = persistent_capacity(kernel, RW * KW * 32, smem, smem_max);
  const int rows = nOut / nf4_pair_rows * nf4_pair_rows;
  if (rows == 0) return;
  const unsigned blocks = std::min<unsigned>(ceil_div(rows / nf4_pair_rows, RW), static_cast<unsigned>(c));
  launch_maybe_pdl(kernel, dim3(blocks), dim3(static_cast<unsigned>(RW * KW * 32)), static_cast<std::size_t>(smem),
                   stream, pdl, X, K, packed, absmax, bs, rows, RW, Y, pdl ? 1 : 0);
}
/// K and the blocksize at compile time for the common widths 2048, 4096, 8192 and 14336 and
/// blocksize 64 (bitsandbytes' default); any other K % 1024 == 0 or blocksize at run time.
template <class T>
void launch_nf4_byte_pair(const T* X, int K, const std::uint8_t* packed, const float* absmax, int bs, int nOut, T* Y,
                          cudaStream_t stream, bool pdl = true) {
  auto go = [&](auto kw) {
    constexpr int KWC = decltype(kw)::value;
    if (bs == 64)
      launch_nf4_byte_pair_kw<T, KWC, 64>(X, K, packed, absmax, bs, nOut, Y, stream, pdl);
    else
      launch_nf4_byte_pair_kw<T, KWC, 0>(X, K, packed, absmax, bs, nOut, Y, stream, pdl);
  };
  switch (K / nf4_pair_slice) {
    case 2: return go(std::integral_constant<int, 2>{});
    case 4: return go(std::integral_constant<int, 4>{});
    case 8: return go(std::integral_constant<int, 8>{});
    case 14: return go(std::integral_constant<int, 14>{});
    default: return launch_nf4_byte_pair_kw<T, 0, 0>(X, K, packed, absmax, bs, nOut, Y, stream, pdl);
  }
}

// ---- 1…16 tokens on tensor cores, codes streamed through a per-warp copy ring ---------------

constexpr int nf4_ring_stages = 2;        // ring slots per warp: the next tile in flight while one computes
constexpr int nf4_ring_row_bytes = 128;   // a row's 128 code bytes, 32-byte units swizzled by row % 4
constexpr int nf4_ring_stage_bytes = 16 * nf4_ring_row_bytes + 16 * 16;  // 16 rows of codes, then 16 × 4 absmax
constexpr int nf4_ring_max_warps = 16;    // K-warps per block: K ≤ 16 · 256
/// From this many K-warps (128 registers each) the narrow kernel is one block per SM by registers,
/// so the WIDE table's 128 KB of shared memory costs no occupancy.
constexpr int nf4_ring_wide_min_warps = 9;
/// LoRA pieces (16 ranks of one adapter each) nf4_ring_kernel adds at most: one per K-warp.
constexpr int nf4_lora_max_jobs = nf4_ring_max_warps;
/// A piece's slot in its warp's ring: the tile's 16 rows × 16 ranks of B (16-bit values).
constexpr int nf4_lora_slot_bytes = 16 * 16 * 2;

/// Dynamic shared memory of nf4_ring_kernel with `warps` K-warps and `jobs` LoRA pieces: the
/// lane-private code table, each warp's ring, two slots of partial sums, and each piece's ring of
/// B tiles and its XA [16 tokens × 16 ranks].
template <int NT, bool LORA = false, int S = nf4_ring_stages, bool WIDE = false>
constexpr int nf4_ring_smem_bytes(int warps, int jobs = 0) {
  return (WIDE ? 4 * 65536 / 2 : nf4_mma_lut_bytes) + warps * S * nf4_ring_stage_bytes + 2 * warps * NT * 4 * 32 * 4 +
         (LORA ? jobs * (S * nf4_lora_slot_bytes + 16 * 16 * 2) : 0);
}
/// How nf4_ring_kernel gets a LoRA term's XA: none; from nf4_lora_shrink_kernel, launched
/// before it; computed by every block itself (A read by every block: for a single piece);
/// computed by the blocks of a thread-block cluster together (each reads 1 / cluster of A and
/// they add each other's partial sums through distributed shared memory).
enum Nf4LoraMode : int { nf4_lora_none = 0, nf4_lora_shrunk = 1, nf4_lora_self = 2, nf4_lora_cluster = 3 };
/// The most blocks a cluster of nf4_ring_kernel may have (the portable limit).
constexpr int nf4_lora_max_cluster = 8;
/// Up to this many pieces nf4_gemm_lora has every block compute XA itself.
constexpr int nf4_lora_self_max = 1;

/// One piece of a LoRA term: 16 ranks [16p, 16p + 16) of one adapter (scaling s, A [r × K]
/// row-major), for the tokens of a mask.
template <class T>
struct Nf4LoraJob {
  const T* a = nullptr;  ///< A's row 16p
  long lda = 0;
  const T* b = nullptr;  ///< B [out × r] at column 16p, or (Nf4RingLora::bt) Bᵀ [r × out] at row 16p
  long ldb = 0;
  int ranks = 16;        ///< the adapter's ranks in this piece (1…16; 16 unless bt)
  float s = 0.f;
  std::uint32_t tokens = 0;  ///< bit t: token t takes this piece
};

/// The LoRA term nf4_ring_kernel adds: for each piece, Y[t] += round(s·X[t]·Aᵀ)·Bᵀ over its 16
/// ranks and tokens (jobs == 0: none). One adapter of rank r is r / 16 pieces for every token; a
/// mixed batch has one adapter's pieces per token mask. xa [jobs × 16 tokens × 16 ranks] is
/// nf4_lora_shrink_kernel's output, which launch_nf4_ring launches first (unless self).
template <class T>
struct Nf4RingLora {
  int jobs = 0;
  bool bt = false;  ///< the pieces' b are rows of Bᵀ (multi::AdapterSet's layout), not columns of B
  /// every block computes XA itself (no shrink kernel; xa unused), as nf4_gemm_lora does for up
  /// to nf4_lora_self_max pieces
  bool self = false;
  /// with self and cluster > 1 (≤ nf4_lora_max_cluster): the blocks of a thread-block cluster of
  /// this many compute XA together, K-warp w's share in the block of rank w % cluster
  int cluster = 1;
  T* xa = nullptr;
  /// dense_ring_kernel only: with xald > 0, block 0 also writes XA to xa as rows [token][xald]
  /// of xacols columns (the pieces' 16·jobs ranks, then zeros)
  long xald = 0;
  int xacols = 0;
  Nf4LoraJob<T> job[nf4_lora_max_jobs];
};

__device__ __forceinline__ void nf4_cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void nf4_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void nf4_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/// This block's rank in its thread-block cluster, and the cluster's size (sm_90).
__device__ __forceinline__ int cluster_rank() {
  std::uint32_t r;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return static_cast<int>(r);
}
__device__ __forceinline__ int cluster_size() {
  std::uint32_t r;
  asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return static_cast<int>(r);
}
/// Every thread of the cluster arrives (its shared-memory writes before it released), then
/// waits for all (acquiring theirs): the two halves of a cluster-wide barrier, in this order.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }
/// *p in the shared memory of the cluster's block `rank` (p: an address in this block's).
__device__ __forceinline__ float cluster_load(const float* p, int rank) {
  std::uint32_t a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(shared_u32(p)), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory");
  return v;
}

/// This lane's activations for nf4_ring_kernel's layout: token gid + 8n, weights 256·warp + 64g +
/// 16q … + 15, for the tokens `take` accepts (zeros for the others and past `tokens`).
template <class T, int NT, class Take>
__device__ __forceinline__ void nf4_ring_load_x(const T* __restrict__ X, long ldx, int tokens, int warp, int gid,
                                                int q, Take take, std::uint32_t (&xr)[4][NT][8]) {
#pragma unroll
  for (int g = 0; g < 4; ++g)
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int t = gid + 8 * n;
      uint4 u0 = make_uint4(0, 0, 0, 0), u1 = u0;
      if (t < tokens && take(t)) {
        const T* xp = X + static_cast<long>(t) * ldx + 256 * warp + 64 * g + 16 * q;
        u0 = __ldg(reinterpret_cast<const uint4*>(xp));
        u1 = __ldg(reinterpret_cast<const uint4*>(xp + 8));
      }
      xr[g][n][0] = u0.x, xr[g][n][1] = u0.y, xr[g][n][2] = u0.z, xr[g][n][3] = u0.w;
      xr[g][n][4] = u1.x, xr[g][n][5] = u1.y, xr[g][n][6] = u1.z, xr[g][n][7] = u1.w;
    }
}

/// Shared memory per K-warp of a ring kernel's second n-tile of activations in shared memory
/// (X2: tokens 8…15 × the warp's 256 columns), in place of 32 registers.
constexpr int ring_x2_bytes = 8 * 256 * 2;

/// X2: this lane's words of token gid + 8 (nf4_ring_load_x's xr[g][1] for every group g) into its
/// warp's x2s ([group][half][lane] 16-byte words; each lane reads back only its own).
template <class T>
__device__ __forceinline__ void ring_x2_store(const T* __restrict__ X, long ldx, int tokens, int warp, int lane,
                                              uint4* x2s) {
  const int t = lane / 4 + 8, q = lane % 4;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    uint4 u0 = make_uint4(0, 0, 0, 0), u1 = u0;
    if (t < tokens) {
      const T* xp = X + static_cast<long>(t) * ldx + 256 * warp + 64 * g + 16 * q;
      u0 = __ldg(reinterpret_cast<const uint4*>(xp));
      u1 = __ldg(reinterpret_cast<const uint4*>(xp + 8));
    }
    x2s[(2 * g) * 32 + lane] = u0;
    x2s[(2 * g + 1) * 32 + lane] = u1;
  }
}

/// X2: this lane's eight words of token gid + 8 for group g (ring_x2_store's).
__device__ __forceinline__ void ring_x2_words(const uint4* x2s, int g, int lane, std::uint32_t (&w)[8]) {
  const uint4 v0 = x2s[(2 * g) * 32 + lane], v1 = x2s[(2 * g + 1) * 32 + lane];
  w[0] = v0.x, w[1] = v0.y, w[2] = v0.z, w[3] = v0.w, w[4] = v1.x, w[5] = v1.y, w[6] = v1.z, w[7] = v1.w;
}

/// This lane's fragments of a LoRA piece's A for group g (64 weights) of a warp's 256 columns
/// [256·warp, 256·warp + 256) of K: ranks gid and gid + 8, weights 64g + 16q … + 15 (rows past
/// the piece's ranks read its last row; the caller drops them).
template <class T>
__device__ __forceinline__ void nf4_lora_a_load(const Nf4LoraJob<T>& jb, int warp, int gid, int q, int g,
                                                uint4 (&a)[4]) {
  const T* a0 = jb.a + static_cast<long>(min(gid, jb.ranks - 1)) * jb.lda + 256 * warp + 64 * g + 16 * q;
  const T* a1 = jb.a + static_cast<long>(min(gid + 8, jb.ranks - 1)) * jb.lda + 256 * warp + 64 * g + 16 * q;
  a[0] = __ldg(reinterpret_cast<const uint4*>(a0));
  a[1] = __ldg(reinterpret_cast<const uint4*>(a0 + 8));
  a[2] = __ldg(reinterpret_cast<const uint4*>(a1));
  a[3] = __ldg(reinterpret_cast<const uint4*>(a1 + 8));
}

/// dxa += group g's products of A (nf4_lora_a_load's fragments, permuted along K as the
/// activations are) with the warp's activations xr[g] (nf4_ring_load_x), on the tensor cores.
template <class T, int NT>
__device__ __forceinline__ void nf4_lora_a_mma(const uint4 (&a)[4], const std::uint32_t (&xg)[NT][8],
                                               float (&dxa)[NT][4]) {
  const std::uint32_t ua[4] = {a[0].x, a[0].y, a[0].z, a[0].w}, ub[4] = {a[1].x, a[1].y, a[1].z, a[1].w};
  const std::uint32_t va[4] = {a[2].x, a[2].y, a[2].z, a[2].w}, vb[4] = {a[3].x, a[3].y, a[3].z, a[3].w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const std::uint32_t f[4] = {ua[k], va[k], ub[k], vb[k]};
#pragma unroll
    for (int n = 0; n < NT; ++n) mma_traits<T>::mma(dxa[n], f, xg[n][k], xg[n][4 + k]);
  }
}

/// A warp's partial sums of X·Aᵀ for a LoRA piece over its 256 columns [256·warp, 256·warp + 256)
/// of K, on the tensor cores: dxa[n] is the m16n8k16 accumulator of ranks gid, gid + 8 × tokens
/// 2q, 2q + 1 (+ 8n); xr holds the warp's activations (nf4_ring_load_x). The first PG groups'
/// fragments of A may come already loaded (`pre`); the others are loaded here.
template <class T, int NT, int PG = 0>
__device__ __forceinline__ void nf4_lora_xa_partial(const Nf4LoraJob<T>& jb, int warp, int gid, int q,
                                                    const std::uint32_t (&xr)[4][NT][8], float (&dxa)[NT][4],
                                                    const uint4 (*pre)[4] = nullptr) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) dxa[n][i] = 0.f;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    if (g < PG) {
      nf4_lora_a_mma<T, NT>(pre[g], xr[g], dxa);
    } else {
      uint4 a[4];
      nf4_lora_a_load<T>(jb, warp, gid, q, g, a);
      nf4_lora_a_mma<T, NT>(a, xr[g], dxa);
    }
  }
}

/// XA = s·X·Aᵀ for nf4_ring_kernel's LoRA term: block j computes piece j's [16 tokens × 16
/// ranks] on the tensor cores with K / 256 warps, warp w the weights [256w, 256w + 256) in the ring
/// kernel's fragment layout (tokens outside the piece's mask and ranks past the adapter's give 0),
/// the warps' partial sums added in warp order through shared memory, scaled by s and rounded
/// to T into xa[j]. A programmatic dependent launch: it waits for X, then lets the ring kernel
/// start (which therefore reads X without waiting, and waits for xa only before its first LoRA
/// product).
template <class T, int NT>
__global__ void __launch_bounds__(nf4_ring_max_warps * 32)
    nf4_lora_shrink_kernel(const T* __restrict__ X, long ldx, int tokens, const __grid_constant__ Nf4RingLora<T> lora) {
  __shared__ float red[nf4_ring_max_warps][NT * 4][32];
  const int KS = static_cast<int>(blockDim.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int gid = lane / 4, q = lane % 4;
  const Nf4LoraJob<T>& jb = lora.job[blockIdx.x];
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  std::uint32_t xr[4][NT][8];
  const std::uint32_t mask = jb.tokens;
  nf4_ring_load_x<T, NT>(X, ldx, tokens, warp, gid, q, [mask](int t) { return (mask >> t) & 1u; }, xr);
  float dxa[NT][4];
  nf4_lora_xa_partial<T, NT>(jb, warp, gid, q, xr, dxa);
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][n * 4 + i][lane] = dxa[n][i];
  __syncthreads();
  T* out = lora.xa + static_cast<long>(blockIdx.x) * 256;
  for (int o = static_cast<int>(threadIdx.x); o < 256; o += static_cast<int>(blockDim.x)) {
    // d0, d1 of a lane: rank gid, tokens 2q, 2q + 1; d2, d3: rank gid + 8 (+ 8 tokens per n-tile)
    const int j = o % 16, t = o / 16, n = t / 8, c = t % 8;
    float v = 0.f;
    if (n < NT && j < jb.ranks) {
      const int l = 4 * (j % 8) + c / 2, i = (j >= 8 ? 2 : 0) + c % 2;
      for (int w = 0; w < KS; ++w) v += red[w][n * 4 + i][l];
    }
    out[t * 16 + j] = from_float<T>(jb.s * v);
  }
}

/// The ring kernels' LoRA and tile helpers (nf4_ring_kernel, dense_ring_kernel in
/// lora/cuda/ring.cuh). nf4_ring_kernel keeps the B-tile copy written out in its `issue`: through
/// ring_lora_b_issue ptxas spills 40 bytes in its per-block kernel at one n-tile (sm_90, nvcc 13),
/// which spills none as written.
///
/// A ring kernel's copy of piece pi's B for the tile of rows [row0, row0 + 16) into a slot
/// `ls` (one 16-byte cp.async per lane; rows and ranks past the ends repeat the last ones): from
/// Bᵀ [rank][16 rows] (`bt`, multi::AdapterSet's layout) or from B [row][16 ranks].
template <class T>
__device__ __forceinline__ void ring_lora_b_issue(const Nf4RingLora<T>& lora, int pi, unsigned char* ls, int row0,
                                                  int nOut, int lane) {
  const Nf4LoraJob<T>& jb = lora.job[pi];
  if (lora.bt) {  // Bᵀ: rank lane / 2, rows row0 + 8·(lane % 2) … + 7 → [rank][16 rows]
    const long k = min(lane / 2, jb.ranks - 1), col = min(row0 + 8 * (lane % 2), nOut - 8);
    nf4_cp_async16(ls + lane * 16, jb.b + k * jb.ldb + col);
  } else {  // B: row row0 + lane / 2, ranks 8·(lane % 2) … + 7 → [row][16 ranks]
    const long row = min(row0 + lane / 2, nOut - 1);
    nf4_cp_async16(ls + lane * 16, jb.b + row * jb.ldb + 8 * (lane % 2));
  }
}

/// acc[n] += the piece's B tile (ring_lora_b_issue's slot `ls`) times its XA (xab, the B-operand
/// fragments of tokens gid + 8n) on the tensor cores: one mma per n-tile.
template <class T, int NT>
__device__ __forceinline__ void ring_lora_b_mma(const unsigned char* ls, bool bt, int lane,
                                                const std::uint32_t (&xab)[NT][2], float (&acc)[NT][4]) {
  const int gid = lane / 4, q = lane % 4;
  std::uint32_t a[4];
  if (bt) {  // [rank][16 rows]: the four 8 × 8 quarters transposed into the A fragment
    const int m = lane / 8;
    const std::uint32_t addr = shared_u32(ls) + static_cast<std::uint32_t>(((m >> 1) * 8 + lane % 8) * 32 + (m & 1) * 16);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(addr));
  } else {  // [row][16 ranks]
    const unsigned char* sb = ls + 32 * gid + 4 * q;
    a[0] = *reinterpret_cast<const std::uint32_t*>(sb);
    a[1] = *reinterpret_cast<const std::uint32_t*>(sb + 256);
    a[2] = *reinterpret_cast<const std::uint32_t*>(sb + 16);
    a[3] = *reinterpret_cast<const std::uint32_t*>(sb + 256 + 16);
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) mma_traits<T>::mma(acc[n], a, xab[n][0], xab[n][1]);
}

/// The end of a ring kernel's tile: every K-warp leaves its partial sums (acc) in slot `rb` of
/// red ([KS][NT·4][32]), one block barrier, and the block adds them in warp order and writes
/// Y[t, row0 + row] (rows < nOut, tokens < `tokens`) rounded to T. The caller alternates two slots,
/// so that a slot is rewritten only after the next barrier, which every thread passes after it
/// has summed this tile.
template <class T, int NT>
__device__ __forceinline__ void ring_tile_sum(float* rb, int KS, int warp, int lane, const float (&acc)[NT][4],
                                              int row0, int tokens, int nOut, T* __restrict__ Y, long ldy) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) rb[(warp * NT * 4 + n * 4 + i) * 32 + lane] = acc[n][i];
  __syncthreads();
  for (int o = static_cast<int>(threadIdx.x); o < 16 * tokens; o += static_cast<int>(blockDim.x)) {
    // c0, c1 of a lane: row gid, tokens 2q, 2q + 1; c2, c3: row gid + 8 (+ 8 tokens per n-tile)
    const int row = o % 16, t = o / 16, n = t / 8, c = t % 8;
    const int l = 4 * (row % 8) + c / 2, i = (row >= 8 ? 2 : 0) + c % 2;
    float v = 0.f;
    for (int w = 0; w < KS; ++w) v += rb[(w * NT * 4 + n * 4 + i) * 32 + l];
    if (row0 + row < nOut) Y[static_cast<long>(t) * ldy + row0 + row] = from_float<T>(v);
  }
}

/// Piece p's XA from the K-warps' partial sums (dxa, nf4_lora_xa_partial's) in one block: they
/// meet in warp order through red (slot 0; two block barriers), scaled by the piece's s and
/// rounded to T into xas[p] [16 tokens × 16 ranks] (tokens outside its mask and ranks past the
/// adapter's give 0).
template <class T, int NT>
__device__ __forceinline__ void ring_lora_xa_reduce(const Nf4RingLora<T>& lora, int p, int KS, int warp, int lane,
                                                    const float (&dxa)[NT][4], float* red, T* xas) {
  const Nf4LoraJob<T>& jb = lora.job[p];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(warp * NT * 4 + n * 4 + i) * 32 + lane] = dxa[n][i];
  __syncthreads();
  for (int o = static_cast<int>(threadIdx.x); o < 256; o += static_cast<int>(blockDim.x)) {
    // d0, d1 of a lane: rank gid, tokens 2q, 2q + 1; d2, d3: rank gid + 8 (+ 8 tokens per n-tile)
    const int jr = o % 16, t = o / 16, n = t / 8, c = t % 8;
    float v = 0.f;
    if (n < NT && jr < jb.ranks && ((jb.tokens >> t) & 1u)) {
      const int l = 4 * (jr % 8) + c / 2, i = (jr >= 8 ? 2 : 0) + c % 2;
      for (int w = 0; w < KS; ++w) v += red[(w * NT * 4 + n * 4 + i) * 32 + l];
    }
    xas[p * 256 + t * 16 + jr] = from_float<T>(jb.s * v);
  }
  __syncthreads();
}

/// The B-operand fragments (xab) of piece pi's XA in xas: tokens gid + 8n, ranks 2q, 2q + 1 and + 8.
template <class T, int NT>
__device__ __forceinline__ void ring_lora_xab(const T* xas, int pi, int lane, std::uint32_t (&xab)[NT][2]) {
  const int gid = lane / 4, q = lane % 4;
  const T* xp = xas + pi * 256 + 2 * q;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    xab[n][0] = *reinterpret_cast<const std::uint32_t*>(xp + (gid + 8 * n) * 16);
    xab[n][1] = *reinterpret_cast<const std::uint32_t*>(xp + (gid + 8 * n) * 16 + 8);
  }
}

/// XA (s·X·Aᵀ rounded to T) of every piece of a ring kernel's LoRA term into xas [jobs][16 tokens
/// × 16 ranks] of shared memory, from the activations the K-warps hold (xr; warp w the K slice
/// [256w, 256w + 256)), and then the B-operand fragments of this warp's piece's XA (xab; `piece`:
/// the warp has piece pi). LM == nf4_lora_self: every block alone (ring_lora_xa_reduce).
/// LM == nf4_lora_cluster: K-warp w's partial
/// sums only in the cluster block of rank w % csize (`xaw`: this warp computes here), in red's slot
/// 1, added in warp order by every block through distributed shared memory between cluster
/// barriers; the last barrier is left pending (the caller waits before it rewrites slot 1 or
/// exits). The first piece's first PG groups of A come loaded (apre).
template <class T, int NT, int LM, int PG>
__device__ __forceinline__ void ring_lora_xa(const Nf4RingLora<T>& lora, int KS, int warp, int lane, bool xaw,
                                             int csize, const std::uint32_t (&xr)[4][NT][8], const uint4 (*apre)[4],
                                             float* red, T* xas, bool piece, int pi, std::uint32_t (&xab)[NT][2]) {
  const int gid = lane / 4, q = lane % 4;
  constexpr bool CL = LM == nf4_lora_cluster;
  if constexpr (LM == nf4_lora_self) {
    {
      float dxa[NT][4];
      nf4_lora_xa_partial<T, NT, PG>(lora.job[0], warp, gid, q, xr, dxa, apre);
      ring_lora_xa_reduce<T, NT>(lora, 0, KS, warp, lane, dxa, red, xas);
    }
#pragma unroll 1
    for (int p = 1; p < lora.jobs; ++p) {
      float dxa[NT][4];
      nf4_lora_xa_partial<T, NT>(lora.job[p], warp, gid, q, xr, dxa);
      ring_lora_xa_reduce<T, NT>(lora, p, KS, warp, lane, dxa, red, xas);
    }
  } else if constexpr (CL) {
    // piece p's XA into xas[p]: the K-warps' partial sums, each in the block of rank w % csize
    // (slot 1 of red), added in warp order (nf4_lora_self's order) by every block of the cluster
    float* xred = red + KS * NT * 4 * 32;
    auto reduce_xa = [&](int p, auto partial) {
      const Nf4LoraJob<T>& jb = lora.job[p];
      if (p > 0) cluster_wait();  // the cluster has read piece p − 1's partial sums
      if (xaw) {
        float dxa[NT][4];
        partial(jb, dxa);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) xred[(warp * NT * 4 + n * 4 + i) * 32 + lane] = dxa[n][i];
      }
      cluster_arrive();
      cluster_wait();  // every block's partial sums are in place
      for (int o = static_cast<int>(threadIdx.x); o < 256; o += static_cast<int>(blockDim.x)) {
        const int jr = o % 16, t = o / 16, n = t / 8, c = t % 8;
        float v = 0.f;
        if (n < NT && jr < jb.ranks && ((jb.tokens >> t) & 1u)) {
          const int l = 4 * (jr % 8) + c / 2, i = (jr >= 8 ? 2 : 0) + c % 2;
          for (int w = 0; w < KS; ++w) v += cluster_load(xred + (w * NT * 4 + n * 4 + i) * 32 + l, w % csize);
        }
        xas[p * 256 + t * 16 + jr] = from_float<T>(jb.s * v);
      }
      cluster_arrive();  // this block has read the others' partial sums (waited for before slot 1 is reused)
    };
    reduce_xa(0, [&](const Nf4LoraJob<T>& jb, float (&dxa)[NT][4]) {
      nf4_lora_xa_partial<T, NT, PG>(jb, warp, gid, q, xr, dxa, apre);
    });
#pragma unroll 1
    for (int p = 1; p < lora.jobs; ++p)
      reduce_xa(p, [&](const Nf4LoraJob<T>& jb, float (&dxa)[NT][4]) {
        nf4_lora_xa_partial<T, NT>(jb, warp, gid, q, xr, dxa);
      });
    __syncthreads();  // xas
  }
  if (piece) ring_lora_xab<T, NT>(xas, pi, lane, xab);
}

/// A one-piece LoRA term's XA per block, handed to the piece's warp alone (nf4_ring_kernel's HO):
/// every warp leaves its partial sums (nf4_lora_xa_partial's) in red's second slot, and every
/// warp but the piece's arrives at named barrier 1 and goes on to its first tile; the piece's warp
/// waits there and adds, for its own B-operand fragments (xab: tokens gid + 8n, ranks 2q, 2q + 1
/// and + 8), the KS warps' sums in warp order, scaled by s and rounded to T: ring_lora_xa_reduce's
/// order and rounding, so the same bits, without the two block barriers and the block-wide sum.
/// The second slot is next written after the first tile's block barrier, which the piece's warp
/// reaches only after this.
template <class T, int NT, int PG>
__device__ __forceinline__ void ring_lora_xa_handoff(const Nf4RingLora<T>& lora, int KS, int warp, int lane,
                                                     const std::uint32_t (&xr)[4][NT][8], const uint4 (*apre)[4],
                                                     float* red, bool piece, std::uint32_t (&xab)[NT][2]) {
  const int gid = lane / 4, q = lane % 4;
  const Nf4LoraJob<T>& jb = lora.job[0];
  float* rx = red + KS * NT * 4 * 32;
  {
    float dxa[NT][4];
    nf4_lora_xa_partial<T, NT, PG>(jb, warp, gid, q, xr, dxa, apre);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) rx[(warp * NT * 4 + n * 4 + i) * 32 + lane] = dxa[n][i];
  }
  if (!piece) {
    asm volatile("bar.arrive 1, %0;" ::"r"(KS * 32) : "memory");
    return;
  }
  asm volatile("bar.sync 1, %0;" ::"r"(KS * 32) : "memory");
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    // XA[t][2q + 8h + e] of the accumulators (ring_lora_xa_reduce's indices): lane 4·(2q + e) +
    // gid / 2, element 2h + gid % 2, of n-tile n
    const int t = gid + 8 * n;
    const float* src = rx + (n * 4 + gid % 2) * 32 + 4 * (2 * q) + gid / 2;
    float sum[2][2] = {};
#pragma unroll 1
    for (int w = 0; w < KS; ++w)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) sum[h][e] += src[w * NT * 4 * 32 + 2 * h * 32 + 4 * e];
    const bool on = (jb.tokens >> t) & 1u;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      xab[n][h] = mma_traits<T>::pack(on && 2 * q + 8 * h < jb.ranks ? jb.s * sum[h][0] : 0.f,
                                      on && 2 * q + 8 * h + 1 < jb.ranks ? jb.s * sum[h][1] : 0.f);
  }
}

/// Tensor-core NF4 GEMM for 1…16 bf16/half tokens, blocksize 64, K % 256 == 0, K ≤ 4096
/// (QLoRA decode at the widths of 7-8B models' attention and MLP up/gate projections).
///
/// A block has K / 256 warps; warp w owns the 256 weights [256w, 256w + 256) of every row, keeps
/// its tokens' activations for them in registers for the whole kernel, and walks the block's
/// tiles of 16 rows (blockIdx.x, blockIdx.x + gridDim.x, …). Each tile's codes (16 rows × 128
/// bytes, the 32-byte group u of row r stored at u ^ (r % 4), so that the four rows a half-warp's
/// fragment loads read hit distinct banks) and its 16 × 4 scales come into a per-warp ring of
/// S slots of shared memory by cp.async, S − 1 tiles ahead: loads are in flight independently of the registers and of the other warps, which
/// only meet once per tile to add their partial sums (one barrier, two slots). The arithmetic
/// is nf4_stream_kernel's: a byte of two codes becomes a code pair in the activation type
/// through a lane-private 256-entry table (one PRMT + one LEA + one LDS per byte), four
/// mma.m16n8k16 per 64-weight group with f32 accumulation, and the group's product scaled by
/// its absmax in float. With `wait` (a programmatic dependent launch after X's producer) it
/// builds the table and asks L2 for its first tiles before griddepcontrol.wait, and reads X and
/// W only after it.
///
/// With LORA it also adds the pieces of a LoRA term (QLoRA inference, or a mixed batch of
/// adapters, in one pass over W): warp KS − 1 − p brings piece p's 16 rows × 16 ranks of B (the
/// last warps, as the first ones sum each tile's outputs) with each tile into its ring and adds B·XA to its partial sum on the tensor cores (one
/// mma per n-tile; from Bᵀ by ldmatrix.trans), so Y is rounded once. XA (s·X·Aᵀ, rounded to T)
/// is nf4_lora_shrink_kernel's, the kernel before this one: X is ready when this kernel starts
/// (see there), and only warps with a piece wait for XA, after their first tile's products. With
/// LM == nf4_lora_self there is no shrink kernel: before its first tile each block computes every
/// piece's XA on the tensor cores from the activations its warps hold (each warp its K slice of
/// the piece's A rows; the partial sums added in warp order through shared memory, then scaled
/// and rounded to T as the shrink kernel does), while its first tiles of W are in flight; the
/// first piece's A is asked for at the kernel's start, before the table and the dependency wait.
/// LM == nf4_lora_cluster (launched in thread-block clusters) is the same with A read once per
/// cluster: K-warp w computes its partial sums only in the block of rank w % cluster, into the
/// second partial-sum slot, and every block adds the K-warps' partial sums in warp order from
/// the blocks that hold them (distributed shared memory, between two cluster barriers): XA and
/// Y are bit for bit nf4_lora_self's. The block overwrites that slot (tile 1) or exits only
/// after the cluster's other blocks have read it (a third barrier, waited for there).
///
/// WIDE (nf4_gemm's choice for up to 8 tokens and nf4_ring_wide_min_warps or more K-warps; one
/// n-tile only, for its shared memory): the
/// table's entries 256 bytes apart at a 64 KB-aligned address (128 KB reserved), so that one PRMT
/// of the code byte into the lane's address replaces the PRMT + LEA per lookup.
///
/// HO (LM == nf4_lora_self, one piece): XA handed to the piece's warp alone through a named
/// barrier (ring_lora_xa_handoff), the other warps going on to their first tile at once; the same
/// bits as without.
template <class T, int NT, int LM = nf4_lora_none, int S = nf4_ring_stages, bool WIDE = false, bool HO = false>
__global__ void __launch_bounds__(nf4_ring_max_warps * 32, 1)
    nf4_ring_kernel(const T* __restrict__ X, long ldx, int tokens, int K, const std::uint8_t* __restrict__ packed,
                    const float* __restrict__ absmax, int nOut, T* __restrict__ Y, long ldy, int wait,
                    const __grid_constant__ Nf4RingLora<T> lora) {
  constexpr int RB = nf4_ring_row_bytes, SB = nf4_ring_stage_bytes, LB = nf4_lora_slot_bytes;
  constexpr bool LORA = LM != nf4_lora_none;
  constexpr bool XS = LM == nf4_lora_self || LM == nf4_lora_cluster;  // XA computed in this kernel
  constexpr bool CL = LM == nf4_lora_cluster;
  static_assert(!HO || LM == nf4_lora_self, "HO: XA per block, handed to the piece's warp");
  extern __shared__ __align__(128) unsigned char smem[];
  const int KS = static_cast<int>(blockDim.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int gid = lane / 4, q = lane % 4;
  constexpr int lut_region = WIDE ? 2 * 65536 : nf4_mma_lut_bytes;
  const std::uint32_t sbase = shared_u32(smem);
  const std::uint32_t lut_off = WIDE ? ((sbase + 65535u) & ~65535u) - sbase : 0u;
  std::uint32_t* lut = reinterpret_cast<std::uint32_t*>(smem + lut_off);
  unsigned char* ring = smem + lut_region + warp * S * SB;
  float* red = reinterpret_cast<float*>(smem + lut_region + KS * S * SB);  // [2][KS][NT·4][32]
  // With LORA, piece p is warp KS − 1 − p's (the last warps: the first ones sum the tile's outputs)
  const int pi = KS - 1 - warp;
  [[maybe_unused]] const bool piece = LORA && pi < lora.jobs;
  // and its ring of B tiles
  unsigned char* lring = reinterpret_cast<unsigned char*>(red + 2 * KS * NT * 4 * 32) + pi * S * LB;
  // and (self) every piece's XA [jobs][16 tokens][16 ranks], after the rings
  [[maybe_unused]] T* xas = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(red + 2 * KS * NT * 4 * 32) +
                                                 lora.jobs * S * LB);
  const int tiles = (nOut + 15) / 16, bid = static_cast<int>(blockIdx.x), nb = static_cast<int>(gridDim.x);
  const int mine = tiles > bid ? (tiles - 1 - bid) / nb + 1 : 0;
  const long crow = K / 2, arow = K / 64;
  const std::uint8_t* pc = packed + warp * 128;  // this warp's 128 bytes of a row
  const float* pa = absmax + warp * 4;           // and its 4 scales

  auto issue = [&](int j) {  // tile j of this block into slot j % S (an empty group past the end)
    if (j < mine) {
      const int row0 = (bid + j * nb) * 16;
      unsigned char* st = ring + (j % S) * SB;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = lane / 8 + 4 * i, col = lane % 8;
        const long row = min(row0 + r, nOut - 1);
        nf4_cp_async16(st + r * RB + (((col >> 1) ^ (r & 3)) << 5) + (col & 1) * 16, pc + row * crow + col * 16);
      }
      if (lane < 16) {
        const long row = min(row0 + lane, nOut - 1);
        nf4_cp_async16(st + 16 * RB + lane * 16, pa + row * arow);
      }
      if constexpr (LORA) {
        if (piece) {
          const Nf4LoraJob<T>& jb = lora.job[pi];
          unsigned char* ls = lring + (j % S) * LB;
          if (lora.bt) {  // Bᵀ: rank lane / 2, rows row0 + 8·(lane % 2) … + 7 → [rank][16 rows]
            const long k = min(lane / 2, jb.ranks - 1), col = min(row0 + 8 * (lane % 2), nOut - 8);
            nf4_cp_async16(ls + lane * 16, jb.b + k * jb.ldb + col);
          } else {  // B: row row0 + lane / 2, ranks 8·(lane % 2) … + 7 → [row][16 ranks]
            const long row = min(row0 + lane / 2, nOut - 1);
            nf4_cp_async16(ls + lane * 16, jb.b + row * jb.ldb + 8 * (lane % 2));
          }
        }
      }
    }
    nf4_cp_async_commit();
  };

  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // cluster: this block's rank and the cluster's size; this warp computes XA's partial sums here
  [[maybe_unused]] const int crank = CL ? cluster_rank() : 0, csize = CL ? cluster_size() : 1;
  [[maybe_unused]] const bool xaw = !CL || warp % csize == crank;
  // self: the first piece's A (a weight: no wait) asked for first, so that its L2 latency passes
  // under the table, the dependency wait and X's loads (all four groups at one n-tile, one at two: registers)
  constexpr int PG = XS ? (NT == 1 ? 4 : 1) : 0;
  [[maybe_unused]] uint4 apre[PG > 0 ? PG : 1][4];
  if constexpr (PG > 0) {
    if (xaw) {
#pragma unroll
      for (int g = 0; g < PG; ++g) nf4_lora_a_load<T>(lora.job[0], warp, gid, q, g, apre[g]);
    }
  }
  if (wait && lane < 16)
    for (int j = 0; j < S - 1 && j < mine; ++j)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(pc + static_cast<long>(min((bid + j * nb) * 16 + lane, nOut - 1)) * crow));
  for (int i = static_cast<int>(threadIdx.x); i < 256 * 32; i += static_cast<int>(blockDim.x)) {
    const int byte = i / 32;
    lut[WIDE ? byte * 64 + i % 32 : i] = mma_traits<T>::pack(nf4_values[byte >> 4], nf4_values[byte & 15]);
  }
  if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
#pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);

  std::uint32_t xr[4][NT][8];
  nf4_ring_load_x<T, NT>(X, ldx, tokens, warp, gid, q, [](int) { return true; }, xr);
  __syncthreads();  // the table

  const std::uint32_t lane_base = shared_u32(lut) + static_cast<std::uint32_t>(lane) * 4u;
  auto lookup = [&](std::uint32_t word, int byte) {
    std::uint32_t addr;
    if constexpr (WIDE) {  // bytes 0, 2, 3 from lane_base (64 KB-aligned table: its byte 1 is 0), byte 1 = the code
      addr = __byte_perm(word, lane_base, 0x7604u | (static_cast<std::uint32_t>(byte) << 4));
    } else {
      const std::uint32_t b = __byte_perm(word, 0u, 0x4440u | static_cast<std::uint32_t>(byte));
      addr = lane_base + (b << 7);
    }
    std::uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
  };
  // LORA: this lane's B-operand fragments of the piece's XA (token gid + 8n, ranks 2q, 2q + 1 and + 8)
  [[maybe_unused]] std::uint32_t xab[NT][2] = {};
  if constexpr (HO)
    ring_lora_xa_handoff<T, NT, PG>(lora, KS, warp, lane, xr, apre, red, piece, xab);
  else if constexpr (XS)
    ring_lora_xa<T, NT, LM, PG>(lora, KS, warp, lane, xaw, csize, xr, apre, red, xas, piece, pi, xab);

#pragma unroll 1
  for (int j = 0; j < mine; ++j) {
    issue(j + S - 1);
    nf4_cp_async_wait<S - 1>();  // tile j has landed (this lane's copies) …
    __syncwarp();                // … and the other lanes' too
    const unsigned char* st = ring + (j % S) * SB;
    const float* sa = reinterpret_cast<const float*>(st + 16 * RB);
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int u = (g ^ (gid & 3)) << 5;  // rows gid and gid + 8 share the swizzle
      const uint2 wa = *reinterpret_cast<const uint2*>(st + gid * RB + u + 8 * q);
      const uint2 wb = *reinterpret_cast<const uint2*>(st + (gid + 8) * RB + u + 8 * q);
      float d[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) d[n][i] = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // bytes k and k + 4 of each row's 8: weights 2k, 2k+1 and 8+2k, 9+2k of the lane's 16
        const std::uint32_t a[4] = {lookup(wa.x, k), lookup(wb.x, k), lookup(wa.y, k), lookup(wb.y, k)};
#pragma unroll
        for (int n = 0; n < NT; ++n) mma_traits<T>::mma(d[n], a, xr[g][n][k], xr[g][n][4 + k]);
      }
      const float sA = sa[gid * 4 + g], sB = sa[(gid + 8) * 4 + g];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][0] = fmaf(sA, d[n][0], acc[n][0]);
        acc[n][1] = fmaf(sA, d[n][1], acc[n][1]);
        acc[n][2] = fmaf(sB, d[n][2], acc[n][2]);
        acc[n][3] = fmaf(sB, d[n][3], acc[n][3]);
      }
    }
    if constexpr (LORA) {  // the piece's 16 rows of B times its XA
      if (piece) {
        if (LM == nf4_lora_shrunk && j == 0) {
          asm volatile("griddepcontrol.wait;" ::: "memory");  // XA: the shrink kernel's output
          const T* xp = lora.xa + pi * 256 + 2 * q;
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            xab[n][0] = __ldcg(reinterpret_cast<const unsigned*>(xp + (gid + 8 * n) * 16));
            xab[n][1] = __ldcg(reinterpret_cast<const unsigned*>(xp + (gid + 8 * n) * 16 + 8));
          }
        }
        ring_lora_b_mma<T, NT>(lring + (j % S) * LB, lora.bt, lane, xab, acc);
      }
    }
    __syncwarp();  // the slot is read: the next iteration's copies may overwrite it
    // The K-warps' partial sums meet (two slots: slot j & 1 is rewritten only after the next
    // barrier, which every thread passes after it has summed this tile).
    float* rb = red + (j & 1) * KS * NT * 4 * 32;
    if constexpr (CL)
      if (j == 1) cluster_wait();  // the cluster has read this block's XA partial sums in slot 1
    ring_tile_sum<T, NT>(rb, KS, warp, lane, acc, (bid + j * nb) * 16, tokens, nOut, Y, ldy);
  }
  if constexpr (CL)
    if (mine < 2) cluster_wait();  // the cluster has read this block's shared memory
  nf4_cp_async_wait<0>();  // nothing in flight when the block exits
}

/// Whether nf4_ring_kernel takes this product: bf16/half, 1…16 tokens, blocksize 64,
/// K % 256 == 0, K ≤ 4096, X rows and the code and scale buffers 16-byte aligned.
template <class T>
bool nf4_ring_ok(long K, int bs, long ldx, const void* x, const void* packed, const void* absmax) {
  return (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && bs == 64 && K % 256 == 0 &&
         K <= 256L * nf4_ring_max_warps && ldx % 8 == 0 && aligned(x, 16) && aligned(packed, 16) &&
         aligned(absmax, 16);
}

/// Whether nf4_ring_kernel can add this LoRA term to a product of K columns and nOut rows:
/// 1…min(16, K / 256) pieces, clusters of 1…nf4_lora_max_cluster blocks, xa and the rows of A and B 16-byte aligned, 1…16 ranks a piece
/// (16 with B's layout), nOut % 8 == 0 with Bᵀ's.
template <class T>
bool nf4_ring_lora_ok(const Nf4RingLora<T>& l, long K, long nOut) {
  if (l.jobs < 1 || l.jobs > nf4_lora_max_jobs || l.jobs > K / 256 || (!l.self && !aligned(l.xa, 16))) return false;
  if (l.cluster < 1 || l.cluster > nf4_lora_max_cluster) return false;
  if (l.bt && nOut % 8) return false;
  for (int i = 0; i < l.jobs; ++i) {
    const Nf4LoraJob<T>& j = l.job[i];
    if (j.ranks < 1 || j.ranks > 16 || (!l.bt && j.ranks != 16) || j.lda % 8 || j.ldb % 8 || !aligned(j.a, 16) ||
        !aligned(j.b, 16))
      return false;
  }
  return true;
}

/// The device's opt-in shared memory per block.
inline int smem_optin() {
  int dev = 0, v = 0;
  LORA_CUDA_CHECK(cudaGetDevice(&dev));
  LORA_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

/// Whether the WIDE table fits with this LoRA term (up to 8 tokens).
template <int S = nf4_ring_stages>
bool nf4_ring_wide_fits(long K, int jobs) {
  const int warps = static_cast<int>(K / 256);
  return jobs == 0 ? true : nf4_ring_smem_bytes<1, true, S, true>(warps, jobs) <= smem_optin();
}

/// nf4_ring_kernel on a persistent grid (tokens ≤ 8: one n-tile; ≤ 16: two). Without a LoRA term
/// a programmatic dependent launch (`pdl`, the default) that waits before it reads X. With one
/// (lora.jobs > 0, nf4_ring_lora_ok): with lora.self the ring kernel alone, launched as without;
/// otherwise nf4_lora_shrink_kernel first (a programmatic dependent launch too if `pdl`), then the
/// ring kernel as its programmatic dependent. With lora.self and lora.cluster > 1 the ring kernel
/// in clusters of that many blocks (nf4_lora_cluster), on as many whole clusters as the device holds.
/// With HO, lora.self and one piece, XA goes to the piece's warp alone (nf4_ring_kernel's HO).
template <class T, int S = nf4_ring_stages, bool WIDE = false, bool HO = false>
void launch_nf4_ring(const T* X, long ldx, int tokens, int K, const std::uint8_t* packed, const float* absmax,
                     int nOut, T* Y, long ldy, cudaStream_t stream, bool pdl = true, const Nf4RingLora<T>& lora = {}) {
  const int warps = K / 256;
  if (WIDE && tokens > 8) fail("launch_nf4_ring: the WIDE table is for up to 8 tokens");
  auto go = [&](auto nt, auto lm, auto ho) {
    constexpr int NT = decltype(nt)::value, LM = decltype(lm)::value;
    constexpr bool LORA = LM != nf4_lora_none;
    if constexpr (LM == nf4_lora_shrunk) {
      launch_maybe_pdl(nf4_lora_shrink_kernel<T, NT>, dim3(static_cast<unsigned>(lora.jobs)),
                       dim3(static_cast<unsigned>(warps * 32)), 0, stream, pdl, X, ldx, tokens, lora);
      LORA_CUDA_CHECK_LAUNCH("nf4_lora_shrink_kernel");
    }
    auto kernel = nf4_ring_kernel<T, NT, LM, S, WIDE, decltype(ho)::value>;
    const int smem = nf4_ring_smem_bytes<NT, LORA, S, WIDE>(warps, lora.jobs);
    // without LoRA the largest layout fits every device the kernels are built for; with it, as much
    // as the device lends
    const int limit = LORA ? std::min(nf4_ring_smem_bytes<NT, LORA, S, WIDE>(nf4_ring_max_warps, nf4_lora_max_jobs),
                                      smem_optin())
                           : nf4_ring_smem_bytes<NT, false, S, WIDE>(nf4_ring_max_warps);
    if (smem > limit) fail("launch_nf4_ring: {} bytes of shared memory for {} LoRA pieces, the device has {}", smem,
                           lora.jobs, limit);
    const int cl = LM == nf4_lora_cluster ? lora.cluster : 1;
    const int c = persistent_capacity(kernel, warps * 32, smem, limit, cl);
    const unsigned blocks = std::min<unsigned>(ceil_div(ceil_div(nOut, 16), cl) * cl, static_cast<unsigned>(c));
    launch_cluster_maybe_pdl(kernel, dim3(blocks), dim3(static_cast<unsigned>(warps * 32)),
                             static_cast<std::size_t>(smem), stream, pdl || LM == nf4_lora_shrunk, cl, X, ldx, tokens,
                             K, packed, absmax, nOut, Y, ldy, pdl && LM != nf4_lora_shrunk ? 1 : 0, lora);
  };
  auto with_nt = [&](auto lm, auto ho) {
    if (tokens <= 8)
      go(std::integral_constant<int, 1>{}, lm, ho);
    else if constexpr (!WIDE)
      go(std::integral_constant<int, 2>{}, lm, ho);
  };
  auto with_nt_plain = [&](auto lm) { with_nt(lm, std::false_type{}); };
  if (lora.jobs == 0)
    with_nt_plain(std::integral_constant<int, nf4_lora_none>{});
  else if (lora.self && lora.cluster > 1)
    with_nt_plain(std::integral_constant<int, nf4_lora_cluster>{});
  else if (lora.self && HO && lora.jobs == 1)
    with_nt(std::integral_constant<int, nf4_lora_self>{}, std::bool_constant<HO>{});
  else if (lora.self)
    with_nt_plain(std::integral_constant<int, nf4_lora_self>{});
  else
    with_nt_plain(std::integral_constant<int, nf4_lora_shrunk>{});
}

/// Whether the tensor-core path takes this product: bf16/half activations, K % 256 == 0,
/// blocksize ≥ 64, rows of X 16-byte aligned.
template <class T>
bool nf4_stream_ok(int K, int bs, long ldx, const void* x) {
  return (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && K % 256 == 0 && bs >= 64 &&
         ldx % 8 == 0 && aligned(x, 16);
}

}  // namespace detail

namespace detail {

/// Y = X·dequant(W)ᵀ for 1..16 tokens without forming the dequantised W (QLoRA
/// decode); W is an NF4 [out × in] tensor with in % 32 == 0.
template <class S>
void nf4_gemm(const Nf4Parts& W, DeviceView<const S> X, DeviceView<S> Y, const CudaContext& ctx) {
  using T = device_t<S>;
  if (X.cols != W.cols) fail("nf4_gemm: X has {} columns, expected in_features = {}", X.cols, W.cols);
  if (X.rows < 1 || X.rows > 16) fail("nf4_gemm: tokens must be in [1, 16], got {}", X.rows);
  if (Y.rows != X.rows || Y.cols != W.rows)
    fail("nf4_gemm: Y is [{} x {}], expected [{} x {}]", Y.rows, Y.cols, X.rows, W.rows);
  constexpr long V = 16 / sizeof(S);
  if (W.cols % 32 || X.ld % V || !aligned16<S>(X.data))
    fail("nf4_gemm: in_features ({}) must be a multiple of 32 and X rows 16-byte aligned", W.cols);
  const unsigned blocks = ceil_div(W.rows, nf4_rows);
  auto go = [&](auto kernel) {
    kernel<<<blocks, nf4_threads, 0, ctx.stream()>>>(reinterpret_cast<const T*>(X.data), X.ld,
                                                              static_cast<int>(X.rows), static_cast<int>(X.cols),
                                                              W.packed, W.absmax, W.blocksize,
                                                              static_cast<int>(W.rows), reinterpret_cast<T*>(Y.data),
                                                              Y.ld);
  };
  // 1…16 bf16/half tokens, blocksize 64, K % 256 == 0, K ≤ 4096: the copy-ring tensor-core
  // kernel. Otherwise 2…16 bf16/half tokens, K % 256 == 0, blocksize ≥ 64: the streaming
  // tensor-core kernel. One bf16/half token: the byte-pair kernel where it applies; otherwise
  // the CUDA-core kernel.
  if constexpr (!std::is_same_v<T, float>) {
    if (nf4_ring_ok<T>(W.cols, W.blocksize, X.ld, X.data, W.packed, W.absmax)) {
      // Up to 8 tokens with the WIDE table (one n-tile: it fits beside the ring) where it costs no
      // occupancy (nf4_ring_wide_min_warps; below, two blocks of the narrow kernel fit per SM and
      // one of the WIDE). Otherwise the narrow table.
      const bool wide = X.rows <= 8 && W.cols >= 256L * nf4_ring_wide_min_warps;
      auto ring = wide ? launch_nf4_ring<T, nf4_ring_stages, true> : launch_nf4_ring<T, nf4_ring_stages, false>;
      ring(reinterpret_cast<const T*>(X.data), X.ld, static_cast<int>(X.rows), static_cast<int>(W.cols), W.packed,
           W.absmax, static_cast<int>(W.rows), reinterpret_cast<T*>(Y.data), Y.ld, ctx.stream(), true, {});
      LORA_CUDA_CHECK_LAUNCH("nf4_ring_kernel");
      return;
    }
    if (X.rows >= 2 && nf4_stream_ok<T>(static_cast<int>(W.cols), W.blocksize, X.ld, X.data)) {
      auto stream = [&](auto launch) {
        launch(reinterpret_cast<const T*>(X.data), X.ld, static_cast<int>(X.rows), static_cast<int>(X.cols),
               W.packed, W.absmax, W.blocksize, static_cast<int>(W.rows), reinterpret_cast<T*>(Y.data),
               Y.ld, ctx.stream());
      };
      // The narrow table and the barrier reduction (tune_nf4 times the alternatives). The
      // last-warp form hands off through a shared counter that compute-sanitizer's racecheck
      // cannot follow, so the library keeps the form the sanitizer checks.
      if (X.rows <= 8)
        stream(launch_nf4_stream<T, 1, false, false>);
      else
        stream(launch_nf4_stream<T, 2, false, false>);
      LORA_CUDA_CHECK_LAUNCH("nf4_stream_kernel");
      return;
    }
  }
  // One bf16/half token, K % 1024 == 0, K ≤ 16384: the byte-pair CUDA-core kernel for the rows
  // in whole batches of 4, the general kernel for the last nOut % 4 rows.
  if constexpr (!std::is_same_v<T, float>) {
    if (X.rows == 1 && nf4_byte_pair_ok<T>(W.cols, W.blocksize, X.data)) {
      const int K = static_cast<int>(W.cols), nOut = static_cast<int>(W.rows);
      launch_nf4_byte_pair<T>(reinterpret_cast<const T*>(X.data), K, W.packed, W.absmax, W.blocksize,
                                 nOut, reinterpret_cast<T*>(Y.data), ctx.stream());
      LORA_CUDA_CHECK_LAUNCH("nf4_byte_pair_kernel");
      const int done = nOut / nf4_pair_rows * nf4_pair_rows;
      if (done < nOut) {
        const long off = static_cast<long>(done) * K;  // K % blocksize == 0: whole blocks
        nf4_gemv_kernel<T, 1, nf4_rows>
            <<<ceil_div(nOut - done, nf4_rows), nf4_threads, 0, ctx.stream()>>>(
                reinterpret_cast<const T*>(X.data), X.ld, 1, K, W.packed + off / 2,
                W.absmax + off / W.blocksize, W.blocksize, nOut - done, reinterpret_cast<T*>(Y.data) + done,
                Y.ld);
        LORA_CUDA_CHECK_LAUNCH("nf4_gemv_kernel");
      }
      return;
    }
  }
  if (X.rows == 1)
    go(nf4_gemv_kernel<T, 1, nf4_rows>);
  else if (X.rows <= 4)
    go(nf4_gemv_kernel<T, 4, nf4_rows>);
  else
    go(nf4_gemv_kernel<T, 16, nf4_rows>);
  LORA_CUDA_CHECK_LAUNCH("nf4_gemv_kernel");
}

/// Y = X·dequant(W)ᵀ plus a LoRA term's pieces (Nf4RingLora, its xa buffer included) in one
/// pass over W: up to nf4_lora_self_max pieces nf4_ring_kernel alone (every block computes XA),
/// more nf4_lora_shrink_kernel and then nf4_ring_kernel (the WIDE table for up to 8 tokens
/// where nf4_gemm takes it and it fits beside the pieces' rings; every block computing XA, the
/// narrow table, which was the faster there: docs/performance.md). For 1…16 bf16/half tokens
/// where nf4_ring_ok and nf4_ring_lora_ok hold; otherwise it launches nothing and returns false.
template <class S>
bool nf4_gemm_lora(const Nf4Parts& W, DeviceView<const S> X, DeviceView<S> Y, Nf4RingLora<device_t<S>> lora,
                   const CudaContext& ctx) {
  lora.self = lora.jobs <= nf4_lora_self_max;
  using T = device_t<S>;
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    if (X.rows < 1 || X.rows > 16 || X.cols != W.cols || Y.rows != X.rows || Y.cols != W.rows) return false;
    if (!nf4_ring_ok<T>(W.cols, W.blocksize, X.ld, X.data, W.packed, W.absmax) ||
        !nf4_ring_lora_ok<T>(lora, W.cols, W.rows))
      return false;
    const bool wide = X.rows <= 8 && !lora.self && W.cols >= 256L * nf4_ring_wide_min_warps &&
                      nf4_ring_wide_fits(W.cols, lora.jobs);
    auto ring = wide ? launch_nf4_ring<T, nf4_ring_stages, true> : launch_nf4_ring<T, nf4_ring_stages, false>;
    ring(reinterpret_cast<const T*>(X.data), X.ld, static_cast<int>(X.rows), static_cast<int>(W.cols), W.packed,
         W.absmax, static_cast<int>(W.rows), reinterpret_cast<T*>(Y.data), Y.ld, ctx.stream(), true, lora);
    LORA_CUDA_CHECK_LAUNCH("nf4_ring_kernel (LoRA)");
    return true;
  }
}

constexpr int dq_threads = 256;  // == quant::nested_blocksize: one thread per scale of a nested block

/// partial[b] = Σ absmax[i] in double over block b's fixed strided share (a fixed grid and
/// a fixed tree: the sum does not depend on the schedule); bad = the smallest index of a
/// non-finite value (left at its initial all-ones otherwise).
__global__ inline void dq_sum_kernel(const float* __restrict__ a, long n, double* __restrict__ partial,
                                     unsigned long long* __restrict__ bad) {
  __shared__ double sh[dq_threads];
  double acc = 0.0;
  for (long i = static_cast<long>(blockIdx.x) * dq_threads + threadIdx.x; i < n;
       i += static_cast<long>(gridDim.x) * dq_threads) {
    const float v = a[i];
    if (!isfinite(v)) atomicMin(bad, static_cast<unsigned long long>(i));
    acc += static_cast<double>(v);
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = dq_threads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

/// offset = float(Σ partial / n), one block.
__global__ inline void dq_mean_kernel(const double* __restrict__ partial, int parts, long n, float* __restrict__ offset) {
  __shared__ double sh[dq_threads];
  double acc = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < parts; i += dq_threads) acc += partial[i];
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = dq_threads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *offset = static_cast<float>(sh[0] / static_cast<double>(n));
}

/// One block per 256 scales: nested = max |absmax − offset| (from −FLT_MAX, as the CPU),
/// q = dynamic_encode((absmax − offset)·(1/nested)) with the map `code`.
__global__ inline void dq_quantize_kernel(const float* __restrict__ a, long n, const float* __restrict__ offset_p,
                                          const float* __restrict__ code, std::uint8_t* __restrict__ q,
                                          float* __restrict__ nested) {
  __shared__ float map[256];
  __shared__ float red[dq_threads];
  map[threadIdx.x] = code[threadIdx.x];
  const float offset = *offset_p;
  const long i = static_cast<long>(blockIdx.x) * dq_threads + threadIdx.x;
  const float d = i < n ? __fsub_rn(a[i], offset) : 0.f;
  red[threadIdx.x] = i < n ? fabsf(d) : -FLT_MAX;
  __syncthreads();
  for (int s = dq_threads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  const float m = red[0];
  if (threadIdx.x == 0) nested[blockIdx.x] = m;
  if (i < n) q[i] = quant::dynamic_encode(map, __fmul_rn(d, __fdiv_rn(1.0f, m)));
}

/// absmax[i] = float(float(code[q_i]·nested[i / 256]) + offset): two roundings, as
/// DoubleQuantState::restore (bitsandbytes runs them as separate kernels).
__global__ inline void dq_restore_kernel(const std::uint8_t* __restrict__ q, const float* __restrict__ nested,
                                         const float* __restrict__ code, const float* __restrict__ offset_p, long n,
                                         float* __restrict__ absmax) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  absmax[i] = __fadd_rn(__fmul_rn(code[q[i]], nested[i / dq_threads]), *offset_p);
}

template <class T>
void host_to_device(DeviceBuffer<T>& d, const T* h, std::size_t n, const CudaContext& ctx) {
  d = DeviceBuffer<T>(n);
  if (n) LORA_CUDA_CHECK(cudaMemcpyAsync(d.data(), h, n * sizeof(T), cudaMemcpyHostToDevice, ctx.stream()));
}
template <class T>
std::vector<T> device_to_host(const DeviceBuffer<T>& d, const CudaContext& ctx) {
  std::vector<T> h(d.size());
  if (!h.empty()) LORA_CUDA_CHECK(cudaMemcpyAsync(h.data(), d.data(), h.size() * sizeof(T), cudaMemcpyDeviceToHost,
                                                  ctx.stream()));
  ctx.synchronize();
  return h;
}

}  // namespace detail

namespace quant {

/// An NF4-quantised tensor in device memory: Nf4Tensor<cpu>'s member functions, with device
/// views and buffers in place of host vectors and Eigen matrices. Codes and scales are
/// bit-identical to the CPU's (and bitsandbytes'); with double quantisation the 8-bit scale
/// codes, nested scales, map and offset live on the device too, and the restored scales
/// (absmax()) are the CPU's to the bit, so dequantize gives the CPU's values exactly.
/// Move-only (device buffers).
///
///   auto Wq = lora::quant::Nf4Tensor<lora::cuda>::quantize(W.view(), {.blocksize = 64, .double_quant = true});
///   auto Wq2 = lora::quant::Nf4Tensor<lora::cuda>::from_host(host_nf4);   // or move the host's codes
///   lora::DeviceMatrix<lora::bfloat16> D = Wq.dequantize<lora::bfloat16>();
///   lora::quant::nf4_matmul(Wq, X, Y);                                   // Y = X·dequant(W)ᵀ
template <>
class Nf4Tensor<cuda> {
 public:
  using device_type = cuda;
  using host_type = Nf4Tensor<cpu>;

  Nf4Tensor() = default;

  /// Quantises a contiguous device matrix (float, bfloat16 or half) on the device. With
  /// opts.double_quant the offset (the mean of the scales, summed in double) is read back
  /// once, so this synchronises the stream.
  template <class S>
  static Nf4Tensor quantize(DeviceView<const S> W, Nf4Options opts = {}, std::shared_ptr<CudaContext> ctx = {}) {
    static_assert(is_device_scalar_v<S>, "Nf4Tensor<cuda>::quantize: values must be float, bfloat16 or half");
    using T = lora::detail::device_t<S>;
    detail::check_blocksize(opts.blocksize, "Nf4Tensor<cuda>::quantize");
    if (!W.contiguous())
      lora::detail::fail("Nf4Tensor<cuda>::quantize: input must be contiguous (ld {} != cols {})", W.ld, W.cols);
    Nf4Tensor t(ctx);
    t.shape_ = {static_cast<std::int64_t>(W.rows), static_cast<std::int64_t>(W.cols)};
    t.numel_ = static_cast<std::int64_t>(W.rows) * W.cols;
    t.blocksize_ = opts.blocksize;
    t.dtype_ = source_dtype_of<S>();
    const long n = static_cast<long>(t.numel_), nb = static_cast<long>(num_blocks(n, opts.blocksize));
    t.packed_ = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>(packed_bytes(n)));
    t.absmax_ = DeviceBuffer<float>(static_cast<std::size_t>(nb));
    if (n > 0) {
      lora::detail::nf4_quantize_kernel<T><<<lora::detail::ceil_div(nb, 8), 256, 0, t.stream()>>>(
          reinterpret_cast<const T*>(W.data), n, static_cast<int>(opts.blocksize), t.packed_.data(), t.absmax_.data(),
          nb);
      LORA_CUDA_CHECK_LAUNCH("nf4_quantize_kernel");
    }
    if (opts.double_quant) t.double_quantize();
    return t;
  }

  /// Copies a host tensor (codes, scales, double-quantisation state, shape, dtype) to the device.
  static Nf4Tensor from_host(const host_type& h, std::shared_ptr<CudaContext> ctx = {}) {
    Nf4Tensor t(ctx);
    t.shape_ = h.shape();
    t.numel_ = h.numel();
    t.blocksize_ = h.blocksize();
    t.dtype_ = h.dtype();
    lora::detail::host_to_device(t.packed_, h.packed().data(), h.packed().size(), *t.ctx_);
    lora::detail::host_to_device(t.absmax_, h.absmax().data(), h.absmax().size(), *t.ctx_);
    if (const auto& dq = h.double_quant_state()) {
      t.dq_ = true;
      lora::detail::host_to_device(t.dq_codes_, dq->codes.data(), dq->codes.size(), *t.ctx_);
      lora::detail::host_to_device(t.nested_absmax_, dq->nested_absmax.data(), dq->nested_absmax.size(), *t.ctx_);
      lora::detail::host_to_device(t.nested_code_, dq->nested_code.data(), dq->nested_code.size(), *t.ctx_);
      lora::detail::host_to_device(t.offset_, &dq->offset, 1, *t.ctx_);
    }
    t.ctx_->synchronize();  // the host vectors may go away after we return
    return t;
  }
  /// The host tensor (synchronises): Nf4Tensor<cpu>::from_parts of the device parts.
  host_type to_host() const {
    return host_type::from_parts(shape_, blocksize_, lora::detail::device_to_host(packed_, *ctx_),
                                 dq_ ? std::vector<float>{} : lora::detail::device_to_host(absmax_, *ctx_),
                                 double_quant_state(), dtype_, "Nf4Tensor<cuda>::to_host");
  }

  const std::vector<std::int64_t>& shape() const { return shape_; }
  std::int64_t numel() const { return numel_; }
  /// Rows and columns of a 2-D tensor (a 1-D tensor is [n × 1]).
  Index rows() const { return shape_.empty() ? 1 : static_cast<Index>(shape_[0]); }
  Index cols() const {
    if (shape_.size() < 2) return 1;
    return static_cast<Index>(numel_ / std::max<std::int64_t>(shape_[0], 1));
  }
  std::int64_t blocksize() const { return blocksize_; }
  bool double_quant() const { return dq_; }
  source_dtype dtype() const { return dtype_; }
  void set_dtype(source_dtype d) { dtype_ = d; }
  CudaContext& context() const { return *ctx_; }
  const std::shared_ptr<CudaContext>& context_ptr() const { return ctx_; }

  /// Two codes per byte, first element in the high nibble; ceil(numel/2) bytes on the device.
  const DeviceBuffer<std::uint8_t>& packed() const { return packed_; }
  /// The block scales as dequantisation uses them (restored ones with double quantisation).
  const DeviceBuffer<float>& absmax() const { return absmax_; }
  /// The double-quantisation state copied to the host (synchronises), if any.
  std::optional<DoubleQuantState> double_quant_state() const {
    if (!dq_) return std::nullopt;
    DoubleQuantState s;
    s.codes = lora::detail::device_to_host(dq_codes_, *ctx_);
    s.nested_absmax = lora::detail::device_to_host(nested_absmax_, *ctx_);
    const auto code = lora::detail::device_to_host(nested_code_, *ctx_);
    std::copy(code.begin(), code.end(), s.nested_code.begin());
    s.offset = lora::detail::device_to_host(offset_, *ctx_)[0];
    return s;
  }
  /// The 4-bit code of flat element i (one byte read back: for tests and inspection).
  std::uint8_t code(std::int64_t i) const {
    if (i < 0 || i >= numel_) lora::detail::fail("Nf4Tensor<cuda>::code: index {} outside [0, {})", i, numel_);
    std::uint8_t b = 0;
    LORA_CUDA_CHECK(cudaMemcpyAsync(&b, packed_.data() + (i >> 1), 1, cudaMemcpyDeviceToHost, stream()));
    ctx_->synchronize();
    return (i & 1) ? (b & 0x0F) : (b >> 4);
  }

  /// Dequantises into `out` (numel values in device memory): nf4_code[c]·absmax in float, then
  /// rounded to T (float, bfloat16 or half), the CPU's values to the bit. Stream-ordered.
  template <class T>
  void dequantize_into(T* out) const {
    using D = lora::detail::device_t<T>;
    const long n = static_cast<long>(numel_);
    if (n == 0) return;
    const int bs = static_cast<int>(blocksize_);
    if (n % 8 == 0 && lora::detail::aligned16<T>(out)) {
      constexpr int U = lora::detail::nf4_dequantize_unroll;
      constexpr bool CS = lora::detail::nf4_dequantize_streaming;
      const long groups = n / 8;
      lora::detail::nf4_dequantize_kernel<D, U, CS><<<lora::detail::ceil_div(groups, 256L * U), 256, 0, stream()>>>(
          packed_.data(), absmax_.data(), groups, bs, reinterpret_cast<D*>(out));
    } else {
      lora::detail::nf4_dequantize_scalar_kernel<D><<<lora::detail::ceil_div(n, 256), 256, 0, stream()>>>(
          packed_.data(), absmax_.data(), n, bs, reinterpret_cast<D*>(out));
    }
    LORA_CUDA_CHECK_LAUNCH("nf4_dequantize_kernel");
  }
  /// Into a contiguous device matrix of the tensor's shape.
  template <class T>
  void dequantize_into(DeviceView<T> out) const {
    if (out.rows != rows() || out.cols != cols() || !out.contiguous())
      lora::detail::fail("Nf4Tensor<cuda>::dequantize: output is [{} x {}] (ld {}), expected contiguous [{} x {}]",
                         out.rows, out.cols, out.ld, rows(), cols());
    dequantize_into(out.data);
  }
  /// A new [rows × cols] device matrix of float, bfloat16 or half.
  template <class T = float>
  DeviceMatrix<T> dequantize() const {
    DeviceMatrix<T> m(rows(), cols());
    dequantize_into(m.data());
    return m;
  }

  /// Bytes held: packed codes + scales (+ nested scales, map and offset), as Nf4Tensor<cpu>
  /// counts them (the restored float scales the kernels read are not counted).
  std::int64_t storage_bytes() const {
    std::int64_t b = static_cast<std::int64_t>(packed_.size());
    if (dq_)
      b += static_cast<std::int64_t>(dq_codes_.size() + 4 * nested_absmax_.size() + 4 * 256 + 4);
    else
      b += static_cast<std::int64_t>(4 * absmax_.size());
    return b;
  }
  /// 4 + 32/blocksize, or 4 + 8/blocksize + 32/(256·blocksize) with double quantisation.
  double bits_per_parameter() const { return nf4_bits_per_parameter(blocksize_, dq_); }

  /// Replaces the contents by the quantisation of new values with the same options (the
  /// source dtype is kept).
  template <class S>
  void requantize(DeviceView<const S> W) {
    if (W.rows != rows() || W.cols != cols())
      lora::detail::fail("Nf4Tensor<cuda>::requantize: new values have shape [{} x {}], expected [{} x {}]", W.rows,
                         W.cols, rows(), cols());
    const auto d = dtype_;
    auto shape = shape_;
    *this = quantize(W, {blocksize_, dq_}, ctx_);
    shape_ = std::move(shape);
    dtype_ = d;
  }

  /// The parts the kernels take (2-D view: rows × cols).
  lora::detail::Nf4Parts parts() const {
    return {packed_.data(), absmax_.data(), rows(), cols(), static_cast<int>(blocksize_)};
  }

 private:
  explicit Nf4Tensor(std::shared_ptr<CudaContext> ctx) : ctx_(ctx ? std::move(ctx) : CudaContext::thread_default()) {}
  cudaStream_t stream() const { return ctx_->stream(); }

  /// bitsandbytes' compress_statistics on the device: offset = mean(absmax) (double sum,
  /// rounded to float), 8-bit codes of (absmax − offset) per 256 scales, then the restored
  /// scales replace absmax_.
  void double_quantize() {
    const long nb = static_cast<long>(absmax_.size());
    dq_ = true;
    lora::detail::host_to_device(nested_code_, dynamic_map_signed.data(), 256, *ctx_);
    dq_codes_ = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>(nb));
    nested_absmax_ = DeviceBuffer<float>(static_cast<std::size_t>(num_blocks(nb, nested_blocksize)));
    offset_ = DeviceBuffer<float>(1);
    LORA_CUDA_CHECK(cudaMemsetAsync(offset_.data(), 0, sizeof(float), stream()));
    if (nb == 0) return;
    const int parts = static_cast<int>(std::min<long>(lora::detail::ceil_div(nb, lora::detail::dq_threads * 8), 1024));
    DeviceBuffer<double> partial(static_cast<std::size_t>(parts));
    DeviceBuffer<unsigned long long> bad(1);
    LORA_CUDA_CHECK(cudaMemsetAsync(bad.data(), 0xFF, sizeof(unsigned long long), stream()));
    lora::detail::dq_sum_kernel<<<parts, lora::detail::dq_threads, 0, stream()>>>(absmax_.data(), nb, partial.data(), bad.data());
    LORA_CUDA_CHECK_LAUNCH("dq_sum_kernel");
    lora::detail::dq_mean_kernel<<<1, lora::detail::dq_threads, 0, stream()>>>(partial.data(), parts, nb, offset_.data());
    LORA_CUDA_CHECK_LAUNCH("dq_mean_kernel");
    const auto first_bad = lora::detail::device_to_host(bad, *ctx_)[0];
    if (first_bad != ~0ull) {
      float v = 0;
      LORA_CUDA_CHECK(cudaMemcpy(&v, absmax_.data() + first_bad, sizeof(float), cudaMemcpyDeviceToHost));
      lora::detail::fail("Nf4Tensor<cuda>::quantize (double_quant): absmax[{}] is {}, expected a finite value",
                         first_bad, v);
    }
    lora::detail::dq_quantize_kernel<<<lora::detail::ceil_div(nb, lora::detail::dq_threads), lora::detail::dq_threads, 0, stream()>>>(
        absmax_.data(), nb, offset_.data(), nested_code_.data(), dq_codes_.data(), nested_absmax_.data());
    LORA_CUDA_CHECK_LAUNCH("dq_quantize_kernel");
    lora::detail::dq_restore_kernel<<<lora::detail::ceil_div(nb, 256), 256, 0, stream()>>>(
        dq_codes_.data(), nested_absmax_.data(), nested_code_.data(), offset_.data(), nb, absmax_.data());
    LORA_CUDA_CHECK_LAUNCH("dq_restore_kernel");
  }

  std::shared_ptr<CudaContext> ctx_ = CudaContext::thread_default();
  std::vector<std::int64_t> shape_;
  std::int64_t numel_ = 0;
  std::int64_t blocksize_ = 64;
  source_dtype dtype_ = source_dtype::float32;
  DeviceBuffer<std::uint8_t> packed_;
  DeviceBuffer<float> absmax_;  // restored scales with double quantisation
  bool dq_ = false;
  DeviceBuffer<std::uint8_t> dq_codes_;
  DeviceBuffer<float> nested_absmax_, nested_code_, offset_;
};

/// Y = X·dequant(W)ᵀ on the device for X [T × in] (bfloat16, half or float), Y [T × out]:
/// the fused NF4 kernels for 1..16 tokens (in % 32 == 0, 16-byte aligned rows of X), else
/// dequantise into a stream-ordered temporary [out × in] (cudaMallocAsync) and one cuBLAS
/// GEMM. On W's stream.
template <class S>
void nf4_matmul(const Nf4Tensor<cuda>& W, DeviceView<const S> X, DeviceView<S> Y) {
  const Index out = W.rows(), in = W.cols();
  if (W.shape().size() != 2) lora::detail::fail("nf4_matmul: the NF4 weight must be 2-D, got {} dimensions", W.shape().size());
  if (X.cols != in) lora::detail::fail("nf4_matmul: input has {} columns, the NF4 weight has in_features = {}", X.cols, in);
  lora::detail::require(Y.rows == X.rows && Y.cols == out, "nf4_matmul: ", "output Y", Y.rows, Y.cols, X.rows, out);
  if (X.rows == 0 || out == 0) return;
  constexpr long V = 16 / sizeof(S);
  if (X.rows <= 16 && in % 32 == 0 && X.ld % V == 0 && lora::detail::aligned16<S>(X.data))
    return lora::detail::nf4_gemm<S>(W.parts(), X, Y, W.context());
  lora::detail::StreamMatrix<S> D(out, in, W.context().stream());  // stream-ordered: no cudaFree sync
  W.dequantize_into(D.data());
  lora::detail::gemm<S, S, S>(W.context(), false, true, X.rows, out, in, 1.f, X, DeviceView<const S>(D.view()), 0.f, Y);
}
/// The same into a new [T × out] matrix.
template <class S>
DeviceMatrix<S> nf4_matmul(const Nf4Tensor<cuda>& W, DeviceView<const S> X) {
  DeviceMatrix<S> Y(X.rows, W.rows());
  nf4_matmul<S>(W, X, Y.view());
  return Y;
}

}  // namespace quant

}  // namespace lora
