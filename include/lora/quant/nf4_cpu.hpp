#pragma once
// Y = X·dequant(W)ᵀ on the CPU for a few tokens (T ≤ 16), straight from the
// NF4 codes, in two modes and three instruction-set paths behind one call:
//
//   quant::nf4_gemm(quant::isa::native{}, quant::nf4_view(Wq), X, T, Y, quant::nf4_mode::fast);
//
// exact: bitsandbytes' values, code value × absmax rounded to float, dotted in
//        float (differs from a float64 dot of the same values by float rounding).
// fast:  llama.cpp's scheme: each token quantised per group of 32 to int8
//        (d = max|x|/127), the codes mapped to round(127·code value) (int8),
//        integer dot products per group, scales applied per group.
//
// Paths: isa::avx512 (exact from 16-wide permutes), isa::avx2 (both modes:
// pshufb decode, integer dots; VNNI's vpdpbusd where the target has it) and
// isa::portable (plain loops the compiler vectorises, e.g. to NEON). isa::native
// is the best one the compile target has; a path that is not compiled in does
// not exist as a type. SIMD paths need in_features % 32 == 0 and hand other
// shapes to the portable path.

#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/quant/nf4.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lora::quant {

/// How the product treats the weights and activations (see the header comment).
enum class nf4_mode { exact, fast };

/// Instruction-set paths (tags). isa::native is the widest one compiled in.
namespace isa {
struct portable {
  static constexpr const char* name = "portable";
};
#if defined(__AVX2__) && defined(__FMA__)
struct avx2 {
  static constexpr const char* name = "avx2";
};
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__)
struct avx512 {
  static constexpr const char* name = "avx512";
};
using native = avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using native = avx2;
#else
using native = portable;
#endif
}  // namespace isa

/// A 2-D NF4 weight [rows × cols] as its flat codes (row-major, two per byte,
/// first element in the high nibble) and one absmax per `blocksize` elements.
struct Nf4View {
  const std::uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  Index rows = 0, cols = 0;
  std::int64_t blocksize = 64;
};

/// Activation group of the fast mode (one int8 scale per 32 values of a token).
inline constexpr int nf4_q8_group = 32;

namespace detail {
constexpr std::int8_t round_to_i8(float v) { return static_cast<std::int8_t>(v >= 0 ? int(v + 0.5f) : -int(-v + 0.5f)); }
constexpr std::array<std::int8_t, 16> make_code_i8() {
  std::array<std::int8_t, 16> q{};
  for (int c = 0; c < 16; ++c) q[c] = round_to_i8(127.0f * nf4_code[c]);
  return q;
}
constexpr double make_code_i8_error() {
  double e = 0;
  for (int c = 0; c < 16; ++c) {
    const double d = double(make_code_i8()[c]) / 127.0 - double(nf4_code[c]);
    e = std::max(e, d < 0 ? -d : d);
  }
  return e;
}
}  // namespace detail

/// The fast mode's weight table: round(127·nf4_code[c]).
inline constexpr std::array<std::int8_t, 16> nf4_code_i8 = detail::make_code_i8();
/// max_c |nf4_code_i8[c]/127 − nf4_code[c]|: the fast mode's weight error is at
/// most this × absmax per element (≈ 0.0037, against NF4's own spacing of 0.08–0.3).
inline constexpr double nf4_code_i8_max_error = detail::make_code_i8_error();

