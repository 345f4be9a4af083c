#pragma once
// Kernels of the LoRA device path: the fused decode GEMV (tokens ≤ 16), the
// rank-r update, and the small helpers of DoRA and the spectrum. Each has a
// plain reference it is tested against (tests/cuda/).

#include <lora/cuda/runtime.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace lora::detail {

/// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch
/// (cudaLaunchAttributeProgrammaticStreamSerialization) when `pdl`: the kernel may start
/// before the previous kernel of the stream has finished, and must cudaGridDependencySynchronize
/// (griddepcontrol.wait) before it reads what that kernel writes. With `cluster` > 1, in thread-block
/// clusters of that many blocks (grid.x a multiple of it; sm_90).
template <class... Params, class... Args>
void launch_cluster_maybe_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
                              cudaStream_t stream, bool pdl, int cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n++].val.clusterDim = {static_cast<unsigned>(cluster), 1, 1};
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  LORA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

template <class... Params, class... Args>
void launch_maybe_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                      bool pdl, Args&&... args) {
  launch_cluster_maybe_pdl(kernel, grid, block, smem, stream, pdl, 1, std::forward<Args>(args)...);
}

/// Blocks of `threads` threads with `smem` bytes of dynamic shared memory that the current
/// device holds at once (resident blocks per SM × SMs, at least one per SM): the grid of a
/// persistent kernel. With `cluster` > 1, in clusters of that many blocks: the clusters the
/// device holds at once (cudaOccupancyMaxActiveClusters, at least one) × `cluster`. Computed
/// once per (kernel, device, threads, smem, smem_limit, cluster); the first time, a `smem_limit`
/// > 0 raises the kernel's dynamic shared-memory limit to it.
///
/// The cache is keyed by the kernel's host stub, not by its template: every translation unit
/// that launches a kernel template has its own copy of the kernel (its own module), and the
/// shared-memory limit is an attribute of that copy. A cache shared by all translation units
/// (a static in an inline function is) would let a second TU launch its copy without the
/// raised limit: cudaErrorInvalidValue (tests/cuda/qlora.cu launches nf4.cu's kernels again).
template <class Kernel>
int persistent_capacity(Kernel kernel, int threads, int smem, int smem_limit, int cluster = 1) {
  int dev = 0;
  LORA_CUDA_CHECK(cudaGetDevice(&dev));
  using Key = std::tuple<const void*, int, int, int, int, int>;
  static std::mutex mu;
  static std::map<Key, int> cache;
  const Key key{reinterpret_cast<const void*>(kernel), dev, threads, smem, smem_limit, cluster};
  std::lock_guard<std::mutex> lock(mu);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  if (smem_limit > 0)
    LORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
  int c = 0;
  if (cluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(cluster));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = static_cast<std::size_t>(smem);
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim = {static_cast<unsigned>(cluster), 1, 1};
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    LORA_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    c = std::max(1, clusters) * cluster;
  } else {
    int per_sm = 0, sms = 0;
    LORA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    LORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    c = std::max(1, per_sm) * sms;
  }
  cache.emplace(key, c);
  return c;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

/// 16 bytes of T converted to float (V = 16 / sizeof(T) values).
template <class T>
struct vec16 {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  __device__ __forceinline__ static void load(const T* p, float* out) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(e[i]);
  }
};

template <class T>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline bool aligned(const void* p, std::uintptr_t bytes) { return (reinterpret_cast<std::uintptr_t>(p) % bytes) == 0; }
template <class T>
bool aligned16(const void* p) {
  return aligned(p, 16);
}

/// End of a block-per-rows decode kernel: Y[t, row0 + r] = scale · (Σ over the block's THREADS
/// threads of acc[t][r]) for t < tokens and row0 + r < nrows; warp shuffles, then one slot
/// of `part` per warp.
template <int THREADS, class T, int TMAX, int ROWS>
__device__ __forceinline__ void block_sum_store(const float (&acc)[TMAX][ROWS], float (&part)[THREADS / 32][TMAX * ROWS],
                                                int tokens, int row0, int nrows, float scale, T* __restrict__ Y,
                                                long ldy) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < TMAX; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float v = warp_sum<float>(acc[t][r]);
      if (lane == 0) part[warp][t * ROWS + r] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < TMAX * ROWS; i += THREADS) {
    const int t = i / ROWS, r = i % ROWS, row = row0 + r;
    if (t >= tokens || row >= nrows) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) v += part[w][i];
    Y[t * ldy + row] = from_float<T>(scale * v);
  }
}

