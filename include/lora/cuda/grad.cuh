#pragma once
// The fused backward's one pass over dY (docs/cuda.md, "Backward"):
//   G  = s·dY·[B | 0]   [T × gcols], rounded to the scalar type (dX's and dA's operand)
//   dB = dYᵀ·XA         [out × r] in float (XA = s·X·Aᵀ, left in Xp by the forward)
// Both products read the same dY tiles, so dY is read from device memory once instead of
// twice (two cuBLAS GEMMs). Tensor cores (mma.m16n8k16, float accumulation); each block
// owns a [TB tokens × ob outputs] range of dY and writes float partial sums of G (one per
// output range) and of dB (one per token range); a second kernel adds them in a fixed
// order, so the result does not depend on the schedule.

#include <lora/cuda/kernels.cuh>
#include <lora/cuda/runtime.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace lora::detail {

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
/// 16 bytes global → shared, asynchronously; `bytes` = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
/// Four 8×8 matrices of 16-bit values from shared memory (lane l gives row l % 8 of matrix l / 8).
__device__ __forceinline__ void ldsm_x4(std::uint32_t (&v)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
               : "r"(addr));
}
/// The same, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_trans(std::uint32_t (&v)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
               : "r"(addr));
}

/// Rows row0… and columns col0… (col0 a multiple of 8) of a row-major 16-bit matrix src
/// (leading dimension ld) as one 64 × 64 tile in shared memory, 16-byte chunk ch of row t at
/// ch ^ (t & 7) (ldmatrix reads it without bank conflicts, plain and transposed); zeros, and
/// nothing read, past `rows` rows or `cols` columns. THREADS threads (tid) share the copy.
template <int THREADS, class T>
__device__ __forceinline__ void load_tile64(T* dst, const T* src, long ld, int row0, int rows, int col0, int cols,
                                            int tid) {
#pragma unroll
  for (int k = 0; k < 64 * 8 / THREADS; ++k) {
    const int c = tid + k * THREADS, row = c >> 3, ch = c & 7;
    const int gr = row0 + row, gc = col0 + ch * 8;
    const bool ok = gr < rows && gc < cols;
    cp_async16(smem_u32(dst + row * 64 + ((ch ^ (row & 7)) << 3)), ok ? src + static_cast<long>(gr) * ld + gc : src,
               ok ? 16 : 0);
  }
}

/// The four 8 × 8 matrices of one ldmatrix.x4 as the mma B operands (b0, b1) of column groups
/// 2np and 2np + 1.
template <int NJ>
__device__ __forceinline__ void set_b_pair(std::uint32_t (&b)[NJ][2], int np, const std::uint32_t (&v)[4]) {
  b[2 * np][0] = v[0];
  b[2 * np][1] = v[1];
  b[2 * np + 1][0] = v[2];
  b[2 * np + 1][1] = v[3];
}

/// acc[n] += (rows 16w…16w+15 × columns 16ks…16ks+15 of a load_tile64 tile, the mma A operand)
/// · b[n] (k = those 16 columns) for the 8·NJ output columns: warp w's strip of one k step.
template <class T, int NJ>
__device__ __forceinline__ void strip_mma(float (&acc)[NJ][4], const T* tile, const std::uint32_t (&b)[NJ][2], int ks,
                                          int warp, int lane) {
  std::uint32_t a[4];
  const int row = 16 * warp + (lane & 15), ch = 2 * ks + (lane >> 4);
  ldsm_x4(a, smem_u32(tile + row * 64 + ((ch ^ (row & 7)) << 3)));
#pragma unroll
  for (int n = 0; n < NJ; ++n) mma_traits<T>::mma(acc[n], a, b[n][0], b[n][1]);
}

constexpr int dy_pass_threads = 128;  // 4 warps
constexpr int dy_pass_stages = 8;     // dY tiles in the pipeline (8 KB each)