namespace detail {

// Loops over a template's token count, unrolled so the accumulators stay in registers.
#if defined(__clang__) || defined(__GNUC__)
#define LORA_UNROLL(n) _Pragma(LORA_UNROLL_STR(GCC unroll n))
#define LORA_UNROLL_STR(x) #x
#else
#define LORA_UNROLL(n)
#endif

inline void check_gemm_args(const Nf4View& W, Index T, const char* who) {
  check_blocksize(W.blocksize, who);
  if (W.rows < 0 || W.cols < 0 || T < 0) lora::detail::fail("{}: negative shape (rows {}, cols {}, tokens {})", who, W.rows, W.cols, T);
}

// ---- activations quantised per group of 32 (fast mode) -------------------------

/// Int8 tokens: q [T × cols], d [T × ngroups]; group g of a token covers columns
/// [32g, 32g + 32) (the last may be partial), x ≈ q·d. With `interleave`, each
/// full group is stored as its 16 even then its 16 odd columns (the order in
/// which the high and low nibbles of 16 packed bytes decode).
struct Q8Tokens {
  std::vector<std::int8_t> q;
  std::vector<float> d;
  Index T = 0, cols = 0, ngroups = 0;
};

inline Q8Tokens quantize_tokens_q8(const float* X, Index T, Index cols, bool interleave) {
  Q8Tokens r;
  r.T = T;
  r.cols = cols;
  r.ngroups = (cols + nf4_q8_group - 1) / nf4_q8_group;
  r.q.resize(static_cast<std::size_t>(T * cols));
  r.d.resize(static_cast<std::size_t>(T * r.ngroups));
  for (Index t = 0; t < T; ++t) {
    const float* x = X + t * cols;
    std::int8_t* q = r.q.data() + t * cols;
    for (Index g = 0; g < r.ngroups; ++g) {
      const Index k0 = g * nf4_q8_group, n = std::min<Index>(nf4_q8_group, cols - k0);
      float amax = 0;
      for (Index k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k0 + k]));
      const float d = amax / 127.0f;
      const float inv = amax > 0 ? 127.0f / amax : 0.0f;
      r.d[static_cast<std::size_t>(t * r.ngroups + g)] = d;
      std::int8_t tmp[nf4_q8_group];
      for (Index k = 0; k < n; ++k)
        tmp[k] = static_cast<std::int8_t>(std::clamp(std::nearbyint(x[k0 + k] * inv), -127.0f, 127.0f));
      if (interleave && n == nf4_q8_group) {
        for (int j = 0; j < 16; ++j) {
          q[k0 + j] = tmp[2 * j];
          q[k0 + 16 + j] = tmp[2 * j + 1];
        }
      } else {
        for (Index k = 0; k < n; ++k) q[k0 + k] = tmp[k];
      }
    }
  }
  return r;
}

// ---- portable path ----------------------------------------------------------------

/// Codes of flat elements [e0, e0 + n) unpacked to one byte each.
inline void unpack_codes(const std::uint8_t* packed, std::int64_t e0, std::int64_t n, std::uint8_t* out) {
  std::int64_t e = e0, k = 0;
  if (n > 0 && (e & 1)) out[k++] = packed[e++ >> 1] & 0x0F;
  const std::uint8_t* p = packed + (e >> 1);
  for (; k + 2 <= n; k += 2, ++p) {
    out[k] = *p >> 4;
    out[k + 1] = *p & 0x0F;
  }
  if (k < n) out[k] = *p >> 4;
}

