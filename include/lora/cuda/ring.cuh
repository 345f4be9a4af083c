#pragma once
// One pass over a bf16/half weight for 1…16 tokens, with a LoRA term in the same kernel: the
// decode regime's base product and adapter without a second launch (docs/cuda.md). The kernel is
// nf4_ring_kernel's (lora/cuda/nf4.cuh) with the weight's own 16-bit values in place of the
// code table: the same K-warps holding their activations in registers, the same per-warp
// cp.async ring, the same LoRA pieces and XA computed in the kernel (per block or per cluster).

#include <lora/cuda/nf4.cuh>

namespace lora::detail {

/// A ring slot of dense_ring_kernel: 16 rows × 64 weights (one group of a K-warp's 256), the
/// 16-byte chunk c of row r stored at chunk c ^ (r % 8) so that the lanes' 16-byte loads of
/// rows gid and gid + 8 hit distinct banks.
constexpr int dense_ring_slot_bytes = 16 * 64 * 2;
/// Slots per warp: S − 1 groups of 2 KB in flight per warp (96 KB per block of 16 K-warps).
constexpr int dense_ring_stages = 4;

/// Dynamic shared memory of dense_ring_kernel with `warps` K-warps and `jobs` LoRA pieces: each
/// warp's ring, two slots of partial sums, and each piece's two slots of B tiles and its XA.
template <int NT, bool LORA = false, int S = dense_ring_stages>
constexpr int dense_ring_smem_bytes(int warps, int jobs = 0) {
  return warps * S * dense_ring_slot_bytes + 2 * warps * NT * 4 * 32 * 4 +
         (LORA ? jobs * (2 * nf4_lora_slot_bytes + 16 * 16 * 2) : 0);
}

/// A lane's fragments of a dense_ring_kernel slot `st`: rows gid and gid + 8 (the same swizzle),
/// weights 16q … 16q + 15 (chunks 2q and 2q + 1): f = {row gid's 2q, 2q + 1; row gid + 8's 2q, 2q + 1}.
__device__ __forceinline__ void dense_slot_load(const unsigned char* st, int gid, int q, uint4 (&f)[4]) {
  const int c0 = ((2 * q) ^ (gid & 7)) << 4, c1 = ((2 * q + 1) ^ (gid & 7)) << 4;
  f[0] = *reinterpret_cast<const uint4*>(st + gid * 128 + c0);
  f[1] = *reinterpret_cast<const uint4*>(st + gid * 128 + c1);
  f[2] = *reinterpret_cast<const uint4*>(st + (gid + 8) * 128 + c0);
  f[3] = *reinterpret_cast<const uint4*>(st + (gid + 8) * 128 + c1);
}

/// Y[t, n] = Σ_k X[t, k]·W[n, k] (+ the LoRA term) for 1…16 bf16/half tokens, W [nOut × K]
/// bf16/half row-major (ldw), K % 256 == 0, K ≤ 4096. With TG, for the tokens of group
/// blockIdx.y (16·y … 16·y + 15 of X, Y and the XA written out; `tokens` counts all groups): the
/// groups' blocks walk the same tiles, so W comes from device memory once and from L2 for the
/// others if they keep pace (they start together on a persistent grid); a piece's token mask is
/// then per group. (TG is a template flag so that the ≤ 16-token kernels keep their registers.)
///
/// A block has K / 256 warps; warp w owns the weights [256w, 256w + 256) of every row and keeps
/// its tokens' activations for them in registers (nf4_ring_load_x), and the block walks the
/// tiles of 16 rows blockIdx.x, blockIdx.x + gridDim.x, … (a persistent grid). A warp's share of
/// a tile is four steps of 16 rows × 64 weights (2 KB), each brought into the warp's ring of S
/// slots by cp.async S − 1 steps ahead, across tiles too; per step each lane reads the 16
/// weights 16q … 16q + 15 of rows gid and gid + 8 (two 16-byte loads per row) and feeds four
/// mma.m16n8k16 with f32 accumulation, the K order inside a group permuted as the activations'
/// are (nf4_ring_kernel's fragment layout, so that its LoRA pieces and XA apply unchanged).
/// The K-warps' partial sums meet once per tile (ring_tile_sum) and Y is rounded once.
/// With LM == nf4_lora_self or nf4_lora_cluster it adds the pieces of a LoRA term as
/// nf4_ring_kernel does (warp KS − 1 − p brings piece p's B tile with the tile's first step and
/// adds B·XA to its partial sum; XA from ring_lora_xa), and with lora.xald > 0 block 0 writes
/// XA out (Nf4RingLora::xald). With AR (and LM == nf4_lora_self) the pieces' A comes through
/// the warps' rings: a piece's four groups (16 ranks × 64 weights of the warp's 256, a W step's
/// shape and layout) into slots 0…3 by cp.async (the first piece's at the kernel's start, before
/// the dependency wait; each next one as the warp has taken the previous one's products), and W's
/// first steps once the last piece's products are taken (without AR the lanes load A into
/// registers, and W's first steps go first). With X2 and two n-tiles, the second n-tile's
/// activations (tokens 8…15) sit in shared memory (ring_x2_bytes per warp) and each step
/// reads the lane's eight words of them, in place of 32 registers (the MMAs and their order as
/// without X2, so the bits too). With `wait` (a programmatic dependent
/// launch) it asks L2 for its first steps before griddepcontrol.wait and reads X and W after it.
template <class T, int NT, int LM = nf4_lora_none, int S = dense_ring_stages, bool AR = true, bool X2 = false,
          bool TG = false>
__global__ void __launch_bounds__(nf4_ring_max_warps * 32, 1)
    dense_ring_kernel(const T* __restrict__ X, long ldx, int tokens, int K, const T* __restrict__ W, long ldw,
                      int nOut, T* __restrict__ Y, long ldy, int wait, const __grid_constant__ Nf4RingLora<T> lora) {
  static_assert(LM != nf4_lora_shrunk, "dense_ring_kernel computes XA itself");
  static_assert(S >= 2 && S <= 5, "a piece's two B slots hold tiles j and j + 1 only while S ≤ 5");
  constexpr bool ARING = AR && LM == nf4_lora_self;
  static_assert(!ARING || S >= 4, "a piece's A takes four slots of each warp's ring");
  // X2: the second n-tile's activations in shared memory (ring_x2_bytes per warp), not registers
  constexpr bool XS2 = X2 && NT == 2;
  static_assert(!XS2 || LM == nf4_lora_none || ARING, "with X2 the pieces' A comes through the rings");
  constexpr int NR = XS2 ? 1 : NT;  // n-tiles of activations in registers
  constexpr int SB = dense_ring_slot_bytes, LB = nf4_lora_slot_bytes;
  constexpr bool LORA = LM != nf4_lora_none;
  constexpr bool CL = LM == nf4_lora_cluster;
  extern __shared__ __align__(128) unsigned char smem[];
  const int KS = static_cast<int>(blockDim.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int gid = lane / 4, q = lane % 4;
  unsigned char* ring = smem + warp * S * SB;
  float* red = reinterpret_cast<float*>(smem + KS * S * SB);  // [2][KS][NT·4][32]
  // With LORA, piece p is warp KS − 1 − p's, with its two slots of B tiles and (after all of
  // them) every piece's XA
  const int pi = KS - 1 - warp;
  [[maybe_unused]] const bool piece = LORA && pi < lora.jobs;
  unsigned char* lring = reinterpret_cast<unsigned char*>(red + 2 * KS * NT * 4 * 32) + pi * 2 * LB;
  [[maybe_unused]] T* xas =
      reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(red + 2 * KS * NT * 4 * 32) + lora.jobs * 2 * LB);
  // X2: this warp's tokens 8…15 for its 256 columns, [group][half][lane] 16-byte words, after XA
  [[maybe_unused]] uint4* x2s =
      reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(red + 2 * KS * NT * 4 * 32) +
                               (LORA ? lora.jobs * (2 * LB + 16 * 16 * 2) : 0)) +
      warp * (ring_x2_bytes / 16);
  const int tiles = (nOut + 15) / 16, bid = static_cast<int>(blockIdx.x), nb = static_cast<int>(gridDim.x);
  const int mine = tiles > bid ? (tiles - 1 - bid) / nb + 1 : 0;
  const int steps = 4 * mine;
  const T* pw = W + 256 * warp;  // this warp's 256 columns of a row
  if constexpr (TG) {  // token group blockIdx.y: tokens [16·y, 16·y + 16) of X and Y
    X += 16L * blockIdx.y * ldx;
    Y += 16L * blockIdx.y * ldy;
    tokens = min(tokens - 16 * static_cast<int>(blockIdx.y), 16);
  }