constexpr int decode_threads = 128;

/// The decode GEMV (tokens ≤ TMAX ≤ 16) on CUDA cores:
///   Y[t, n] = scale·(Σ_{k<K} X[t, k]·M[n, k] + Σ_{j<Kt} Xt[t, j]·Mt[n, j])
/// for rows n of M, ROWS rows per block; every weight element is read once with
/// 16-byte loads, X stays in L1/L2. The tail (Xt = s·X·Aᵀ, Mt = B) is the
/// rank-r term: when `wait_tail` is set this kernel is a programmatic dependent
/// launch and streams M before waiting for the kernel that writes Xt.
/// Needs K, ldx, ldm multiples of 16/sizeof(T) and 16-byte aligned bases.
template <class T, int TMAX, int ROWS>
__global__ void __launch_bounds__(decode_threads) gemv_kernel(
    const T* __restrict__ X, long ldx, int tokens, int K, const T* __restrict__ M, long ldm, int nrows,
    const T* __restrict__ Xt, long ldxt, int Kt, const T* __restrict__ Mt, long ldmt, bool wait_tail,
    T* __restrict__ Y, long ldy, float scale) {
  constexpr int V = vec16<T>::V;
  const int row0 = static_cast<int>(blockIdx.x) * ROWS;

  float acc[TMAX][ROWS];
#pragma unroll
  for (int t = 0; t < TMAX; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[t][r] = 0.f;

  const int chunks = K / V;
  for (int c = threadIdx.x; c < chunks; c += decode_threads) {
    float w[ROWS][V];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(row0 + r, nrows - 1);
      vec16<T>::load(M + row * ldm + c * V, w[r]);
    }
#pragma unroll
    for (int t = 0; t < TMAX; ++t) {
      if (t < tokens) {
        float x[V];
        vec16<T>::load(X + t * ldx + c * V, x);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int i = 0; i < V; ++i) acc[t][r] = fmaf(x[i], w[r][i], acc[t][r]);
      }
    }
  }
  if (Kt > 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (wait_tail) cudaGridDependencySynchronize();
#endif
    for (int j = threadIdx.x; j < Kt; j += decode_threads) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float b = to_float(Mt[min(row0 + r, nrows - 1) * ldmt + j]);
#pragma unroll
        for (int t = 0; t < TMAX; ++t)
          if (t < tokens) acc[t][r] = fmaf(to_float(__ldcg(Xt + t * ldxt + j)), b, acc[t][r]);
      }
    }
  }

  __shared__ float part[decode_threads / 32][TMAX * ROWS];
  block_sum_store<decode_threads>(acc, part, tokens, row0, nrows, scale, Y, ldy);
}

/// x[i] = a hash of i mapped to [-0.5, 0.5): fixed, non-constant data to time candidates on.
template <class T>
__global__ void fill_hash_kernel(T* __restrict__ x, long rows, long cols, long ld) {
  const long n = rows * cols;
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n; i += gridDim.x * static_cast<long>(blockDim.x)) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[(i / cols) * ld + i % cols] = from_float<T>(static_cast<float>(h & 0xffff) / 65536.f - 0.5f);
  }
}

/// Outputs × tokens per block of stacked_epilogue_kernel.
constexpr int stacked_threads = 128;
constexpr int stacked_tokens = 4;

/// The stacked epilogues' s·XA staging, for a block's TT tokens from t0 (tn of them real):
/// sxa[t][j] = s·C[t0 + t, out + j] for j < r (zeros elsewhere), then the blocks with
/// blockIdx.x 0 write XA[t0 + t, :rp] = [sxa[t, :r] | 0]. Every thread of the block calls it.
template <class T, int TT, int RB>
__device__ __forceinline__ void stacked_stage_xa(float (&sxa)[TT][RB], const T* __restrict__ C, long ldc, int t0,
                                                 int tn, int out, int r, int rp, float s, T* __restrict__ XA,
                                                 long ldxa) {
  for (int i = static_cast<int>(threadIdx.x); i < TT * RB; i += stacked_threads) {
    const int t = i / RB, j = i % RB;
    sxa[t][j] = (t < tn && j < r) ? s * to_float(__ldcg(C + static_cast<long>(t0 + t) * ldc + out + j)) : 0.f;
  }
  __syncthreads();
  if (blockIdx.x == 0)
    for (int i = static_cast<int>(threadIdx.x); i < tn * rp; i += stacked_threads) {
      const int t = i / rp, j = i % rp;
      XA[static_cast<long>(t0 + t) * ldxa + j] = from_float<T>(j < r ? sxa[t][j] : 0.f);
    }
}

