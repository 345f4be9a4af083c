#pragma once
// NF4 (4-bit NormalFloat, QLoRA) blockwise quantisation with bitsandbytes'
// exact arithmetic: one float32 absmax per block of `blocksize` consecutive
// elements of the flattened tensor (the last block may be partial),
// x·(1/absmax) in float32 mapped through the kernel's threshold tree, two codes
// per byte with the first element in the high nibble.
//
// The arithmetic is kept explicit (float32 products, no fused multiply-add in
// the encoder) so that a GPU port produces the same codes bit for bit.

#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lora::quant {

/// The 16 NF4 code values (bitsandbytes' `get_4bit_type("nf4")`): quantiles of
/// N(0, 1) normalised to [-1, 1], with an exact zero at code 7.
inline constexpr std::array<float, 16> nf4_code = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/// The 15 decision thresholds of bitsandbytes' dQuantizeNF4 tree (float32
/// literals, ascending): code c is chosen when threshold[c-1] < x <= threshold[c].
inline constexpr std::array<float, 15> nf4_thresholds = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,  0.2035212516784668f,  0.2920137718319893f,  0.3893125355243683f,
    0.5016634166240692f,  0.6427869200706482f,  0.8614784181118011f,
};

/// Smallest and largest block sizes bitsandbytes accepts (powers of two).
inline constexpr int nf4_min_blocksize = 32;
inline constexpr int nf4_max_blocksize = 4096;

/// True for 32, 64, ..., 4096.
constexpr bool is_valid_blocksize(std::int64_t bs) {
  return bs >= nf4_min_blocksize && bs <= nf4_max_blocksize && (bs & (bs - 1)) == 0;
}

/// Number of blocks for n elements: ceil(n / blocksize).
constexpr std::int64_t num_blocks(std::int64_t n, std::int64_t blocksize) { return (n + blocksize - 1) / blocksize; }
/// Packed size in bytes for n 4-bit codes: ceil(n / 2).
constexpr std::int64_t packed_bytes(std::int64_t n) { return (n + 1) / 2; }

/// NF4 code of a normalised value x = value·(1/absmax): bitsandbytes'
/// dQuantizeNF4 decision tree, comparisons with `>`. NaN (an all-zero block,
/// 0·(1/0)) falls through every test and gives code 0, as on the GPU.
constexpr std::uint8_t nf4_encode(float x) {
  const auto& t = nf4_thresholds;
  if (x > t[7]) {
    if (x > t[11]) {
      if (x > t[13]) return x > t[14] ? 15 : 14;
      return x > t[12] ? 13 : 12;
    }
    if (x > t[9]) return x > t[10] ? 11 : 10;
    return x > t[8] ? 9 : 8;
  }
  if (x > t[3]) {
    if (x > t[5]) return x > t[6] ? 7 : 6;
    return x > t[4] ? 5 : 4;
  }
  if (x > t[1]) return x > t[2] ? 3 : 2;
  return x > t[0] ? 1 : 0;
}

namespace detail {

/// Branch-free form of nf4_encode: the number of thresholds below x. Equal to
/// the tree for every float (the tree's leaves are ordered), NaN included.
inline std::uint8_t nf4_encode_count(float x) {
  int c = 0;
  for (float t : nf4_thresholds) c += x > t ? 1 : 0;
  return static_cast<std::uint8_t>(c);
}

template <class T>
inline float load_float(const T& v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return static_cast<float>(v);
}

inline int log2_exact(std::int64_t bs) {
  int s = 0;
  while ((std::int64_t{1} << s) < bs) ++s;
  return s;
}

inline void check_blocksize(std::int64_t bs, const char* who) {
  if (!is_valid_blocksize(bs))
    lora::detail::fail("{}: blocksize must be a power of two from {} to {}, got {}", who, nf4_min_blocksize, nf4_max_blocksize,
         bs);
}

#if defined(_OPENMP)
#define LORA_QUANT_PRAGMA(x) _Pragma(#x)
#else
#define LORA_QUANT_PRAGMA(x)
#endif

/// Work sizes below this stay on one thread (thread start-up costs more).
inline constexpr std::int64_t parallel_threshold = 1 << 16;

/// Writes the dequantised values of flat elements [e0, e0 + len) — any
/// alignment, across block boundaries — into out: code value × absmax of
/// the element's block, one float32 product, as bitsandbytes' kernel.
inline void nf4_decode_range(const std::uint8_t* packed, const float* absmax, int bs_shift, std::int64_t e0,
                             std::int64_t len, float* out) {
  std::int64_t e = e0;
  const std::int64_t end = e0 + len;
  while (e < end) {
    const std::int64_t blk = e >> bs_shift;
    const std::int64_t seg_end = std::min(end, (blk + 1) << bs_shift);
    const float s = absmax[blk];
    alignas(64) float lut[16];
#if defined(__AVX512F__)
    // Built in registers: a vector load right after 16 scalar stores would stall.
    const __m512 vlut = _mm512_mul_ps(_mm512_loadu_ps(nf4_code.data()), _mm512_set1_ps(s));
    _mm512_store_ps(lut, vlut);
#elif defined(__AVX2__)
    const __m256 lut_lo = _mm256_mul_ps(_mm256_loadu_ps(nf4_code.data()), _mm256_set1_ps(s));
    const __m256 lut_hi = _mm256_mul_ps(_mm256_loadu_ps(nf4_code.data() + 8), _mm256_set1_ps(s));
    _mm256_store_ps(lut, lut_lo);
    _mm256_store_ps(lut + 8, lut_hi);
#else
    for (int c = 0; c < 16; ++c) lut[c] = nf4_code[c] * s;
#endif
    if (e & 1) {  // starts on a low nibble
      *out++ = lut[packed[e >> 1] & 0x0F];
      ++e;
    }
    const std::uint8_t* p = packed + (e >> 1);
    std::int64_t n = seg_end - e;
#if defined(__AVX512F__)
    const __m128i m0f = _mm_set1_epi8(0x0F);
    for (; n >= 16; n -= 16, p += 8, out += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);
      const __m128i lo = _mm_and_si128(b, m0f);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
      _mm512_storeu_ps(out, _mm512_permutexvar_ps(idx, vlut));
    }
#elif defined(__AVX2__)
    const __m128i m0f = _mm_set1_epi8(0x0F);
    for (; n >= 16; n -= 16, p += 8, out += 16) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);
      const __m128i lo = _mm_and_si128(b, m0f);
      const __m128i idx = _mm_unpacklo_epi8(hi, lo);
      const __m256i i0 = _mm256_cvtepu8_epi32(idx);
      const __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8));
      const __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i0), _mm256_permutevar8x32_ps(lut_hi, i0),
                                         _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
      const __m256 v1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, i1), _mm256_permutevar8x32_ps(lut_hi, i1),
                                         _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
      _mm256_storeu_ps(out, v0);
      _mm256_storeu_ps(out + 8, v1);
    }