  auto issue = [&](int i) {  // step i (tile i / 4, group i % 4) into slot i % S (an empty group past the end)
    if (i < steps) {
      const int j = i >> 2, g = i & 3, row0 = (bid + j * nb) * 16;
      unsigned char* st = ring + (i % S) * SB;
#pragma unroll
      for (int u = 0; u < 4; ++u) {  // 128 chunks of 16 bytes: row c / 8, chunk c % 8
        const int c = lane + 32 * u, r = c >> 3, ch = c & 7;
        const long row = min(row0 + r, nOut - 1);
        nf4_cp_async16(st + r * 128 + ((ch ^ (r & 7)) << 4), pw + row * ldw + 64 * g + 8 * ch);
      }
      if constexpr (LORA)
        if (piece && g == 0) ring_lora_b_issue<T>(lora, pi, lring + (j & 1) * LB, row0, nOut, lane);
    }
    nf4_cp_async_commit();
  };

  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  [[maybe_unused]] const int crank = CL ? cluster_rank() : 0, csize = CL ? cluster_size() : 1;
  [[maybe_unused]] const bool xaw = !CL || warp % csize == crank;
  // the first group of the first piece's A (a weight: no wait) asked for first, as nf4_ring_kernel
  // does (one group: with all four, ptxas spills 24–80 bytes here)
  constexpr int PG = LORA && !ARING ? 1 : 0;
  [[maybe_unused]] uint4 apre[PG > 0 ? PG : 1][4];
  if constexpr (PG > 0) {
    if (xaw) {
#pragma unroll
      for (int g = 0; g < PG; ++g) nf4_lora_a_load<T>(lora.job[0], warp, gid, q, g, apre[g]);
    }
  }
  if (wait && lane < 16)
    for (int i = 0; i < S - 1 && i < steps; ++i)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(
          pw + static_cast<long>(min((bid + (i >> 2) * nb) * 16 + lane, nOut - 1)) * ldw + 64 * (i & 3)));
  // AR: piece p's A, group g into slot g (rows past its ranks repeat its last), four commit groups
  [[maybe_unused]] auto issue_a = [&](int p) {
    const Nf4LoraJob<T>& jb = lora.job[p];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      unsigned char* st = ring + g * SB;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = lane + 32 * u, r = c >> 3, ch = c & 7;
        nf4_cp_async16(st + r * 128 + ((ch ^ (r & 7)) << 4),
                       jb.a + static_cast<long>(min(r, jb.ranks - 1)) * jb.lda + 256 * warp + 64 * g + 8 * ch);
      }
      nf4_cp_async_commit();
    }
  };
  if constexpr (ARING) issue_a(0);  // a weight: no wait
  if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (!ARING) {
#pragma unroll
    for (int i = 0; i < S - 1; ++i) issue(i);
  }

  std::uint32_t xr[4][NR][8];
  nf4_ring_load_x<T, NR>(X, ldx, tokens, warp, gid, q, [](int) { return true; }, xr);
  if constexpr (XS2) ring_x2_store(X, ldx, tokens, warp, lane, x2s);
  [[maybe_unused]] auto x2_words = [&](int g, std::uint32_t (&w)[8]) { ring_x2_words(x2s, g, lane, w); };
  [[maybe_unused]] std::uint32_t xab[NT][2] = {};
  if constexpr (LORA) {
    if constexpr (ARING) {  // each piece's partial sums from slots 0…3, then W's steps 0…S − 2
#pragma unroll 1
      for (int p = 0; p < lora.jobs; ++p) {
        float dxa[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) dxa[n][i] = 0.f;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if (g == 0)  // group g has landed (3 − g groups were committed after it) …
            nf4_cp_async_wait<3>();
          else if (g == 1)
            nf4_cp_async_wait<2>();
          else if (g == 2)
            nf4_cp_async_wait<1>();
          else
            nf4_cp_async_wait<0>();
          __syncwarp();  // … for every lane
          uint4 a[4];  // nf4_lora_a_load's fragments, from the slot
          dense_slot_load(ring + g * SB, gid, q, a);
          if constexpr (XS2)  // n-tile 0 here, n-tile 1 below (each accumulator's MMAs in the same order)
            nf4_lora_a_mma<T, 1>(a, reinterpret_cast<const std::uint32_t(&)[1][8]>(xr[g][0]),
                                 reinterpret_cast<float(&)[1][4]>(dxa[0]));
          else
            nf4_lora_a_mma<T, NT>(a, xr[g], dxa);
        }
        if constexpr (XS2) {  // n-tile 1 from shared memory alone: a loop, not unrolled (few registers)
#pragma unroll 1
          for (int g = 0; g < 4; ++g) {
            uint4 a[4];
            dense_slot_load(ring + g * SB, gid, q, a);
            std::uint32_t w[1][8];
            x2_words(g, w[0]);
            nf4_lora_a_mma<T, 1>(a, w, reinterpret_cast<float(&)[1][4]>(dxa[1]));
          }
        }
        __syncwarp();  // the slots are read: the next piece's A, or W's first steps, may overwrite them
        if (p + 1 < lora.jobs) {
          issue_a(p + 1);
        } else {
#pragma unroll
          for (int i = 0; i < S - 1; ++i) issue(i);
        }
        ring_lora_xa_reduce<T, NT>(lora, p, KS, warp, lane, dxa, red, xas);
      }
      if (piece) ring_lora_xab<T, NT>(xas, pi, lane, xab);
    } else {
      ring_lora_xa<T, NT, LM, PG>(lora, KS, warp, lane, xaw, csize, xr, apre, red, xas, piece, pi, xab);
    }
    if (lora.xald > 0 && bid == 0)  // XA for the caller (the fused backward reads it)
      for (int o = static_cast<int>(threadIdx.x); o < tokens * lora.xacols; o += static_cast<int>(blockDim.x)) {
        const int t = o / lora.xacols, c = o % lora.xacols;
        lora.xa[((TG ? 16L * blockIdx.y : 0L) + t) * lora.xald + c] =
            c < 16 * lora.jobs ? xas[(c / 16) * 256 + t * 16 + c % 16] : from_float<T>(0.f);
      }
  }