/// Shapes of dy_pass_kernel for N = 8·NJ columns of G and dB (NJ 2: r ≤ 16; NJ 4: r ≤ 32).
template <int NJ, int ST = dy_pass_stages>
struct dy_pass_shape {
  static constexpr int N = NJ * 8;
  /// 64-token tiles per block: each warp keeps G's sums of 16 tokens per tile in registers.
  static constexpr int TT = NJ == 2 ? 8 : 4;
  static constexpr int TB = TT * 64;
  /// 16-byte chunks per row of the XA and B slices in shared memory; chunk c of row t is
  /// stored at c ^ ((t / (8 / CPR)) % CPR), so that ldmatrix's eight rows use all 32 banks.
  static constexpr int CPR = N / 8;
  /// Most outputs per block (the B slice lives in shared memory).
  static constexpr int OB_MAX = NJ == 2 ? 1024 : 512;
  static constexpr int smem_bytes(int ob) { return ST * 64 * 64 * 2 + (TB + ob) * N * 2; }
  __host__ __device__ static constexpr int slice(int row, int ch) { return row * N + ((ch ^ ((row / (8 / CPR)) % CPR)) << 3); }
};

/// One block: tokens [x·TB, x·TB + TB) × outputs [y·ob, y·ob + ob) of dY [rows × out].
/// The block streams its 64 × 64 dY tiles (cp.async, dy_pass_stages deep, XOR-swizzled 16-byte
/// chunks), output tile by output tile, token tiles inner. Warp w multiplies
///   tokens 16w…16w+15 of the tile by the tile's B rows (G, summed in registers over the block's
///   outputs), and
///   the tile's outputs 16w…16w+15, transposed (ldmatrix.trans), by the tile's XA rows (dB, summed
///   over the block's tokens, written per output tile).
/// Partials: gpart[y][rows][N], bpart[x][out][N]. Columns of B and XA past r may hold anything:
/// they only reach partial columns ≥ r, which the reduction does not read.
template <class T, int NJ, int STAGES = dy_pass_stages>
__global__ void __launch_bounds__(dy_pass_threads)
    dy_pass_kernel(const T* __restrict__ dY, long ldy, int rows, int out, const T* __restrict__ Bm, long ldb,
                   const T* __restrict__ XA, long ldx, int ob, float* __restrict__ gpart, float* __restrict__ bpart) {
  using Sh = dy_pass_shape<NJ, STAGES>;
  constexpr int N = Sh::N, TT = Sh::TT, TB = Sh::TB, ST = STAGES, CPR = Sh::CPR;
  extern __shared__ __align__(128) unsigned char dy_pass_smem[];
  T* tiles = reinterpret_cast<T*>(dy_pass_smem);
  T* xs = tiles + ST * 64 * 64;  // [TB × N]: XA of the block's tokens (Sh::slice)
  T* bs = xs + TB * N;           // [ob × N]: B of the block's outputs
  const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
  const int t_begin = static_cast<int>(blockIdx.x) * TB, o_begin = static_cast<int>(blockIdx.y) * ob;
  const int o_count = min(ob, out - o_begin);
  const int n_ot = (o_count + 63) / 64, ntiles = n_ot * TT;

  // The slices (zeros past the last token / output): cp.async group 0.
  for (int c = tid; c < TB * CPR; c += dy_pass_threads) {
    const int row = c / CPR, ch = c % CPR, t = t_begin + row;
    const bool ok = t < rows;
    cp_async16(smem_u32(xs + Sh::slice(row, ch)), ok ? XA + static_cast<long>(t) * ldx + ch * 8 : XA, ok ? 16 : 0);
  }
  for (int c = tid; c < n_ot * 64 * CPR; c += dy_pass_threads) {
    const int row = c / CPR, ch = c % CPR;
    const bool ok = row < o_count;
    cp_async16(smem_u32(bs + Sh::slice(row, ch)), ok ? Bm + static_cast<long>(o_begin + row) * ldb + ch * 8 : Bm,
               ok ? 16 : 0);
  }
  cp_async_commit();

  // Tile i = (output tile i / TT, token tile i % TT) of the block's outputs.
  auto load_tile = [&](int i) {
    load_tile64<dy_pass_threads>(tiles + (i % ST) * 64 * 64, dY, ldy, t_begin + (i % TT) * 64, rows,
                                 o_begin + (i / TT) * 64, o_begin + o_count, tid);
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }

  const int g = lane >> 2, qd = lane & 3, mi = lane >> 3, r8 = lane & 7;
  float gacc[TT][NJ][4] = {};
  for (int ot = 0; ot < n_ot; ++ot) {
    float bacc[NJ][4] = {};
    std::uint32_t bfr[4][NJ][2];  // B of this output tile as mma B operands (k = output, n = column)
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      const int i = ot * TT + tt;
      cp_async_wait<ST - 2>();  // the slices and tile i have landed
      __syncthreads();          // ... for every thread; tile i − 1's stage is free
      if (i + ST - 1 < ntiles) load_tile(i + ST - 1);
      cp_async_commit();
      if (tt == 0) {
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
          for (int np = 0; np < NJ / 2; ++np) {
            std::uint32_t v[4];
            const int row = ot * 64 + ks * 16 + r8 + ((mi & 1) << 3), ch = 2 * np + (mi >> 1);
            ldsm_x4_trans(v, smem_u32(bs + Sh::slice(row, ch)));
            set_b_pair<NJ>(bfr[ks], np, v);
          }
      }
      const T* tile = tiles + (i % ST) * 64 * 64;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        strip_mma<T, NJ>(gacc[tt], tile, bfr[ks], ks, warp, lane);  // G: tokens 16w… × outputs 16ks… (k)
        // dB: outputs 16w… (rows of dYᵀ) × tokens 16ks… (k), times XA of those tokens.
        std::uint32_t a[4];
        {
          const int row = 16 * ks + r8 + ((mi >> 1) << 3), ch = 2 * warp + (mi & 1);
          ldsm_x4_trans(a, smem_u32(tile + row * 64 + ((ch ^ (row & 7)) << 3)));
        }
#pragma unroll
        for (int np = 0; np < NJ / 2; ++np) {
          std::uint32_t v[4];
          const int row = tt * 64 + ks * 16 + r8 + ((mi & 1) << 3), ch = 2 * np + (mi >> 1);
          ldsm_x4_trans(v, smem_u32(xs + Sh::slice(row, ch)));
          mma_traits<T>::mma(bacc[2 * np], a, v[0], v[1]);
          mma_traits<T>::mma(bacc[2 * np + 1], a, v[2], v[3]);
        }
      }
    }
    // This output tile's dB partial: rows o (C fragment rows g, g + 8), columns 8n + 2qd.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int o = ot * 64 + 16 * warp + g + 8 * h;
      if (o < o_count) {
        float* dst = bpart + (static_cast<long>(blockIdx.x) * out + o_begin + o) * N + 2 * qd;
#pragma unroll
        for (int n = 0; n < NJ; ++n)
          *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(bacc[n][2 * h], bacc[n][2 * h + 1]);
      }
    }
  }
