#pragma once
// NF4 (QLoRA's 4-bit NormalFloat) on the GPU with bitsandbytes' arithmetic:
// one float absmax per block of `blocksize` consecutive elements of the
// flattened tensor (last block may be partial), x·(1/absmax) in float mapped
// through the threshold tree (comparisons with `>`), two codes per byte with the
// first element in the high nibble. Codes are bit-identical to the CPU path
// (lora/quant/nf4.hpp) and to bitsandbytes. Plus dequantisation and a fused
// NF4 GEMV/GEMM for 1..16 tokens (QLoRA decode).

#include <lora/cuda/kernels.cuh>
#include <lora/cuda/runtime.hpp>
#include <lora/quant/nf4.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace lora {

/// An NF4-quantised tensor in device memory; rows × cols, row-major flattening.
struct DeviceNF4 {
  DeviceBuffer<std::uint8_t> packed;  ///< ceil(n / 2) bytes
  DeviceBuffer<float> absmax;         ///< ceil(n / blocksize) floats
  Index rows = 0, cols = 0;
  int blocksize = 64;
  std::int64_t numel() const { return static_cast<std::int64_t>(rows) * cols; }
};

namespace detail {

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

/// out[i] = code[q_i]·absmax[i / bs]: 4 packed bytes → 8 values per thread, so
/// a warp reads 128 contiguous bytes and writes 8·32 contiguous values.
/// Needs n % 8 == 0 and a 16-byte aligned out.
template <class T>
__global__ void nf4_dequantize_kernel(const std::uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                      long groups, int bs, T* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = nf4_values[threadIdx.x];
  __syncthreads();
  const long g = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const unsigned raw = __ldg(reinterpret_cast<const unsigned*>(packed) + g);
  const float a = __ldg(absmax + (g * 8) / bs);
  float v[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned b = (raw >> (8 * i)) & 0xffu;
    v[2 * i] = lut[b >> 4] * a;
    v[2 * i + 1] = lut[b & 15u] * a;
  }
  constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int q = 0; q < 8 / V; ++q) {
    uint4 o;
    T* e = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_float<T>(v[q * V + i]);
    reinterpret_cast<uint4*>(out + g * 8)[q] = o;
  }
}

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

/// Tensor-core NF4 GEMM for 1…16 tokens with bf16 or half activations (QLoRA decode).
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
template <class T>
struct mma_traits;
template <>
struct mma_traits<__nv_bfloat16> {
  __device__ __forceinline__ static std::uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct mma_traits<__half> {
  __device__ __forceinline__ static std::uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

constexpr int nf4_mma_lut_bytes = 256 * 32 * 4;  // lane-private: entry (b, lane) at word b·32 + lane

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
  // Resident blocks per SM × SMs of the current device (cached per device, up to 16).
  static std::atomic<int> cap[16] = {};
  int dev = 0;
  LORA_CUDA_CHECK(cudaGetDevice(&dev));
  int c = cap[dev & 15].load(std::memory_order_relaxed);
  if (c == 0) {
    int per_sm = 0, sms = 0;
    LORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, KS * 32, 0));
    LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    c = std::max(1, per_sm) * sms;
    cap[dev & 15].store(c, std::memory_order_relaxed);
  }
  const unsigned blocks = std::min<unsigned>(ceil_div(nOut, 16), static_cast<unsigned>(c));
  kernel<<<blocks, KS * 32, 0, stream>>>(X, ldx, tokens, K, packed, absmax, bs, nOut, Y, ldy);
}

/// Whether the tensor-core path takes this product: bf16/half activations, K % 64 == 0,
/// blocksize ≥ 64, rows of X 16-byte aligned.
template <class T>
bool nf4_mma_ok(int K, int bs, long ldx, const void* x) {
  return (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && K % 64 == 0 && bs >= 64 &&
         ldx % 8 == 0 && aligned(x, 16);
}
}  // namespace detail

/// Quantises a contiguous device matrix to NF4 (bitsandbytes' blockwise scheme; blocksize 32..4096, a power of two).
template <class S>
DeviceNF4 nf4_quantize(DeviceView<const S> M, int blocksize = 64, CudaContext& ctx = *CudaContext::thread_default()) {
  using T = detail::device_t<S>;
  if (!(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0))
    detail::fail("nf4_quantize: blocksize must be a power of two in [32, 4096], got {}", blocksize);
  if (!M.contiguous()) detail::fail("nf4_quantize: input must be contiguous (ld {} != cols {})", M.ld, M.cols);
  DeviceNF4 q;
  q.rows = M.rows;
  q.cols = M.cols;
  q.blocksize = blocksize;
  const long n = static_cast<long>(q.numel());
  const long nblocks = (n + blocksize - 1) / blocksize;
  q.packed = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>((n + 1) / 2));
  q.absmax = DeviceBuffer<float>(static_cast<std::size_t>(nblocks));
  if (n == 0) return q;
  detail::nf4_quantize_kernel<T><<<detail::ceil_div(nblocks, 8), 256, 0, ctx.stream()>>>(
      reinterpret_cast<const T*>(M.data), n, blocksize, q.packed.data(), q.absmax.data(), nblocks);
  LORA_CUDA_CHECK_LAUNCH("nf4_quantize_kernel");
  return q;
}