#pragma unroll 1
  for (int j = 0; j < mine; ++j) {
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int i = 4 * j + g;
      issue(i + S - 1);
      nf4_cp_async_wait<S - 1>();  // step i has landed (this lane's copies) …
      __syncwarp();                // … and the other lanes' too
      const unsigned char* st = ring + (i % S) * SB;
      uint4 f[4];
      dense_slot_load(st, gid, q, f);
      __syncwarp();  // the slot is read: the copies issued next may overwrite it
      const std::uint32_t ra[8] = {f[0].x, f[0].y, f[0].z, f[0].w, f[1].x, f[1].y, f[1].z, f[1].w};
      const std::uint32_t rb[8] = {f[2].x, f[2].y, f[2].z, f[2].w, f[3].x, f[3].y, f[3].z, f[3].w};
      [[maybe_unused]] std::uint32_t w2[8];
      if constexpr (XS2) x2_words(g, w2);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // words k and k + 4 of each row's 8: weights 2k, 2k+1 and 8+2k, 9+2k of the lane's 16
        const std::uint32_t a[4] = {ra[k], rb[k], ra[4 + k], rb[4 + k]};
        if constexpr (XS2) {
          mma_traits<T>::mma(acc[0], a, xr[g][0][k], xr[g][0][4 + k]);
          mma_traits<T>::mma(acc[1], a, w2[k], w2[4 + k]);
        } else {
#pragma unroll
          for (int n = 0; n < NT; ++n) mma_traits<T>::mma(acc[n], a, xr[g][n][k], xr[g][n][4 + k]);
        }
      }
    }
    if constexpr (LORA)  // the piece's 16 rows of B times its XA
      if (piece) ring_lora_b_mma<T, NT>(lring + (j & 1) * LB, lora.bt, lane, xab, acc);
    // The K-warps' partial sums meet (two slots: slot j & 1 is rewritten only after the next
    // barrier, which every thread passes after it has summed this tile).
    if constexpr (CL)
      if (j == 1) cluster_wait();  // the cluster has read this block's XA partial sums in slot 1
    ring_tile_sum<T, NT>(red + (j & 1) * KS * NT * 4 * 32, KS, warp, lane, acc, (bid + j * nb) * 16, tokens, nOut,
                         Y, ldy);
  }
  if constexpr (CL)
    if (mine < 2) cluster_wait();  // the cluster has read this block's shared memory
  nf4_cp_async_wait<0>();  // nothing in flight when the block exits
}