/// Σ_k a[k]·b[k] with 8 independent partial sums (a loop the compiler vectorises
/// without reassociating one accumulator).
inline float dot_f32(const float* a, const float* b, std::int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[k + j] * b[k + j];
  for (int j = 0; k < n; ++k, ++j) acc[j] += a[k] * b[k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline std::int32_t dot_i8(const std::int8_t* a, const std::int8_t* b, std::int64_t n) {
  std::int32_t s = 0;
  for (std::int64_t k = 0; k < n; ++k) s += std::int32_t(a[k]) * std::int32_t(b[k]);
  return s;
}

inline constexpr std::int64_t portable_chunk = 1024;  // a row decoded 4 KiB at a time

inline void gemm_rows(isa::portable, const Nf4View& W, const float* X, Index T, float* Y, Index r0, Index r1,
                      nf4_mode mode, const Q8Tokens* xq) {
  const Index in = W.cols, out = W.rows;
  const int shift = log2_exact(W.blocksize);
  std::uint8_t codes[portable_chunk];
  alignas(64) float wf[portable_chunk];
  std::int8_t wi[portable_chunk];
  for (Index i = r0; i < r1; ++i) {
    for (Index t = 0; t < T; ++t) Y[t * out + i] = 0;
    for (std::int64_t k0 = 0; k0 < in; k0 += portable_chunk) {
      const std::int64_t n = std::min<std::int64_t>(portable_chunk, in - k0);
      const std::int64_t e0 = static_cast<std::int64_t>(i) * in + k0;
      unpack_codes(W.packed, e0, n, codes);
      if (mode == nf4_mode::exact) {
        for (std::int64_t k = 0; k < n; ++k) wf[k] = nf4_code[codes[k]] * W.absmax[(e0 + k) >> shift];
        for (Index t = 0; t < T; ++t) Y[t * out + i] += dot_f32(wf, X + t * in + k0, n);
      } else {
        for (std::int64_t k = 0; k < n; ++k) wi[k] = nf4_code_i8[codes[k]];
        // Segments where both the activation group and the weight block are fixed
        // (k0 is a multiple of 32, so chunk and group boundaries agree).
        for (std::int64_t k = 0; k < n;) {
          const std::int64_t g = (k0 + k) / nf4_q8_group;
          const std::int64_t blk = (e0 + k) >> shift;
          const std::int64_t end = std::min({n, (g + 1) * nf4_q8_group - k0, ((blk + 1) << shift) - e0});
          const float sw = W.absmax[blk] * (1.0f / 127.0f);
          for (Index t = 0; t < T; ++t) {
            const std::int32_t s = dot_i8(wi + k, xq->q.data() + t * in + k0 + k, end - k);
            Y[t * out + i] += static_cast<float>(s) * (sw * xq->d[static_cast<std::size_t>(t * xq->ngroups + g)]);
          }
          k = end;
        }
      }
    }
  }
}

inline bool simd_shape_ok(const Nf4View& W) { return W.cols % 32 == 0; }

/// Calls f(integral_constant<int, G>, t0) for token tiles of Max, then the rest.
template <int Max, class F>
inline void for_token_tiles(Index T, F&& f) {
  Index t = 0;
  for (; t + Max <= T; t += Max) f(std::integral_constant<int, Max>{}, t);
  if constexpr (Max > 1) {
    if (T - t > 0) {
      [&]<int... I>(std::integer_sequence<int, I...>) {
        ((T - t == I + 1 ? (f(std::integral_constant<int, I + 1>{}, t), 0) : 0), ...);
      }(std::make_integer_sequence<int, Max - 1>{});
    }
  }
}

/// Columns per pass over a block of rows: the tokens' slice (≤ 16 × 8 KiB) stays
/// in L2 while 64 rows stream through.
inline std::int64_t k_chunk(Index T, Index in) { return T <= 4 ? in : std::min<Index>(in, 2048); }
inline constexpr Index row_block = 64;


// ---- AVX2 path --------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)

/// Codes 2048 elements ahead of flat element e: with little work per byte (the
/// fast mode, T = 1) the hardware prefetcher alone leaves the loop waiting on memory.
inline void prefetch_codes(const std::uint8_t* packed, std::int64_t e) {
  _mm_prefetch(reinterpret_cast<const char*>(packed + (e >> 1) + 1024), _MM_HINT_T0);
}

/// The 32 codes of 16 packed bytes as one byte each: the low lane holds the even
/// elements (high nibbles), the high lane the odd ones.
inline __m256i avx2_codes32(const std::uint8_t* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_set_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

/// The float bytes of the 16 code values, one table per byte (broadcast to both lanes).
struct Avx2CodePlanes {
  __m256i b[4];
  Avx2CodePlanes() {
    alignas(16) std::uint8_t t[4][16];
    for (int c = 0; c < 16; ++c) {
      std::uint32_t u;
      std::memcpy(&u, &nf4_code[c], 4);
      for (int j = 0; j < 4; ++j) t[j][c] = static_cast<std::uint8_t>(u >> (8 * j));
    }
    for (int j = 0; j < 4; ++j) b[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t[j])));
  }
};

/// 32 code values as floats from 4 byte lookups and 8 unpacks, all within lanes:
/// f[j] holds elements 8j + {0, 2, 4, 6, 1, 3, 5, 7} (see interleave8).
inline void avx2_decode32(const Avx2CodePlanes& cp, __m256i idx, __m256 f[4]) {
  const __m256i b0 = _mm256_shuffle_epi8(cp.b[0], idx), b1 = _mm256_shuffle_epi8(cp.b[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(cp.b[2], idx), b3 = _mm256_shuffle_epi8(cp.b[3], idx);
  const __m256i la = _mm256_unpacklo_epi8(b0, b1), lb = _mm256_unpackhi_epi8(b0, b1);
  const __m256i ha = _mm256_unpacklo_epi8(b2, b3), hb = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(la, ha));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(la, ha));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lb, hb));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lb, hb));
}

/// Tokens with every 8 columns reordered as 0, 2, 4, 6, 1, 3, 5, 7 (avx2_decode32's order).
inline std::vector<float> interleave8(const float* X, Index T, Index cols) {
  std::vector<float> r(static_cast<std::size_t>(T * cols));
  for (Index t = 0; t < T; ++t)
    for (Index k = 0; k < cols; k += 8)
      for (int j = 0; j < 4; ++j) {
        r[static_cast<std::size_t>(t * cols + k + j)] = X[t * cols + k + 2 * j];
        r[static_cast<std::size_t>(t * cols + k + 4 + j)] = X[t * cols + k + 2 * j + 1];
      }
  return r;
}