/// The stacked forward's epilogue. C = [X·Wᵀ | X·Aᵀ | …] ([T × ≥ out + r], ld ldc) comes from one
/// GEMM over the stacked rows [W; A]; this writes Y = C[:, :out] + s·C[:, out:out+r]·Bᵀ and
/// XA = [s·C[:, out:out+r] | 0] ([T × rp], the fused backward reads it). A block owns
/// stacked_threads outputs (one per thread) of stacked_tokens tokens, whose C values a thread
/// loads at once; blocks with blockIdx.x 0 also write their tokens' XA. B's rows are loaded
/// before the programmatic-dependency wait, so with a PDL launch they overlap the GEMM's tail.
/// RB ≥ r (16, 32 or 64).
template <class T, int RB>
__global__ void __launch_bounds__(stacked_threads)
    stacked_epilogue_kernel(const T* __restrict__ C, long ldc, int tokens, int out, int r, int rp,
                            const T* __restrict__ B, long ldb, float s, T* __restrict__ Y, long ldy,
                            T* __restrict__ XA, long ldxa) {
  __shared__ float sxa[stacked_tokens][RB];
  const int n = static_cast<int>(blockIdx.x) * stacked_threads + static_cast<int>(threadIdx.x);
  const int t0 = static_cast<int>(blockIdx.y) * stacked_tokens;
  const int tn = min(stacked_tokens, tokens - t0);
  float b[RB];
#pragma unroll
  for (int j = 0; j < RB; ++j) b[j] = (n < out && j < r) ? to_float(B[static_cast<long>(n) * ldb + j]) : 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();  // C is the previous kernel's output: read it through L2 (__ldcg)
#endif
  float c[stacked_tokens];
#pragma unroll
  for (int t = 0; t < stacked_tokens; ++t)
    c[t] = (n < out && t < tn) ? to_float(__ldcg(C + static_cast<long>(t0 + t) * ldc + n)) : 0.f;
  stacked_stage_xa(sxa, C, ldc, t0, tn, out, r, rp, s, XA, ldxa);
  if (n >= out) return;
#pragma unroll
  for (int t = 0; t < stacked_tokens; ++t) {
    if (t < tn) {
      float acc = c[t];
#pragma unroll
      for (int j = 0; j < RB; ++j) acc = fmaf(sxa[t][j], b[j], acc);
      Y[static_cast<long>(t0 + t) * ldy + n] = from_float<T>(acc);
    }
  }
}