/// How launch_dense_ring's per-block XA gets the pieces' A: the lanes load it into registers; it
/// comes through the warps' rings at one n-tile (≤ 8 tokens) and into registers at two; through
/// the rings at both (the default: as fast at one n-tile, faster at two, docs/performance.md
/// round 9).
enum DenseRingA : int { dense_a_registers = 0, dense_a_ring_one_tile = 1, dense_a_ring = 2 };

/// The most tokens launch_dense_ring takes: groups of 16 on the grid's y (each group's blocks read W).
constexpr int dense_ring_max_tokens = 64;
/// The most tokens for which the planner times the ring path: above 16 (token groups) it runs
/// when a caller fixes FusedForward::ring, and is not a candidate until measured on the GPU
/// (docs/performance.md, "Prepared for the next lease").
constexpr int dense_ring_plan_max_tokens = 16;

/// Whether dense_ring_kernel takes this product: bf16/half, 1…dense_ring_max_tokens tokens,
/// K % 256 == 0, K ≤ 4096, rows of X and W 16-byte aligned.
template <class T>
bool dense_ring_ok(long K, int tokens, long ldx, const void* x, long ldw, const void* w) {
  return (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) && tokens >= 1 &&
         tokens <= dense_ring_max_tokens &&
         K % 256 == 0 && K <= 256L * nf4_ring_max_warps && ldx % 8 == 0 && ldw % 8 == 0 && aligned(x, 16) &&
         aligned(w, 16);
}