inline float avx2_hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// y_g = Σ_k W[row, k]·x_g[k] for G tokens (interleave8 order), exact values:
/// each decoded code value is multiplied by its block's absmax before the FMA.
template <int G>
inline void avx2_exact_row(const Avx2CodePlanes& cp, const std::uint8_t* packed, const float* absmax, int shift,
                           std::int64_t e0, std::int64_t k0, std::int64_t n, const float* xi, std::int64_t ldx,
                           float* y, std::int64_t ldy) {
  // Two accumulators per token up to 4 tokens; one above (registers run out, and
  // 8 independent chains already hide the FMA latency).
  constexpr int NA = G > 4 ? 1 : 2;
  __m256 acc[NA][G];
  LORA_UNROLL(8)
  for (int g = 0; g < G; ++g)
    for (int a = 0; a < NA; ++a) acc[a][g] = _mm256_setzero_ps();
  for (std::int64_t k = k0; k < k0 + n; k += 32) {
    const std::int64_t e = e0 + k;
    if ((k & 127) == 0) prefetch_codes(packed, e);
    const __m256 s = _mm256_broadcast_ss(absmax + (e >> shift));
    __m256 f[4];
    avx2_decode32(cp, avx2_codes32(packed + (e >> 1)), f);
    LORA_UNROLL(4)
    for (int j = 0; j < 4; ++j) f[j] = _mm256_mul_ps(f[j], s);
    LORA_UNROLL(8)
    for (int g = 0; g < G; ++g) {
      const float* x = xi + g * ldx + k;
      LORA_UNROLL(4)
      for (int j = 0; j < 4; ++j) acc[j % NA][g] = _mm256_fmadd_ps(f[j], _mm256_loadu_ps(x + 8 * j), acc[j % NA][g]);
    }
  }
  LORA_UNROLL(8)
  for (int g = 0; g < G; ++g) y[g * ldy] += avx2_hsum(NA == 2 ? _mm256_add_ps(acc[0][g], acc[NA - 1][g]) : acc[0][g]);
}

/// Σ over 32 int8 pairs of |w|·sign(x, w) = w·x, as 8 int32 partial sums.
inline __m256i avx2_dot32(__m256i aw, __m256i w, __m256i x) {
  const __m256i sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

/// Fast mode for G tokens: one pshufb per 32 weights, integer dots, one FMA with
/// absmax/127 · d_x per group and token; two accumulators per token so that
/// consecutive groups do not wait on each other's FMA.
template <int G>
inline void avx2_fast_row(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t e0,
                          std::int64_t k0, std::int64_t n, const Q8Tokens& xq, Index t0, float* y, std::int64_t ldy) {
  const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nf4_code_i8.data())));
  const __m256 inv127 = _mm256_set1_ps(1.0f / 127.0f);
  const std::int8_t* xr[G];
  const float* dr[G];
  __m256 acc0[G], acc1[G];
  LORA_UNROLL(4)
  for (int g = 0; g < G; ++g) {
    xr[g] = xq.q.data() + (t0 + g) * xq.cols;
    dr[g] = xq.d.data() + (t0 + g) * xq.ngroups;
    acc0[g] = acc1[g] = _mm256_setzero_ps();
  }
  auto group = [&](std::int64_t k, __m256* acc) {
    const std::int64_t e = e0 + k;
    const __m256 sw = _mm256_mul_ps(_mm256_broadcast_ss(absmax + (e >> shift)), inv127);
    const __m256i w = _mm256_shuffle_epi8(tbl, avx2_codes32(packed + (e >> 1)));
    const __m256i aw = _mm256_abs_epi8(w);
    const std::int64_t grp = k >> 5;
    LORA_UNROLL(4)
    for (int g = 0; g < G; ++g) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[g] + k));
      const __m256 d = _mm256_mul_ps(sw, _mm256_broadcast_ss(dr[g] + grp));
      acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(avx2_dot32(aw, w, x)), d, acc[g]);
    }
  };
  std::int64_t k = k0;
  const std::int64_t end = k0 + n;
  for (; k + 64 <= end; k += 64) {
    if ((k & 127) == 0) prefetch_codes(packed, e0 + k);
    group(k, acc0);
    group(k + 32, acc1);
  }
  if (k < end) group(k, acc0);
  LORA_UNROLL(4)
  for (int g = 0; g < G; ++g) y[g * ldy] += avx2_hsum(_mm256_add_ps(acc0[g], acc1[g]));
}