/// The stacked forward's epilogue with B's rows read once per thread as 16-byte vectors:
/// the same Y = C[:, :out] + s·C[:, out:out+r]·Bᵀ and XA = [s·C[:, out:out+r] | 0] as
/// stacked_epilogue_kernel, but a block owns stacked_threads outputs × TT tokens, so B is read
/// ⌈T / TT⌉ times instead of ⌈T / 4⌉, in RB·sizeof(T)/16 vector loads per row instead of RB
/// scalar ones. Reads B[n, 0..RB) (RB ≤ the readable columns of B's rows, the fused block's rp:
/// zeros past r there, and masked here anyway); needs B 16-byte aligned and ldb a multiple of
/// 16 / sizeof(T).
template <class T, int RB, int TT, int N2 = 1>
__global__ void __launch_bounds__(stacked_threads)
    stacked_epilogue_vec_kernel(const T* __restrict__ C, long ldc, int tokens, int out, int r, int rp,
                                const T* __restrict__ B, long ldb, float s, T* __restrict__ Y, long ldy,
                                T* __restrict__ XA, long ldxa) {
  constexpr int V = vec16<T>::V;
  static_assert(RB % V == 0);
  __shared__ float sxa[TT][RB];
  // N2 outputs per thread, stacked_threads apart (each warp's loads and stores stay contiguous).
  const int n0 = static_cast<int>(blockIdx.x) * stacked_threads * N2 + static_cast<int>(threadIdx.x);
  const int t0 = static_cast<int>(blockIdx.y) * TT;
  const int tn = min(TT, tokens - t0);
  float b[N2][RB];
#pragma unroll
  for (int o = 0; o < N2; ++o) {
    const int n = n0 + o * stacked_threads;
    if (n < out) {
#pragma unroll
      for (int q = 0; q < RB / V; ++q) vec16<T>::load(B + static_cast<long>(n) * ldb + q * V, b[o] + q * V);
#pragma unroll
      for (int j = 0; j < RB; ++j)
        if (j >= r) b[o][j] = 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < RB; ++j) b[o][j] = 0.f;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();  // C is the previous kernel's output: read it through L2 (__ldcg)
#endif
  float c[N2][TT];
#pragma unroll
  for (int o = 0; o < N2; ++o)
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      const int n = n0 + o * stacked_threads;
      c[o][t] = (n < out && t < tn) ? to_float(__ldcg(C + static_cast<long>(t0 + t) * ldc + n)) : 0.f;
    }
  stacked_stage_xa(sxa, C, ldc, t0, tn, out, r, rp, s, XA, ldxa);
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    if (t < tn) {
      float acc[N2];
#pragma unroll
      for (int o = 0; o < N2; ++o) acc[o] = c[o][t];
#pragma unroll
      for (int j = 0; j < RB; ++j) {
        const float x = sxa[t][j];
#pragma unroll
        for (int o = 0; o < N2; ++o) acc[o] = fmaf(x, b[o][j], acc[o]);
      }
#pragma unroll
      for (int o = 0; o < N2; ++o) {
        const int n = n0 + o * stacked_threads;
        if (n < out) Y[static_cast<long>(t0 + t) * ldy + n] = from_float<T>(acc[o]);
      }
    }
  }
}

/// out[n] = Σ_k M[n, k]² in float; one warp per row.
template <class T>
__global__ void row_sqnorm_kernel(const T* __restrict__ M, long ldm, int rows, int cols, float* __restrict__ out) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float acc = 0.f;
  for (int k = lane; k < cols; k += 32) {
    const float v = to_float(M[row * ldm + k]);
    acc = fmaf(v, v, acc);
  }
  acc = warp_sum<float>(acc);
  if (lane == 0) out[row] = acc;
}

/// DoRA's column scale without forming W + s·B·A:
///   ‖w_n + s·b_n·A‖² = ‖w_n‖² + 2s·b_n·p_n + s²·b_n·G·b_nᵀ,  p_n = (W·Aᵀ)[n, :], G = A·Aᵀ,
/// norm[n] = that, square-rooted; c[n] = m[n] / norm[n]. One thread per row.
template <class T>
__global__ void dora_norm_kernel(const float* __restrict__ wn2, const float* __restrict__ P, const float* __restrict__ G,
                                 const T* __restrict__ B, long ldb, int nOut, int r, float s,
                                 const float* __restrict__ m, float* __restrict__ norm, float* __restrict__ c) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= nOut) return;
  float cross = 0.f, quad = 0.f;
  for (int i = 0; i < r; ++i) {
    const float bi = to_float(B[n * ldb + i]);
    cross = fmaf(bi, P[n * r + i], cross);
    float gb = 0.f;
    for (int j = 0; j < r; ++j) gb = fmaf(G[i * r + j], to_float(B[n * ldb + j]), gb);
    quad = fmaf(bi, gb, quad);
  }
  const float v = sqrtf(fmaxf(wn2[n] + 2.f * s * cross + s * s * quad, 0.f));
  norm[n] = v;
  if (c) c[n] = m[n] / v;
}

/// dst[i, j] = c[i]·src[i, j] for a [rows × cols] window (rows of W and B in the fused block).
template <class T>
__global__ void scale_rows_kernel(const T* __restrict__ src, long lds, T* __restrict__ dst, long ldd, int rows,
                                  int cols, const float* __restrict__ c) {
  const int row = blockIdx.y;
  const float f = c[row];
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x)
    dst[row * ldd + j] = from_float<T>(f * to_float(src[row * lds + j]));
}