#pragma unroll
  for (int tt = 0; tt < TT; ++tt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = t_begin + tt * 64 + 16 * warp + g + 8 * h;
      if (t < rows) {
        float* dst = gpart + (static_cast<long>(blockIdx.y) * rows + t) * N + 2 * qd;
#pragma unroll
        for (int n = 0; n < NJ; ++n)
          *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(gacc[tt][n][2 * h], gacc[tt][n][2 * h + 1]);
      }
    }
}

/// G[t][j] = s·Σ_y gpart[y][t][j] (zeros for r ≤ j < gcols), dB[o][j] = Σ_x bpart[x][o][j]:
/// one thread per element, the partials added in index order.
template <class T>
__global__ void dy_pass_reduce_kernel(const float* __restrict__ gpart, int Q, int rows, int N, int r, int gcols,
                                      float s, T* __restrict__ G, long ldg, const float* __restrict__ bpart, int P,
                                      int out, float* __restrict__ dB, long lddb) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long ng = static_cast<long>(rows) * gcols;
  if (i < ng) {
    const long t = i / gcols;
    const int j = static_cast<int>(i % gcols);
    float v = 0.f;
    if (j < r) {
      for (int q = 0; q < Q; ++q) v += gpart[(static_cast<long>(q) * rows + t) * N + j];
      v *= s;
    }
    G[t * ldg + j] = from_float<T>(v);
    return;
  }
  const long k = i - ng;
  if (k >= static_cast<long>(out) * r) return;
  const long o = k / r;
  const int j = static_cast<int>(k % r);
  float v = 0.f;
  for (int p = 0; p < P; ++p) v += bpart[(static_cast<long>(p) * out + o) * N + j];
  dB[o * lddb + j] = v;
}