inline void gemm_rows(isa::avx2, const Nf4View& W, const float* Xp, Index T, float* Y, Index r0, Index r1,
                      nf4_mode mode, const Q8Tokens* xq) {
  const Index in = W.cols, out = W.rows;
  const int shift = log2_exact(W.blocksize);
  const Avx2CodePlanes cp;
  const std::int64_t kc = k_chunk(T, in);
  for (Index i = r0; i < r1; ++i)
    for (Index t = 0; t < T; ++t) Y[t * out + i] = 0;
  for (std::int64_t k0 = 0; k0 < in; k0 += kc) {
    const std::int64_t n = std::min<std::int64_t>(kc, in - k0);
    for (Index i = r0; i < r1; ++i) {
      const std::int64_t e0 = static_cast<std::int64_t>(i) * in;
      // Exact: tiles of 8 tokens (the decode costs as much as 4 tokens' FMAs);
      // fast: tiles of 4 (its decode is one pshufb).
      if (mode == nf4_mode::exact)
        for_token_tiles<8>(T, [&](auto G, Index t) {
          avx2_exact_row<G()>(cp, W.packed, W.absmax, shift, e0, k0, n, Xp + t * in, in, Y + t * out + i, out);
        });
      else
        for_token_tiles<4>(T, [&](auto G, Index t) {
          avx2_fast_row<G()>(W.packed, W.absmax, shift, e0, k0, n, *xq, t, Y + t * out + i, out);
        });
    }
  }
}
#endif  // AVX2

// ---- AVX-512 path (exact mode; the fast mode runs the AVX2 kernel) ---------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own AVX-512 reductions read a self-initialised "undefined" vector.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

inline constexpr Index avx512_max_tokens = 4;

/// Tokens with every 32 columns reordered as their 16 even then 16 odd columns.
inline std::vector<float> interleave32(const float* X, Index T, Index cols) {
  std::vector<float> r(static_cast<std::size_t>(T * cols));
  for (Index t = 0; t < T; ++t)
    for (Index k = 0; k < cols; k += 32)
      for (int j = 0; j < 16; ++j) {
        r[static_cast<std::size_t>(t * cols + k + j)] = X[t * cols + k + 2 * j];
        r[static_cast<std::size_t>(t * cols + k + 16 + j)] = X[t * cols + k + 2 * j + 1];
      }
  return r;
}