/// dst[i] = f·src[i] over a contiguous [rows × ld] block in 16-byte vectors (ld % 8 == 0),
/// with f = c[row] for the first `scaled_rows` rows and 1 after them: DoRA's scaled fused
/// block [[c⊙W, c⊙B, 0], [A, 0, 0], [0, 0, 0]] in one pass (src and dst 16-byte aligned).
template <class T>
__global__ void scale_rows_vec_kernel(const T* __restrict__ src, T* __restrict__ dst, long vectors, long ld,
                                      int scaled_rows, const float* __restrict__ c) {
  static_assert(sizeof(T) == 2);
  for (long v = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors;
       v += static_cast<long>(gridDim.x) * blockDim.x) {
    const long row = v * 8 / ld;
    uint4 u = __ldg(reinterpret_cast<const uint4*>(src) + v);
    if (row < scaled_rows) {
      const float f = c[row];
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) e[i] = from_float<T>(f * to_float(e[i]));
    }
    reinterpret_cast<uint4*>(dst)[v] = u;
  }
}

/// Y[t, n] *= c[n] (DoRA's column scale at decode sizes).
template <class T>
__global__ void scale_cols_kernel(T* __restrict__ Y, long ldy, int rows, int cols, const float* __restrict__ c) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(rows) * cols) return;
  const long t = i / cols, n = i % cols;
  Y[t * ldy + n] = from_float<T>(c[n] * to_float(Y[t * ldy + n]));
}

/// M[i, j] *= c[i] (float matrices: DoRA's dB).
__global__ inline void scale_rows_f32_kernel(float* __restrict__ M, long ldm, int rows, int cols,
                                             const float* __restrict__ c) {
  const int i = blockIdx.y;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) M[i * ldm + j] *= c[i];
}

/// dm[n] += Σ_t dY[t, n]·Y[t, n] over a slice of tokens (DoRA: ∂L/∂m_n = Σ_t dY·Y / m_n,
/// applied by dora_finish_dm_kernel). dm must be zeroed first.
template <class T>
__global__ void column_dot_kernel(const T* __restrict__ dY, long lddy, const T* __restrict__ Y, long ldy, int tokens,
                                  int cols, int tokens_per_slice, float* __restrict__ dm) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= cols) return;
  const int t0 = blockIdx.y * tokens_per_slice;
  const int t1 = min(tokens, t0 + tokens_per_slice);
  float acc = 0.f;
  for (int t = t0; t < t1; ++t) acc = fmaf(to_float(dY[t * lddy + n]), to_float(Y[t * ldy + n]), acc);
  atomicAdd(dm + n, acc);
}
__global__ inline void divide_kernel(float* __restrict__ v, const float* __restrict__ d, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) v[i] /= d[i];
}

/// dst (float, ld) = src (T, ld) elementwise over [rows × cols].
template <class T>
__global__ void to_float_kernel(const T* __restrict__ src, long lds, float* __restrict__ dst, long ldd, int rows,
                                int cols) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(rows) * cols) return;
  const long r = i / cols, c = i % cols;
  dst[r * ldd + c] = to_float(src[r * lds + c]);
}

/// Copies the upper triangle of the leading n×n of a column-major geqrf result
/// (ld) into a dense n×n column-major matrix with zeros below the diagonal.
__global__ inline void upper_triangle_kernel(const float* __restrict__ qr, int ld, int n, float* __restrict__ R) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * n) return;
  const int row = i % n, col = i / n;
  R[col * n + row] = row <= col ? qr[col * ld + row] : 0.f;
}

inline unsigned ceil_div(long a, long b) { return static_cast<unsigned>((a + b - 1) / b); }

/// mma.m16n8k16 with f32 accumulation for bf16 and half operands, and packing of a pair of
/// floats into one operand register.
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

/// The one-launch decode forward (FusedPath::stream) on tensor cores: 256 threads per block,
/// one block per tile of 16·MT rows of M = [W; A] (the fused block's tall_padded rows).
constexpr int stream_threads = 256;
/// Most tokens stream_forward_kernel takes (four groups of 8 for mma.m16n8k16's N).
constexpr int stream_max_tokens = 32;
/// Floats of the stream kernel's device state: 4 counters, then s·X·Aᵀ [stream_max_tokens × 64].
constexpr int stream_state_floats = 4 + stream_max_tokens * 64;