/// Dequantises into a contiguous device matrix of the same shape: out = code·absmax.
template <class S>
void nf4_dequantize(const DeviceNF4& q, DeviceView<S> out, CudaContext& ctx = *CudaContext::thread_default()) {
  using T = detail::device_t<S>;
  if (out.rows != q.rows || out.cols != q.cols || !out.contiguous())
    detail::fail("nf4_dequantize: output is [{} x {}] (ld {}), expected contiguous [{} x {}]", out.rows, out.cols,
                 out.ld, q.rows, q.cols);
  const long n = static_cast<long>(q.numel());
  if (n == 0) return;
  if (n % 8 == 0 && detail::aligned16<S>(out.data)) {
    const long groups = n / 8;
    detail::nf4_dequantize_kernel<T><<<detail::ceil_div(groups, 256), 256, 0, ctx.stream()>>>(
        q.packed.data(), q.absmax.data(), groups, q.blocksize, reinterpret_cast<T*>(out.data));
  } else {
    detail::nf4_dequantize_scalar_kernel<T><<<detail::ceil_div(n, 256), 256, 0, ctx.stream()>>>(
        q.packed.data(), q.absmax.data(), n, q.blocksize, reinterpret_cast<T*>(out.data));
  }
  LORA_CUDA_CHECK_LAUNCH("nf4_dequantize_kernel");
}

/// Y = X·dequant(W)ᵀ for 1..16 tokens without forming the dequantised W (QLoRA
/// decode); W is an NF4 [out × in] tensor with in % 32 == 0.
template <class S>
void nf4_gemm(const DeviceNF4& W, DeviceView<const S> X, DeviceView<S> Y,
              CudaContext& ctx = *CudaContext::thread_default()) {
  using T = detail::device_t<S>;
  if (X.cols != W.cols) detail::fail("nf4_gemm: X has {} columns, expected in_features = {}", X.cols, W.cols);
  if (X.rows < 1 || X.rows > 16) detail::fail("nf4_gemm: tokens must be in [1, 16], got {}", X.rows);
  if (Y.rows != X.rows || Y.cols != W.rows)
    detail::fail("nf4_gemm: Y is [{} x {}], expected [{} x {}]", Y.rows, Y.cols, X.rows, W.rows);
  constexpr long V = 16 / sizeof(S);
  if (W.cols % 32 || X.ld % V || !detail::aligned16<S>(X.data))
    detail::fail("nf4_gemm: in_features ({}) must be a multiple of 32 and X rows 16-byte aligned", W.cols);
  const unsigned blocks = detail::ceil_div(W.rows, detail::nf4_rows);
  auto go = [&](auto kernel) {
    kernel<<<blocks, detail::nf4_threads, 0, ctx.stream()>>>(reinterpret_cast<const T*>(X.data), X.ld,
                                                              static_cast<int>(X.rows), static_cast<int>(X.cols),
                                                              W.packed.data(), W.absmax.data(), W.blocksize,
                                                              static_cast<int>(W.rows), reinterpret_cast<T*>(Y.data),
                                                              Y.ld);
  };
  // 2…16 bf16/half tokens: the tensor-core kernel (H100, 4096 → 14336: 36.5 µs at 16 tokens,
  // against 236 µs for the CUDA-core kernel and 44.5 µs for cuBLAS on bf16 weights). One
  // token stays on the CUDA-core kernel (24.9 µs against 28.7 µs; docs/performance.md).
  if constexpr (!std::is_same_v<T, float>) {
    if (X.rows >= 2 && detail::nf4_mma_ok<T>(static_cast<int>(W.cols), W.blocksize, X.ld, X.data)) {
      auto mma = [&](auto launch) {
        launch(reinterpret_cast<const T*>(X.data), X.ld, static_cast<int>(X.rows), static_cast<int>(X.cols),
               W.packed.data(), W.absmax.data(), W.blocksize, static_cast<int>(W.rows), reinterpret_cast<T*>(Y.data),
               Y.ld, ctx.stream());
      };
      if (X.rows <= 8)
        mma(detail::launch_nf4_mma<T, 1, 8, 2>);
      else
        mma(detail::launch_nf4_mma<T, 2, 8, 2>);
      LORA_CUDA_CHECK_LAUNCH("nf4_mma_kernel");
      return;
    }
  }
  if (X.rows == 1)
    go(detail::nf4_gemv_kernel<T, 1, detail::nf4_rows>);
  else if (X.rows <= 4)
    go(detail::nf4_gemv_kernel<T, 4, detail::nf4_rows>);
  else
    go(detail::nf4_gemv_kernel<T, 16, detail::nf4_rows>);
  LORA_CUDA_CHECK_LAUNCH("nf4_gemv_kernel");
}

/// Copies packed codes and absmax to the host (for tests and saving).
inline std::pair<std::vector<std::uint8_t>, std::vector<float>> to_host(const DeviceNF4& q) {
  std::vector<std::uint8_t> p(q.packed.size());
  std::vector<float> a(q.absmax.size());
  LORA_CUDA_CHECK(cudaDeviceSynchronize());
  if (!p.empty()) LORA_CUDA_CHECK(cudaMemcpy(p.data(), q.packed.data(), p.size(), cudaMemcpyDeviceToHost));
  if (!a.empty())
    LORA_CUDA_CHECK(cudaMemcpy(a.data(), q.absmax.data(), a.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return {std::move(p), std::move(a)};
}

}  // namespace lora