/// Two rows (flat starts ea0, ea0 + in) against G tokens in interleave32 order:
/// 16 bytes widened once, the two nibbles through a 16-entry scaled table.
template <int G>
inline void avx512_exact_rows2(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t ea0,
                               std::int64_t stride, std::int64_t k0, std::int64_t n, bool two, const float* xp,
                               std::int64_t ldx, float* y0, float* y1, std::int64_t ldy) {
  __m512 a0[G], a1[G], b0[G], b1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = b0[g] = b1[g] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(nf4_code.data());
  for (std::int64_t k = k0; k < k0 + n; k += 32) {
    const std::int64_t ea = ea0 + k, eb = ea + stride;
    if ((k & 127) == 0) {
      prefetch_codes(packed, ea);
      prefetch_codes(packed, eb);
    }
    const __m512 la = _mm512_mul_ps(code, _mm512_set1_ps(absmax[ea >> shift]));
    const __m512i ba = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (ea >> 1))));
    const __m512 wa0 = _mm512_permutexvar_ps(_mm512_srli_epi32(ba, 4), la), wa1 = _mm512_permutexvar_ps(ba, la);
    __m512 wb0 = _mm512_setzero_ps(), wb1 = wb0;
    if (two) {
      const __m512 lb = _mm512_mul_ps(code, _mm512_set1_ps(absmax[eb >> shift]));
      const __m512i bb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (eb >> 1))));
      wb0 = _mm512_permutexvar_ps(_mm512_srli_epi32(bb, 4), lb);
      wb1 = _mm512_permutexvar_ps(bb, lb);
    }
    for (int g = 0; g < G; ++g) {
      const __m512 x0 = _mm512_loadu_ps(xp + g * ldx + k), x1 = _mm512_loadu_ps(xp + g * ldx + k + 16);
      a0[g] = _mm512_fmadd_ps(wa0, x0, a0[g]);
      a1[g] = _mm512_fmadd_ps(wa1, x1, a1[g]);
      b0[g] = _mm512_fmadd_ps(wb0, x0, b0[g]);
      b1[g] = _mm512_fmadd_ps(wb1, x1, b1[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    y0[g * ldy] += _mm512_reduce_add_ps(_mm512_add_ps(a0[g], a1[g]));
    if (two) y1[g * ldy] += _mm512_reduce_add_ps(_mm512_add_ps(b0[g], b1[g]));
  }
}

inline void gemm_rows(isa::avx512, const Nf4View& W, const float* Xp, Index T, float* Y, Index r0, Index r1,
                      nf4_mode mode, const Q8Tokens* xq) {
  // Above 4 tokens the AVX2 kernel's tiles of 8 (with AVX-512's 32 registers) beat
  // two rows × 4 tokens here; prepare_tokens reorders X for it.
  if (mode == nf4_mode::fast || T > avx512_max_tokens) return gemm_rows(isa::avx2{}, W, Xp, T, Y, r0, r1, mode, xq);
  const Index in = W.cols, out = W.rows;
  const int shift = log2_exact(W.blocksize);
  const std::int64_t kc = k_chunk(T, in);
  for (Index i = r0; i < r1; ++i)
    for (Index t = 0; t < T; ++t) Y[t * out + i] = 0;
  for (std::int64_t k0 = 0; k0 < in; k0 += kc) {
    const std::int64_t n = std::min<std::int64_t>(kc, in - k0);
    for (Index i = r0; i < r1; i += 2) {
      const bool two = i + 1 < r1;
      const std::int64_t e0 = static_cast<std::int64_t>(i) * in;
      for_token_tiles<4>(T, [&](auto G, Index t) {
        avx512_exact_rows2<G()>(W.packed, W.absmax, shift, e0, in, k0, n, two, Xp + t * in, in, Y + t * out + i,
                                Y + t * out + i + 1, out);
      });
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // AVX-512

/// The activations each path reads: reordered floats (exact) or int8 groups (fast).
template <class Isa>
struct PreparedTokens {
  std::vector<float> xf;
  Q8Tokens xq;
  const float* x = nullptr;
};

template <class Isa>
PreparedTokens<Isa> prepare_tokens(const Nf4View& W, const float* X, Index T, nf4_mode mode) {
  PreparedTokens<Isa> p;
  constexpr bool simd = !std::is_same_v<Isa, isa::portable>;
  const bool simd_ok = simd && simd_shape_ok(W);
  if (mode == nf4_mode::fast) {
    p.xq = quantize_tokens_q8(X, T, W.cols, simd_ok);
    return p;
  }
  p.x = X;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<Isa, isa::avx512>) {
    if (simd_ok) p.xf = T > avx512_max_tokens ? interleave8(X, T, W.cols) : interleave32(X, T, W.cols);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<Isa, isa::avx2>) {
    if (simd_ok) p.xf = interleave8(X, T, W.cols);
  }
#endif
  if (!p.xf.empty()) p.x = p.xf.data();
  return p;
}

}  // namespace detail

/// The view of an Nf4Tensor (2-D, [out × in]).
template <class Tensor>
Nf4View nf4_view(const Tensor& W) {
  return {W.packed().data(), W.absmax().data(), W.rows(), W.cols(), W.blocksize()};
}

/// Y = X·dequant(W)ᵀ: X [T × in] and Y [T × out] row-major, W an NF4 [out × in].
/// Threads (OpenMP) split the rows of W. `Isa` picks the path (isa::native by
/// default at the call sites); shapes a SIMD path cannot take (in % 32 ≠ 0)
/// run the portable one. Meant for T ≤ 16 (each row is decoded once per 4 or 8 tokens).
template <class Isa>
void nf4_gemm(Isa, const Nf4View& W, const float* X, Index T, float* Y, nf4_mode mode) {
  detail::check_gemm_args(W, T, "nf4_gemm");
  const auto p = detail::prepare_tokens<Isa>(W, X, T, mode);
  const Index out = W.rows;
  const bool simd = !std::is_same_v<Isa, isa::portable> && detail::simd_shape_ok(W);
  const Index rb = detail::row_block;
  const Index nrb = (out + rb - 1) / rb;
  const bool par = static_cast<std::int64_t>(out) * W.cols > detail::parallel_threshold;
  (void)par;
  LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (par))
  for (Index b = 0; b < nrb; ++b) {
    const Index r0 = b * rb, r1 = std::min(out, r0 + rb);
    if (simd)
      detail::gemm_rows(Isa{}, W, p.x, T, Y, r0, r1, mode, &p.xq);
    else
      detail::gemm_rows(isa::portable{}, W, X, T, Y, r0, r1, mode, &p.xq);
  }
}

}  // namespace lora::quant