__device__ __forceinline__ unsigned load_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

/// Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ for tokens ≤ 8·NG in one launch that reads each element of W once.
/// Each block takes a ticket (atomicAdd on state[0]) that names its tile of R = 16·MT rows of
/// M = [W; A]: the first ⌈r / R⌉ tickets are A's tiles, so a block that waits runs after they
/// have all started. The 8 warps split K in steps of 32; per step a thread loads 16 bytes of
/// rows g and g + 8 of each 16-row part of the tile (g = lane / 4) and of its token's row of X,
/// all at k + 8·(lane % 4), and mma.m16n8k16 (M's rows as the 16-row operand, 8 tokens as N)
/// consumes them: the sum over k runs in a permuted order that both fragments share, and each X
/// fragment serves the MT parts. The warps' sums meet in shared memory. An A tile writes
/// s·X·Aᵀ (float, to state) and [s·X·Aᵀ | 0] (rounded, to XA: the fused backward reads it),
/// then counts itself done in state[1] (release); a W tile loads its rows of B, waits for
/// state[1] = ⌈r / R⌉ (acquire) and writes Y = X·Wᵀ + (s·X·Aᵀ)·Bᵀ. The last block to finish
/// resets the counters for the next launch. Needs K, ldx, ldm multiples of 8, 16-byte aligned
/// X and M, r ≤ 64 and M's rows out … out + R·⌈r / R⌉ readable (zeros past r: the fused block's
/// A_padded rows; R divides 64, so rp covers them).
template <class T, int NG, int MT>
__global__ void __launch_bounds__(stream_threads, 2)
    stream_forward_kernel(const T* __restrict__ X, long ldx, int tokens, int K, const T* __restrict__ M, long ldm,
                          int out, int r, const T* __restrict__ B, long ldb, float s, T* __restrict__ Y, long ldy,
                          T* __restrict__ XA, long ldxa, int rp, unsigned* __restrict__ state) {
  static_assert(sizeof(T) == 2 && (MT == 1 || MT == 2));
  constexpr int U = NG * MT == 1 ? 4 : NG * MT <= 4 ? 2 : 1;  // steps in flight per warp (no spills)
  constexpr int W8 = stream_threads / 32;
  constexpr int TK = 8 * NG, R = 16 * MT;
  __shared__ int tile_s;
  __shared__ float red[W8][TK][R + 1];
  __shared__ float sB[R][64];
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int nA = (r + R - 1) / R;
  float* xa_f = reinterpret_cast<float*>(state + 4);
  if (tid == 0) tile_s = static_cast<int>(atomicAdd(state, 1u));
  __syncthreads();
  const int tile = tile_s;
  const bool a_tile = tile < nA;
  const int row0 = a_tile ? out + R * tile : R * (tile - nA);
  const int row_end = a_tile ? out + R * nA : out;

  const T* mrow[MT][2];
  bool okm[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * m + 8 * h + g;
      okm[m][h] = row < row_end;
      mrow[m][h] = M + static_cast<long>(okm[m][h] ? row : 0) * ldm;
    }
  const T* xr[NG];
  bool okx[NG];
#pragma unroll
  for (int q = 0; q < NG; ++q) {
    okx[q] = q * 8 + g < tokens;
    xr[q] = X + static_cast<long>(okx[q] ? q * 8 + g : 0) * ldx;
  }
  float acc[MT][NG][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int q = 0; q < NG; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][q][i] = 0.f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wv[U][MT][2], xv[U][NG];
  auto load = [&](int u, int k) {  // step u's slot, for the 8 elements at k (none past K)
    const bool ok = k < K;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wv[u][m][h] = ok && okm[m][h] ? __ldg(reinterpret_cast<const uint4*>(mrow[m][h] + k)) : zero;
#pragma unroll
    for (int q = 0; q < NG; ++q) xv[u][q] = ok && okx[q] ? __ldg(reinterpret_cast<const uint4*>(xr[q] + k)) : zero;
  };
  // A warp's U steps are adjacent (32·U contiguous elements of each row per iteration). Each
  // slot is refilled with the next iteration's step as soon as its MMAs have read it, so U
  // loads stay in flight through the loop. The loop's condition is the warp's (kb), never the
  // lane's: mma.sync needs all 32 lanes.
  constexpr int stride = W8 * 32 * U;
#pragma unroll
  for (int u = 0; u < U; ++u) load(u, warp * 32 * U + u * 32 + c * 8);
  for (int kb = warp * 32 * U; kb < K; kb += stride) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const std::uint32_t a_lo[4] = {wv[u][m][0].x, wv[u][m][1].x, wv[u][m][0].y, wv[u][m][1].y};
        const std::uint32_t a_hi[4] = {wv[u][m][0].z, wv[u][m][1].z, wv[u][m][0].w, wv[u][m][1].w};
#pragma unroll
        for (int q = 0; q < NG; ++q) {
          mma_traits<T>::mma(acc[m][q], a_lo, xv[u][q].x, xv[u][q].y);
          mma_traits<T>::mma(acc[m][q], a_hi, xv[u][q].z, xv[u][q].w);
        }
      }
      load(u, kb + stride + u * 32 + c * 8);
    }
  }
  // acc[m][q]: rows 16m + g (0, 1) and 16m + g + 8 (2, 3) of the tile, tokens 8q + 2c (0, 2)
  // and 8q + 2c + 1 (1, 3).
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int q = 0; q < NG; ++q) {
      red[warp][q * 8 + 2 * c][16 * m + g] = acc[m][q][0];
      red[warp][q * 8 + 2 * c + 1][16 * m + g] = acc[m][q][1];
      red[warp][q * 8 + 2 * c][16 * m + g + 8] = acc[m][q][2];
      red[warp][q * 8 + 2 * c + 1][16 * m + g + 8] = acc[m][q][3];
    }
  if (!a_tile)  // this tile's rows of B, before any wait
    for (int i = tid; i < R * 64; i += stream_threads) {
      const int row = i / 64, j = i % 64, n = row0 + row;
      sB[row][j] = (j < r && n < out) ? to_float(B[static_cast<long>(n) * ldb + j]) : 0.f;
    }
  __syncthreads();
  constexpr int PER = (TK * R + stream_threads - 1) / stream_threads;
  float v[PER];