/// True when dy_pass can run on these operands: 16-bit T, r ≤ 32, every row of dY, B and XA
/// starting on 16 bytes, out a multiple of 8, and B and XA with 8·⌈r/8⌉ rounded up to 16 or 32
/// readable columns (`readable`).
template <class T>
bool dy_pass_ok(DeviceView<const T> dY, DeviceView<const T> B, DeviceView<const T> XA, Index r, Index readable) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    const Index N = r <= 16 ? 16 : 32;
    return r >= 1 && r <= 32 && readable >= N && dY.cols % 8 == 0 && dY.ld % 8 == 0 && B.ld % 8 == 0 &&
           XA.ld % 8 == 0 && aligned(dY.data, 16) && aligned(B.data, 16) && aligned(XA.data, 16) &&
           dY.rows <= (Index{1} << 30) && dY.cols <= (Index{1} << 30);
  }
}

/// The launch shape of dy_pass for `rows` tokens and `out` outputs: P token ranges of TB tokens,
/// Q output ranges of ob outputs (a multiple of 64, at most OB_MAX), with P·Q near `blocks`
/// (the blocks the device holds at once) when the token ranges alone do not fill it.
struct dy_pass_grid {
  int P = 0, Q = 0, ob = 0;
};
inline dy_pass_grid dy_pass_plan(Index rows, Index out, int TB, int ob_max, int blocks) {
  dy_pass_grid p;
  p.P = static_cast<int>((rows + TB - 1) / TB);
  const int otiles = static_cast<int>((out + 63) / 64);
  const int q_min = (otiles * 64 + ob_max - 1) / ob_max;
  const int q = std::clamp(blocks / std::max(1, p.P), q_min, otiles);
  p.ob = 64 * ((otiles + q - 1) / q);
  p.Q = (otiles * 64 + p.ob - 1) / p.ob;
  return p;
}

/// dy_pass for N = 8·NJ columns and ST pipeline stages; `phases` 1 launches only the partial
/// sums, 2 only the reduction (bench/cuda times them apart), 3 both.
template <class T, int NJ, int ST = dy_pass_stages>
dy_pass_grid dy_pass_launch_grid(Index rows, Index out, int blocks) {
  using Sh = dy_pass_shape<NJ, ST>;
  constexpr int smem_max = Sh::smem_bytes(Sh::OB_MAX);
  const int c = persistent_capacity(dy_pass_kernel<T, NJ, ST>, dy_pass_threads, smem_max, smem_max);
  return dy_pass_plan(rows, out, Sh::TB, Sh::OB_MAX, blocks > 0 ? blocks : c);
}
/// Floats of partial sums the launch for `rows` tokens and `out` outputs needs.
template <class T, int NJ, int ST = dy_pass_stages>
std::size_t dy_pass_need(Index rows, Index out, int blocks = 0) {
  const dy_pass_grid p = dy_pass_launch_grid<T, NJ, ST>(rows, out, blocks);
  return (static_cast<std::size_t>(p.Q) * rows + static_cast<std::size_t>(p.P) * out) * dy_pass_shape<NJ, ST>::N;
}