#endif
    for (; n >= 2; n -= 2, ++p, out += 2) {
      out[0] = lut[*p >> 4];
      out[1] = lut[*p & 0x0F];
    }
    if (n == 1) *out++ = lut[*p >> 4];
    e = seg_end;
  }
}

}  // namespace detail

/// Blockwise NF4 quantisation of n values (float, bfloat16 or half), exactly as
/// bitsandbytes' kQuantizeBlockwise: absmax[b] = max |x| over block b,
/// code = nf4_encode(float(x)·(1/absmax[b])). `packed` receives ceil(n/2) bytes
/// (an odd count's last low nibble is the code of a zero-padded element, as the
/// kernel writes it), `absmax` num_blocks(n, blocksize) floats. Throws on a
/// non-finite input (naming the element) or an invalid blocksize.
template <class T>
void nf4_quantize(const T* x, std::int64_t n, std::int64_t blocksize, std::uint8_t* packed, float* absmax) {
  detail::check_blocksize(blocksize, "nf4_quantize");
  const std::int64_t nb = num_blocks(n, blocksize);
  int bad = 0;
  LORA_QUANT_PRAGMA(omp parallel for schedule(static) reduction(| : bad) if (n > detail::parallel_threshold))
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t begin = b * blocksize;
    const std::int64_t len = std::min(blocksize, n - begin);
    const T* xb = x + begin;
    float m = -FLT_MAX;
    for (std::int64_t j = 0; j < len; ++j) {
      const float a = std::fabs(detail::load_float(xb[j]));
      bad |= !(a <= FLT_MAX);
      m = a > m ? a : m;
    }
    absmax[b] = m;
    const float inv = 1.0f / m;
    // Codes first (a loop the compiler vectorises: 15 compares per element), then
    // the nibbles. An odd tail is padded with a zero, which the kernel quantises too.
    alignas(64) std::uint8_t codes[nf4_max_blocksize];
    for (std::int64_t j = 0; j < len; ++j) {
      const float v = detail::load_float(xb[j]) * inv;
      int c = 0;
      for (int t = 0; t < 15; ++t) c += v > nf4_thresholds[t] ? 1 : 0;
      codes[j] = static_cast<std::uint8_t>(c);
    }
    if (len & 1) codes[len] = detail::nf4_encode_count(0.0f * inv);
    std::uint8_t* pb = packed + begin / 2;  // blocksize is even: blocks start on a byte
    for (std::int64_t j = 0; j < len; j += 2) pb[j / 2] = static_cast<std::uint8_t>((codes[j] << 4) | codes[j + 1]);
  }
  if (bad) {
    for (std::int64_t i = 0; i < n; ++i)
      if (!std::isfinite(detail::load_float(x[i])))
        lora::detail::fail("nf4_quantize: element {} is {}, expected a finite value", i, detail::load_float(x[i]));
  }
}

/// Dequantises n NF4 codes: out[i] = nf4_code[code_i] · absmax[i / blocksize]
/// (one float32 product, rounded once more to T for bfloat16 / half).
template <class T>
void nf4_dequantize(const std::uint8_t* packed, const float* absmax, std::int64_t n, std::int64_t blocksize, T* out) {
  detail::check_blocksize(blocksize, "nf4_dequantize");
  const int shift = detail::log2_exact(blocksize);
  // Chunks of whole blocks (a multiple of 2 elements), one per iteration.
  const std::int64_t chunk = std::max<std::int64_t>(blocksize, 4096);
  const std::int64_t nchunks = (n + chunk - 1) / chunk;
  LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (n > detail::parallel_threshold))
  for (std::int64_t c = 0; c < nchunks; ++c) {
    const std::int64_t begin = c * chunk;
    const std::int64_t len = std::min(chunk, n - begin);
    if constexpr (std::is_same_v<T, float>) {
      detail::nf4_decode_range(packed, absmax, shift, begin, len, out + begin);
    } else {
      alignas(64) float buf[4096];
      for (std::int64_t k = 0; k < len; k += 4096) {
        const std::int64_t m = std::min<std::int64_t>(4096, len - k);
        detail::nf4_decode_range(packed, absmax, shift, begin + k, m, buf);
        for (std::int64_t i = 0; i < m; ++i) out[begin + k + i] = static_cast<T>(buf[i]);
      }
    }
  }
}

}  // namespace lora::quant