#pragma unroll
  for (int p = 0; p < PER; ++p) {
    const int i = tid + p * stream_threads, t = i / R, row = i % R;
    float sum = 0.f;
    if (i < TK * R)
#pragma unroll
      for (int w = 0; w < W8; ++w) sum += red[w][t][row];
    v[p] = sum;
  }
  const int RX = R * nA;
  if (a_tile) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int i = tid + p * stream_threads, t = i / R, j = R * tile + i % R;
      if (i < TK * R && t < tokens) {
        const float x = j < r ? s * v[p] : 0.f;
        xa_f[t * RX + j] = x;
        XA[static_cast<long>(t) * ldxa + j] = from_float<T>(x);
      }
    }
    if (tile == 0)  // the zero columns of XA past A's tiles
      for (int i = tid; i < tokens * (rp - RX); i += stream_threads) {
        const int t = i / (rp - RX), j = RX + i % (rp - RX);
        XA[static_cast<long>(t) * ldxa + j] = from_float<T>(0.f);
      }
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      atomicAdd(state + 1, 1u);
    }
  } else {
    if (tid == 0) {
      // Bounded (about a second): a broken protocol gives a wrong Y that tests catch, not a hang.
      for (int spin = 0; spin < (1 << 24) && load_acquire_gpu(state + 1) < static_cast<unsigned>(nA); ++spin)
        __nanosleep(64);
      __threadfence();
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int i = tid + p * stream_threads, t = i / R, row = i % R, n = row0 + row;
      if (i < TK * R && t < tokens && n < out) {
        float y = v[p];
        for (int j = 0; j < r; ++j) y = fmaf(__ldcg(xa_f + t * RX + j), sB[row][j], y);
        Y[static_cast<long>(t) * ldy + n] = from_float<T>(y);
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(state + 2, 1u) == gridDim.x - 1) {
      state[0] = 0;
      state[1] = 0;
      state[2] = 0;
      __threadfence();
    }
  }
}

}  // namespace lora::detail