template <class T, int NJ, int ST = dy_pass_stages>
void launch_dy_pass(cudaStream_t stream, DeviceView<const T> dY, DeviceView<const T> B, DeviceView<const T> XA,
                    Index r, float s, DeviceView<T> G, DeviceView<float> dB, DeviceBuffer<float>& scratch,
                    int blocks, int phases = 3) {
  using Sh = dy_pass_shape<NJ, ST>;
  auto kernel = dy_pass_kernel<T, NJ, ST>;
  const Index rows = dY.rows, out = dY.cols;
  const dy_pass_grid p = dy_pass_launch_grid<T, NJ, ST>(rows, out, blocks);
  const std::size_t need = (static_cast<std::size_t>(p.Q) * rows + static_cast<std::size_t>(p.P) * out) * Sh::N;
  if (scratch.size() < need) scratch = DeviceBuffer<float>(need);
  float* gpart = scratch.data();
  float* bpart = gpart + static_cast<std::size_t>(p.Q) * rows * Sh::N;
  if (p.P > 0 && (phases & 1)) {
    kernel<<<dim3(static_cast<unsigned>(p.P), static_cast<unsigned>(p.Q)), dy_pass_threads, Sh::smem_bytes(p.ob),
             stream>>>(dY.data, dY.ld, static_cast<int>(rows), static_cast<int>(out), B.data, B.ld, XA.data, XA.ld,
                       p.ob, gpart, bpart);
    LORA_CUDA_CHECK_LAUNCH("dy_pass_kernel");
  }
  const long total = static_cast<long>(rows) * G.cols + static_cast<long>(out) * r;
  if (total > 0 && (phases & 2)) {
    dy_pass_reduce_kernel<T><<<ceil_div(total, 256), 256, 0, stream>>>(
        gpart, p.Q, static_cast<int>(rows), Sh::N, static_cast<int>(r), static_cast<int>(G.cols), s, G.data, G.ld,
        bpart, p.P, static_cast<int>(out), dB.data, dB.ld);
    LORA_CUDA_CHECK_LAUNCH("dy_pass_reduce_kernel");
  }
}

/// Floats of `scratch` that dy_pass needs for dY [rows × out] at rank r (it grows a smaller one).
template <class T>
std::size_t dy_pass_scratch_floats(Index rows, Index out, Index r) {
  return r <= 16 ? dy_pass_need<T, 2>(rows, out) : dy_pass_need<T, 4>(rows, out);
}

/// G = s·dY·[B | 0] ([T × G.cols], G.cols ≥ r, zeros past r) and dB = dYᵀ·XA ([out × r], float)
/// from one pass over dY [T × out]. B is [out × ≥ N], XA [T × ≥ N] (N = 16 for r ≤ 16, else 32),
/// both read in their first r columns. Check dy_pass_ok first. `blocks` > 0 overrides the
/// target block count (bench/cuda explores it); partial sums live in `scratch` (grown as needed).
template <class T>
void dy_pass(const CudaContext& ctx, DeviceView<const T> dY, DeviceView<const T> B, DeviceView<const T> XA, Index r,
             float s, DeviceView<T> G, DeviceView<float> dB, DeviceBuffer<float>& scratch, int blocks = 0) {
  if (r <= 16)
    launch_dy_pass<T, 2>(ctx.stream(), dY, B, XA, r, s, G, dB, scratch, blocks);
  else
    launch_dy_pass<T, 4>(ctx.stream(), dY, B, XA, r, s, G, dB, scratch, blocks);
}

}  // namespace lora::detail