/// dense_ring_kernel on a persistent grid (tokens ≤ 8: one n-tile; ≤ 16: two; up to
/// dense_ring_max_tokens: groups of 16 tokens at two n-tiles (TG), the grid's blocks shared among
/// the groups, XA per block, every piece's mask holding all 16 tokens of a group; there with X2
/// and A through the rings where the shared memory holds them, whatever X2 and AM say: ptxas
/// spills 40–72 B in the register forms with TG), a programmatic dependent launch when `pdl`. With
/// a LoRA term (lora.jobs > 0, nf4_ring_lora_ok; lora.xa unused) XA is computed per block, or
/// with lora.cluster > 1 per cluster of that many blocks (on as many whole clusters as the
/// device holds). Per block, A comes through the rings or into
/// registers as `AM` says (DenseRingA). With X2, at two n-tiles the second one's activations
/// sit in shared memory (without a term, or per block with AM == dense_a_ring, where the shared
/// memory holds them; otherwise as without X2).
template <class T, int S = dense_ring_stages, int AM = dense_a_ring, bool X2 = false>
void launch_dense_ring(const T* X, long ldx, int tokens, int K, const T* W, long ldw, int nOut, T* Y, long ldy,
                       cudaStream_t stream, bool pdl = true, const Nf4RingLora<T>& lora = {}) {
  const int warps = K / 256;
  auto go = [&](auto nt, auto lm, auto x2, auto tg) {
    constexpr int NT = decltype(nt)::value, LM = decltype(lm)::value;
    constexpr bool LORA = LM != nf4_lora_none, XK = decltype(x2)::value, TGK = decltype(tg)::value;
    constexpr bool ARK = AM == dense_a_ring || (AM == dense_a_ring_one_tile && NT == 1) || (TGK && XK);
    auto kernel = dense_ring_kernel<T, NT, LM, S, ARK, XK, TGK>;
    const int smem = dense_ring_smem_bytes<NT, LORA, S>(warps, lora.jobs) + (XK ? warps * ring_x2_bytes : 0);
    const int limit = XK     ? smem_optin()
                      : LORA ? std::min(dense_ring_smem_bytes<NT, LORA, S>(nf4_ring_max_warps, nf4_lora_max_jobs),
                                        smem_optin())
                             : dense_ring_smem_bytes<NT, false, S>(nf4_ring_max_warps);
    if (smem > limit) fail("launch_dense_ring: {} bytes of shared memory for {} LoRA pieces, the device has {}", smem,
                           lora.jobs, limit);
    const int cl = LM == nf4_lora_cluster ? lora.cluster : 1;
    const int c = persistent_capacity(kernel, warps * 32, smem, limit, cl);
    const int groups = ceil_div(tokens, 16);
    const int per_group = std::max(cl, c / groups / cl * cl);  // whole clusters
    const unsigned blocks =
        std::min<unsigned>(ceil_div(ceil_div(nOut, 16), cl) * cl, static_cast<unsigned>(per_group));
    launch_cluster_maybe_pdl(kernel, dim3(blocks, static_cast<unsigned>(groups)),
                             dim3(static_cast<unsigned>(warps * 32)), static_cast<std::size_t>(smem), stream, pdl,
                             cl, X, ldx, tokens, K, W, ldw, nOut, Y, ldy, pdl ? 1 : 0, lora);
  };
  auto two_tiles = [&](auto lm, auto tg) {  // token groups (tg) take X2 and A through the rings where they fit
    constexpr int LM = decltype(lm)::value;
    constexpr bool TGK = decltype(tg)::value;
    if constexpr ((X2 || TGK) && (LM == nf4_lora_none || (LM == nf4_lora_self && (AM == dense_a_ring || TGK)))) {
      if (dense_ring_smem_bytes<2, LM != nf4_lora_none, S>(warps, lora.jobs) + warps * ring_x2_bytes <=
          smem_optin())
        return go(std::integral_constant<int, 2>{}, lm, std::true_type{}, tg);
    }
    go(std::integral_constant<int, 2>{}, lm, std::false_type{}, tg);
  };
  auto with_nt = [&](auto lm) {
    constexpr int LM = decltype(lm)::value;
    if (tokens <= 8) {
      go(std::integral_constant<int, 1>{}, lm, std::false_type{}, std::false_type{});
    } else if (tokens <= 16) {
      two_tiles(lm, std::false_type{});
    } else if constexpr (LM != nf4_lora_cluster) {
      two_tiles(lm, std::true_type{});
    } else {
      fail("launch_dense_ring: {} tokens with XA per cluster; clusters take at most 16", tokens);
    }
  };
  if (tokens < 1 || tokens > dense_ring_max_tokens)
    fail("launch_dense_ring: {} tokens, expected 1…{}", tokens, dense_ring_max_tokens);
  if (tokens > 16) {  // every group reads bits 0…15: a piece must take every token (each bit below min(T, 32))
    const unsigned all = tokens >= 32 ? ~0u : (1u << tokens) - 1u;
    for (int p = 0; p < lora.jobs; ++p)
      if ((lora.job[p].tokens & all) != all)
        fail("launch_dense_ring: piece {} has token mask {:#x}; with {} tokens (groups of 16) every piece takes all",
             p, lora.job[p].tokens, tokens);
  }
  if (lora.jobs == 0)
    with_nt(std::integral_constant<int, nf4_lora_none>{});
  else if (lora.cluster > 1)
    with_nt(std::integral_constant<int, nf4_lora_cluster>{});
  else
    with_nt(std::integral_constant<int, nf4_lora_self>{});
}

}  // namespace lora::detail
