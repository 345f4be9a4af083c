#pragma once
// QLoRA on the CPU: a frozen NF4 base weight W [out × in] plus a trainable
// LoRA adapter, y = X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ. Small batches (tokens ≤ 16)
// multiply straight from the 4-bit codes, one decoded chunk of a row at a
// time, so W is never materialised; larger batches dequantise row panels and
// use Eigen's GEMM.

#include <lora/core/adapter.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/quant/nf4.hpp>
#include <lora/quant/nf4_tensor.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lora {

namespace quant::detail {

/// Elements of a row decoded at a time (4 KiB of floats: stays in L1).
inline constexpr std::int64_t decode_chunk = 1024;

#if defined(__AVX512F__)
using fvec = __m512;
inline constexpr int fvec_width = 16;
inline fvec fv_zero() { return _mm512_setzero_ps(); }
inline fvec fv_load(const float* p) { return _mm512_loadu_ps(p); }
inline fvec fv_fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
inline fvec fv_add(fvec a, fvec b) { return _mm512_add_ps(a, b); }
inline float fv_sum(fvec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
using fvec = __m256;
inline constexpr int fvec_width = 8;
inline fvec fv_zero() { return _mm256_setzero_ps(); }
inline fvec fv_load(const float* p) { return _mm256_loadu_ps(p); }
inline fvec fv_fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
inline fvec fv_add(fvec a, fvec b) { return _mm256_add_ps(a, b); }
inline float fv_sum(fvec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
struct fvec {
  float v[4];
};
inline constexpr int fvec_width = 4;
inline fvec fv_zero() { return {{0, 0, 0, 0}}; }
inline fvec fv_load(const float* p) { return {{p[0], p[1], p[2], p[3]}}; }
inline fvec fv_fma(fvec a, fvec b, fvec c) {
  for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline fvec fv_add(fvec a, fvec b) {
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  return a;
}
inline float fv_sum(fvec a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
#endif

/// out[g] += Σ_k w[k]·x_g[k] for G token rows x_g = x + g·ldx, k < n.
template <int G>
inline void dot_tokens(const float* w, const float* x, std::int64_t ldx, std::int64_t n, float* out) {
  constexpr int U = G == 1 ? 4 : (G == 2 ? 2 : 1);  // independent accumulators per token
  fvec acc[G][U];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) acc[g][u] = fv_zero();
  std::int64_t k = 0;
  for (; k + U * fvec_width <= n; k += U * fvec_width) {
    for (int u = 0; u < U; ++u) {
      const fvec wv = fv_load(w + k + u * fvec_width);
      for (int g = 0; g < G; ++g) acc[g][u] = fv_fma(wv, fv_load(x + g * ldx + k + u * fvec_width), acc[g][u]);
    }
  }
  for (; k + fvec_width <= n; k += fvec_width) {
    const fvec wv = fv_load(w + k);
    for (int g = 0; g < G; ++g) acc[g][0] = fv_fma(wv, fv_load(x + g * ldx + k), acc[g][0]);
  }
  for (int g = 0; g < G; ++g) {
    fvec s = acc[g][0];
    for (int u = 1; u < U; ++u) s = fv_add(s, acc[g][u]);
    float r = fv_sum(s);
    for (std::int64_t kk = k; kk < n; ++kk) r += w[kk] * x[g * ldx + kk];
    out[g] += r;
  }
}

#if defined(__AVX512F__)
/// 16 dequantised values (8 packed bytes) through a 16-entry scaled code table.
inline __m512 decode16(const std::uint8_t* p, __m512 vlut) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i m0f = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);
  const __m128i lo = _mm_and_si128(b, m0f);
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), vlut);
}

/// out[g] += Σ_k W[e0 + k]·x_g[k] for flat NF4 elements [e0, e0 + len) and G
/// token rows, decoding in registers (no buffer). Same values as nf4_decode_range.
template <int G>
inline void row_dot_fused(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t e0,
                          std::int64_t len, const float* x, std::int64_t ldx, float* out) {
  __m512 acc0[G], acc1[G];
  float tail[G];
  for (int g = 0; g < G; ++g) {
    acc0[g] = _mm512_setzero_ps();
    acc1[g] = _mm512_setzero_ps();
    tail[g] = 0.0f;
  }
  const __m512 code = _mm512_loadu_ps(nf4_code.data());
  std::int64_t e = e0;
  const std::int64_t end = e0 + len;
  while (e < end) {
    const std::int64_t blk = e >> shift;
    const std::int64_t seg_end = std::min(end, (blk + 1) << shift);
    const float s = absmax[blk];
    const __m512 vlut = _mm512_mul_ps(code, _mm512_set1_ps(s));
    if (e & 1) {
      const float w = nf4_code[packed[e >> 1] & 0x0F] * s;
      for (int g = 0; g < G; ++g) tail[g] += w * x[g * ldx + (e - e0)];
      ++e;
    }
    const std::uint8_t* p = packed + (e >> 1);
    const float* xk = x + (e - e0);
    std::int64_t n = seg_end - e;
    for (; n >= 32; n -= 32, p += 16, xk += 32) {
      const __m512 w0 = decode16(p, vlut), w1 = decode16(p + 8, vlut);
      for (int g = 0; g < G; ++g) {
        acc0[g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk + g * ldx), acc0[g]);
        acc1[g] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + g * ldx + 16), acc1[g]);
      }
    }
    for (; n >= 16; n -= 16, p += 8, xk += 16) {
      const __m512 w0 = decode16(p, vlut);
      for (int g = 0; g < G; ++g) acc0[g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk + g * ldx), acc0[g]);
    }
    for (std::int64_t k = 0; k < n; ++k) {
      const std::uint8_t b = p[k >> 1];
      const float w = nf4_code[(k & 1) ? (b & 0x0F) : (b >> 4)] * s;
      for (int g = 0; g < G; ++g) tail[g] += w * xk[g * ldx + k];
    }
    e = seg_end;
  }
  for (int g = 0; g < G; ++g) out[g] += _mm512_reduce_add_ps(_mm512_add_ps(acc0[g], acc1[g])) + tail[g];
}

/// For rows of a multiple of 32 elements: X with every group of 32 columns
/// reordered as its 16 even then its 16 odd elements (the order in which the
/// high and low nibbles of 16 packed bytes decode), so decoding needs no interleave.
inline Matrix<float> permute_pairs(const Matrix<float>& X) {
  Matrix<float> P(X.rows(), X.cols());
  for (Index t = 0; t < X.rows(); ++t) {
    const float* x = X.data() + t * X.cols();
    float* o = P.data() + t * X.cols();
    for (Index g = 0; g < X.cols(); g += 32)
      for (int j = 0; j < 16; ++j) {
        o[g + j] = x[g + 2 * j];
        o[g + 16 + j] = x[g + 2 * j + 1];
      }
  }
  return P;
}

/// out[g] += Σ_k W[e0 + k]·x_g[k] for a range of 32-aligned flat elements (e0
/// and len multiples of 32) and pair-permuted token rows (permute_pairs).
/// Per 32 elements: one widening load of 16 bytes, one shift, two table lookups.
template <int G>
inline void row_dot_perm(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t e0,
                         std::int64_t len, const float* xp, std::int64_t ldx, float* out) {
  __m512 acc0[G], acc1[G];
  for (int g = 0; g < G; ++g) acc0[g] = acc1[g] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(nf4_code.data());
  const std::int64_t end = e0 + len;
  std::int64_t e = e0;
  while (e < end) {
    const std::int64_t blk = e >> shift;
    const std::int64_t seg_end = std::min(end, (blk + 1) << shift);
    const __m512 vlut = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk]));
    for (; e < seg_end; e += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (e >> 1))));
      const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), vlut);  // even elements
      const __m512 wlo = _mm512_permutexvar_ps(b, vlut);                        // odd: uses the low 4 bits
      const float* xk = xp + (e - e0);
      for (int g = 0; g < G; ++g) {
        acc0[g] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xk + g * ldx), acc0[g]);
        acc1[g] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xk + g * ldx + 16), acc1[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) out[g] += _mm512_reduce_add_ps(_mm512_add_ps(acc0[g], acc1[g]));
}

/// Two rows at once (flat starts e0 and e0 + stride): each x load feeds both rows.
template <int G>
inline void row_dot_perm2(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t e0,
                          std::int64_t stride, std::int64_t len, const float* xp, std::int64_t ldx, float* out0,
                          float* out1) {
  __m512 a0[G], a1[G], b0[G], b1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = b0[g] = b1[g] = _mm512_setzero_ps();
  const __m512 code = _mm512_loadu_ps(nf4_code.data());
  std::int64_t blk_a = -1, blk_b = -1;
  __m512 lut_a = code, lut_b = code;
  for (std::int64_t k = 0; k < len; k += 32) {
    const std::int64_t ea = e0 + k, eb = ea + stride;
    if ((ea >> shift) != blk_a) {
      blk_a = ea >> shift;
      lut_a = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk_a]));
    }
    if ((eb >> shift) != blk_b) {
      blk_b = eb >> shift;
      lut_b = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk_b]));
    }
    const __m512i ba = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (ea >> 1))));
    const __m512i bb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (eb >> 1))));
    const __m512 wa0 = _mm512_permutexvar_ps(_mm512_srli_epi32(ba, 4), lut_a), wa1 = _mm512_permutexvar_ps(ba, lut_a);
    const __m512 wb0 = _mm512_permutexvar_ps(_mm512_srli_epi32(bb, 4), lut_b), wb1 = _mm512_permutexvar_ps(bb, lut_b);
    const float* xk = xp + k;
    for (int g = 0; g < G; ++g) {
      const __m512 x0 = _mm512_loadu_ps(xk + g * ldx), x1 = _mm512_loadu_ps(xk + g * ldx + 16);
      a0[g] = _mm512_fmadd_ps(wa0, x0, a0[g]);
      a1[g] = _mm512_fmadd_ps(wa1, x1, a1[g]);
      b0[g] = _mm512_fmadd_ps(wb0, x0, b0[g]);
      b1[g] = _mm512_fmadd_ps(wb1, x1, b1[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    out0[g] += _mm512_reduce_add_ps(_mm512_add_ps(a0[g], a1[g]));
    out1[g] += _mm512_reduce_add_ps(_mm512_add_ps(b0[g], b1[g]));
  }
}

inline void row_dot_perm2_tokens(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t e0,
                                 std::int64_t stride, std::int64_t len, const float* xp, std::int64_t ldx, Index T,
                                 float* out0, float* out1) {
  Index t = 0;
  for (; t + 4 <= T; t += 4) row_dot_perm2<4>(packed, absmax, shift, e0, stride, len, xp + t * ldx, ldx, out0 + t, out1 + t);
  switch (T - t) {
    case 3: row_dot_perm2<3>(packed, absmax, shift, e0, stride, len, xp + t * ldx, ldx, out0 + t, out1 + t); break;
    case 2: row_dot_perm2<2>(packed, absmax, shift, e0, stride, len, xp + t * ldx, ldx, out0 + t, out1 + t); break;
    case 1: row_dot_perm2<1>(packed, absmax, shift, e0, stride, len, xp + t * ldx, ldx, out0 + t, out1 + t); break;
    default: break;
  }
}

inline void row_dot_perm_tokens(const std::uint8_t* packed, const float* absmax, int shift, std::int64_t e0,
                                std::int64_t len, const float* xp, std::int64_t ldx, Index T, float* out) {
  Index t = 0;
  for (; t + 4 <= T; t += 4) row_dot_perm<4>(packed, absmax, shift, e0, len, xp + t * ldx, ldx, out + t);
  switch (T - t) {
    case 3: row_dot_perm<3>(packed, absmax, shift, e0, len, xp + t * ldx, ldx, out + t); break;
    case 2: row_dot_perm<2>(packed, absmax, shift, e0, len, xp + t * ldx, ldx, out + t); break;
    case 1: row_dot_perm<1>(packed, absmax, shift, e0, len, xp + t * ldx, ldx, out + t); break;
    default: break;
  }
}
#endif

inline void dot_token_group(const float* w, const float* x, std::int64_t ldx, std::int64_t n, Index T, float* out) {
  Index t = 0;
  for (; t + 4 <= T; t += 4) dot_tokens<4>(w, x + t * ldx, ldx, n, out + t);
  switch (T - t) {
    case 3: dot_tokens<3>(w, x + t * ldx, ldx, n, out + t); break;
    case 2: dot_tokens<2>(w, x + t * ldx, ldx, n, out + t); break;
    case 1: dot_tokens<1>(w, x + t * ldx, ldx, n, out + t); break;
    default: break;
  }
}

}  // namespace quant::detail

namespace quant {

/// Y = X·Wᵀ for X [T × in] (row-major) and an NF4 weight W [out × in], computed
/// from the codes: each row of W is decoded in L1-sized chunks (bitsandbytes'
/// dequantised values, exactly) and dotted with every token; W is never
/// materialised. Meant for small T (≤ 16); threads split the rows.
inline Matrix<float> nf4_matmul_fused(const Nf4Tensor& W, const MatrixRef<float>& X) {
  const Index out = W.rows(), in = W.cols(), T = X.rows();
  if (X.cols() != in) lora::detail::fail("nf4_matmul: input has {} columns, the NF4 weight has in_features = {}", X.cols(), in);
  const Matrix<float> Xc = X;  // contiguous rows
  Matrix<float> YT = Matrix<float>::Zero(out, T);  // [out × T]: each row of W writes one contiguous row
  const int shift = detail::log2_exact(W.blocksize());
  const std::uint8_t* packed = W.packed().data();
  const float* absmax = W.absmax().data();
  const bool par = static_cast<std::int64_t>(out) * in > detail::parallel_threshold;
  (void)par;
#if defined(__AVX512F__)
  if (in % 32 == 0) {
    // Rows of whole 32-element groups: pair-permuted X, codes decoded in registers.
    // Row blocks × k-chunks keep the X chunk of every token in L1 across 64 rows.
    const Matrix<float> Xp = detail::permute_pairs(Xc);
    constexpr Index row_block = 64;
    const std::int64_t kc = T <= 4 ? in : 2048;
    const Index nrb = (out + row_block - 1) / row_block;
    LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (par))
    for (Index rb = 0; rb < nrb; ++rb) {
      const Index r0 = rb * row_block, r1 = std::min(out, r0 + row_block);
      for (std::int64_t k0 = 0; k0 < in; k0 += kc) {
        const std::int64_t n = std::min<std::int64_t>(kc, in - k0);
        Index i = r0;
        for (; i + 2 <= r1; i += 2)
          detail::row_dot_perm2_tokens(packed, absmax, shift, static_cast<std::int64_t>(i) * in + k0, in, n,
                                       Xp.data() + k0, in, T, YT.data() + i * T, YT.data() + (i + 1) * T);
        for (; i < r1; ++i)
          detail::row_dot_perm_tokens(packed, absmax, shift, static_cast<std::int64_t>(i) * in + k0, n, Xp.data() + k0,
                                      in, T, YT.data() + i * T);
      }
    }
    return YT.transpose();
  }
#endif
  LORA_QUANT_PRAGMA(omp parallel if (par))
  {
    alignas(64) float buf[detail::decode_chunk];
    LORA_QUANT_PRAGMA(omp for schedule(static))
    for (Index i = 0; i < out; ++i) {
      float* yi = YT.data() + i * T;
#if defined(__AVX512F__)
      if (T <= 2) {  // decode in registers: the codes are read once, no buffer round trip
        const std::int64_t e0 = static_cast<std::int64_t>(i) * in;
        if (T == 1)
          detail::row_dot_fused<1>(packed, absmax, shift, e0, in, Xc.data(), in, yi);
        else
          detail::row_dot_fused<2>(packed, absmax, shift, e0, in, Xc.data(), in, yi);
        continue;
      }
#endif
      for (std::int64_t k0 = 0; k0 < in; k0 += detail::decode_chunk) {
        const std::int64_t n = std::min<std::int64_t>(detail::decode_chunk, in - k0);
        detail::nf4_decode_range(packed, absmax, shift, static_cast<std::int64_t>(i) * in + k0, n, buf);
        detail::dot_token_group(buf, Xc.data() + k0, in, n, T, yi);
      }
    }
  }
  return YT.transpose();
}

/// dX = dY·W for dY [T × out] and an NF4 weight W [out × in], from the codes
/// (threads split the columns of W; each decodes its slice of every row).
inline Matrix<float> nf4_matmul_fused_t(const Nf4Tensor& W, const MatrixRef<float>& dY) {
  const Index out = W.rows(), in = W.cols(), T = dY.rows();
  if (dY.cols() != out)
    lora::detail::fail("nf4_matmul_t: gradient has {} columns, the NF4 weight has out_features = {}", dY.cols(), out);
  Matrix<float> dX = Matrix<float>::Zero(T, in);
  const int shift = detail::log2_exact(W.blocksize());
  const std::uint8_t* packed = W.packed().data();
  const float* absmax = W.absmax().data();
  constexpr std::int64_t kc = 256;
  const std::int64_t nchunks = (in + kc - 1) / kc;
  const bool par = static_cast<std::int64_t>(out) * in > detail::parallel_threshold;
  (void)par;
#if defined(__AVX512F__)
  if (in % 32 == 0) {
    // Codes decoded in registers, two rows per pass; dX accumulated in the
    // pair-permuted column order (see permute_pairs) and restored at the end.
    const Matrix<float> dYc = dY;
    Matrix<float> dXp = Matrix<float>::Zero(T, in);
    // About 8 column chunks (balanced over the threads), each a multiple of 32.
    const std::int64_t kcp = std::max<std::int64_t>(32, ((in + 7) / 8 + 31) / 32 * 32);
    const std::int64_t nck = (in + kcp - 1) / kcp;
    const __m512 code = _mm512_loadu_ps(nf4_code.data());
    LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (par))
    for (std::int64_t c = 0; c < nck; ++c) {
      const std::int64_t k0 = c * kcp, n = std::min(kcp, in - k0);
      for (Index i = 0; i < out; i += 2) {
        const bool two = i + 1 < out;
        const std::int64_t ea0 = static_cast<std::int64_t>(i) * in + k0, eb0 = ea0 + in;
        std::int64_t blk_a = -1, blk_b = -1;
        __m512 lut_a = code, lut_b = _mm512_setzero_ps();
        for (std::int64_t k = 0; k < n; k += 32) {
          const std::int64_t ea = ea0 + k;
          if ((ea >> shift) != blk_a) {
            blk_a = ea >> shift;
            lut_a = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk_a]));
          }
          const __m512i ba = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (ea >> 1))));
          const __m512 wa0 = _mm512_permutexvar_ps(_mm512_srli_epi32(ba, 4), lut_a);
          const __m512 wa1 = _mm512_permutexvar_ps(ba, lut_a);
          __m512 wb0 = _mm512_setzero_ps(), wb1 = _mm512_setzero_ps();
          if (two) {
            const std::int64_t eb = eb0 + k;
            if ((eb >> shift) != blk_b) {
              blk_b = eb >> shift;
              lut_b = _mm512_mul_ps(code, _mm512_set1_ps(absmax[blk_b]));
            }
            const __m512i bb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (eb >> 1))));
            wb0 = _mm512_permutexvar_ps(_mm512_srli_epi32(bb, 4), lut_b);
            wb1 = _mm512_permutexvar_ps(bb, lut_b);
          }
          for (Index t = 0; t < T; ++t) {
            const __m512 ga = _mm512_set1_ps(dYc(t, i));
            const __m512 gb = _mm512_set1_ps(two ? dYc(t, i + 1) : 0.0f);
            float* d = dXp.data() + t * in + k0 + k;
            __m512 d0 = _mm512_loadu_ps(d), d1 = _mm512_loadu_ps(d + 16);
            d0 = _mm512_fmadd_ps(wb0, gb, _mm512_fmadd_ps(wa0, ga, d0));
            d1 = _mm512_fmadd_ps(wb1, gb, _mm512_fmadd_ps(wa1, ga, d1));
            _mm512_storeu_ps(d, d0);
            _mm512_storeu_ps(d + 16, d1);
          }
        }
      }
    }
    for (Index t = 0; t < T; ++t) {  // back to the natural column order
      const float* p = dXp.data() + t * in;
      float* o = dX.data() + t * in;
      for (Index g = 0; g < in; g += 32)
        for (int j = 0; j < 16; ++j) {
          o[g + 2 * j] = p[g + j];
          o[g + 2 * j + 1] = p[g + 16 + j];
        }
    }
    return dX;
  }
#endif
  LORA_QUANT_PRAGMA(omp parallel for schedule(static) if (par))
  for (std::int64_t c = 0; c < nchunks; ++c) {
    alignas(64) float buf[kc];
    const std::int64_t k0 = c * kc, n = std::min(kc, in - k0);
    for (Index i = 0; i < out; ++i) {
      detail::nf4_decode_range(packed, absmax, shift, static_cast<std::int64_t>(i) * in + k0, n, buf);
      for (Index t = 0; t < T; ++t) {
        const float g = dY(t, i);
        float* d = dX.data() + t * in + k0;
        for (std::int64_t k = 0; k < n; ++k) d[k] += g * buf[k];
      }
    }
  }
  return dX;
}

/// Y = X·Wᵀ by dequantising W in row panels (never all of it at once) and
/// Eigen's GEMM; for batches too large for the fused path.
inline Matrix<float> nf4_matmul_panels(const Nf4Tensor& W, const MatrixRef<float>& X) {
  const Index out = W.rows(), in = W.cols(), T = X.rows();
  if (X.cols() != in) lora::detail::fail("nf4_matmul: input has {} columns, the NF4 weight has in_features = {}", X.cols(), in);
  Matrix<float> Y(T, out);
  const int shift = detail::log2_exact(W.blocksize());
  const Index panel = std::max<Index>(16, std::min<Index>(256, (1 << 20) / std::max<Index>(in, 1)));
  const Index npanels = (out + panel - 1) / panel;
  LORA_QUANT_PRAGMA(omp parallel for schedule(dynamic))
  for (Index p = 0; p < npanels; ++p) {
    const Index r0 = p * panel, nr = std::min(panel, out - r0);
    Matrix<float> P(nr, in);
    detail::nf4_decode_range(W.packed().data(), W.absmax().data(), shift, static_cast<std::int64_t>(r0) * in,
                             static_cast<std::int64_t>(nr) * in, P.data());
    Y.middleCols(r0, nr).noalias() = X * P.transpose();
  }
  return Y;
}

/// dX = dY·W in column panels of W and Eigen's GEMM.
inline Matrix<float> nf4_matmul_panels_t(const Nf4Tensor& W, const MatrixRef<float>& dY) {
  const Index out = W.rows(), in = W.cols(), T = dY.rows();
  if (dY.cols() != out)
    lora::detail::fail("nf4_matmul_t: gradient has {} columns, the NF4 weight has out_features = {}", dY.cols(), out);
  Matrix<float> dX(T, in);
  const int shift = detail::log2_exact(W.blocksize());
  const Index panel = std::max<Index>(16, std::min<Index>(512, (1 << 20) / std::max<Index>(out, 1)));
  const Index npanels = (in + panel - 1) / panel;
  LORA_QUANT_PRAGMA(omp parallel for schedule(dynamic))
  for (Index p = 0; p < npanels; ++p) {
    const Index k0 = p * panel, nk = std::min(panel, in - k0);
    Matrix<float> P(out, nk);
    for (Index i = 0; i < out; ++i)
      detail::nf4_decode_range(W.packed().data(), W.absmax().data(), shift, static_cast<std::int64_t>(i) * in + k0, nk,
                               P.data() + i * nk);
    dX.middleCols(k0, nk).noalias() = dY * P;
  }
  return dX;
}

/// Y = X·dequant(W)ᵀ: fused for T ≤ fused_max_tokens, row panels above.
inline constexpr Index fused_max_tokens = 16;
inline Matrix<float> nf4_matmul(const Nf4Tensor& W, const MatrixRef<float>& X) {
  return X.rows() <= fused_max_tokens ? nf4_matmul_fused(W, X) : nf4_matmul_panels(W, X);
}
/// dX = dY·dequant(W): fused for T ≤ fused_max_tokens, column panels above.
inline Matrix<float> nf4_matmul_t(const Nf4Tensor& W, const MatrixRef<float>& dY) {
  return dY.rows() <= fused_max_tokens ? nf4_matmul_fused_t(W, dY) : nf4_matmul_panels_t(W, dY);
}

}  // namespace quant

/// What merging an adapter into an NF4 base cost: the merged weight W + ΔW
/// (W dequantised) against its requantisation.
struct Nf4MergeReport {
  double max_abs_error = 0;   ///< max |requant(W + ΔW) − (W + ΔW)|
  double rms_error = 0;       ///< sqrt(mean of squared errors)
  double relative_error = 0;  ///< ‖requant(W + ΔW) − (W + ΔW)‖_F / ‖W + ΔW‖_F
  double delta_norm = 0;      ///< ‖ΔW‖_F, for scale
};

/// Merges ΔW = s·B·A into an NF4 weight: dequantise, add, requantise with the
/// same blocksize and double quantisation. Returns the error the requantisation adds.
template <ScalingPolicy Scaling>
Nf4MergeReport merge_into_nf4(Nf4Tensor& W, const LowRankAdapter<float, cpu, Scaling>& adapter) {
  if (adapter.fan_in_fan_out()) lora::detail::fail("merge_into_nf4: fan_in_fan_out adapters are not supported (NF4 weights are [out x in])");
  if (W.rows() != adapter.out_features() || W.cols() != adapter.in_features())
    lora::detail::fail("merge_into_nf4: NF4 weight has shape [{} x {}], adapter expects [{} x {}]", W.rows(), W.cols(),
                       adapter.out_features(), adapter.in_features());
  Matrix<float> M = W.dequantize<float>();
  const Matrix<float> d = adapter.delta_weight();
  M += d;
  W.requantize(M);
  const Matrix<float> R = W.dequantize<float>();
  Nf4MergeReport rep;
  const Eigen::ArrayXXd e = (R.cast<double>() - M.cast<double>()).array();
  rep.max_abs_error = e.size() ? e.abs().maxCoeff() : 0.0;
  rep.rms_error = e.size() ? std::sqrt(e.square().mean()) : 0.0;
  const double mn = M.cast<double>().norm();
  rep.relative_error = mn > 0 ? std::sqrt(e.square().sum()) / mn : 0.0;
  rep.delta_norm = d.cast<double>().norm();
  return rep;
}

/// A QLoRA linear layer: frozen NF4 base W [out × in] and a float LoRA adapter.
///
///   lora::QLoraLinear<> layer(lora::Nf4Tensor::quantize(W, {.double_quant = true}), std::move(adapter));
///   auto y = layer.forward(X);            // X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ
///   auto g = layer.backward(X, dY);       // g.dA, g.dB, g.dX (W frozen)
template <ScalingPolicy Scaling = standard_scaling>
class QLoraLinear {
 public:
  using adapter_type = LowRankAdapter<float, cpu, Scaling>;

  QLoraLinear(Nf4Tensor base, adapter_type adapter) : W_(std::move(base)), adapter_(std::move(adapter)) {
    if (W_.shape().size() != 2)
      lora::detail::fail("QLoraLinear: NF4 base weight must be 2-D [out x in], got {} dimensions", W_.shape().size());
    if (adapter_.fan_in_fan_out()) lora::detail::fail("QLoraLinear: fan_in_fan_out adapters are not supported");
    if (W_.rows() != adapter_.out_features() || W_.cols() != adapter_.in_features())
      lora::detail::fail("QLoraLinear: NF4 base weight has shape [{} x {}], adapter expects [out x in] = [{} x {}]",
                         W_.rows(), W_.cols(), adapter_.out_features(), adapter_.in_features());
  }

  const Nf4Tensor& base() const { return W_; }
  const adapter_type& adapter() const { return adapter_; }
  adapter_type& adapter() { return adapter_; }
  Index in_features() const { return W_.cols(); }
  Index out_features() const { return W_.rows(); }

  /// X·dequant(W)ᵀ for X [T × in].
  Matrix<float> base_forward(const MatrixRef<float>& X) const { return quant::nf4_matmul(W_, X); }

  /// X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ (evaluation mode).
  Matrix<float> forward(const MatrixRef<float>& X) const {
    Matrix<float> y = base_forward(X);
    if (X.rows() <= quant::fused_max_tokens) {
      // Few tokens: coefficient-wise products. Eigen's threaded GEMM would spin-wait
      // on a busy machine for products this small.
      const float s = static_cast<float>(adapter_.scaling());
      const Matrix<float> xa = s * X.lazyProduct(adapter_.A().transpose());
      y.noalias() += xa.lazyProduct(adapter_.B().transpose());
    } else {
      y.noalias() += adapter_.forward(X);
    }
    return y;
  }

  /// Gradients for dY = ∂L/∂Y with W frozen: dB = s·dYᵀ·(X·Aᵀ), dA = s·(dY·B)ᵀ·X,
  /// dX = dY·dequant(W) + s·(dY·B)·A.
  Gradients<float> backward(const MatrixRef<float>& X, const Eigen::Ref<const Matrix<float>>& dY) const {
    if (dY.rows() != X.rows() || dY.cols() != out_features())
      lora::detail::fail("QLoraLinear::backward: dY has shape [{} x {}], expected [{} x {}]", dY.rows(), dY.cols(),
                         X.rows(), out_features());
    if (X.cols() != in_features())
      lora::detail::fail("QLoraLinear::backward: input has {} columns, expected in_features = {}", X.cols(), in_features());
    Gradients<float> g;
    if (X.rows() <= quant::fused_max_tokens) {
      const float s = static_cast<float>(adapter_.scaling());
      const auto& A = adapter_.A();
      const auto& B = adapter_.B();
      const Matrix<float> xa = X.lazyProduct(A.transpose());   // [T × r]
      const Matrix<float> gb = s * dY.lazyProduct(B);           // [T × r]
      g.dB = s * dY.transpose().lazyProduct(xa);
      // Sums of outer products walk X and A along their contiguous rows.
      g.dA = Matrix<float>::Zero(A.rows(), A.cols());
      for (Index t = 0; t < X.rows(); ++t) g.dA.noalias() += gb.row(t).transpose() * X.row(t);
      g.dX = Matrix<float>::Zero(X.rows(), A.cols());
      for (Index r = 0; r < A.rows(); ++r) g.dX.noalias() += gb.col(r) * A.row(r);
    } else {
      g = adapter_.backward(X, dY);
    }
    g.dX.noalias() += quant::nf4_matmul_t(W_, dY);
    return g;
  }

  /// Merges the adapter into the NF4 base (dequantise, add, requantise), then
  /// zeroes B so forward() stays (approximately) the same. Returns the added error.
  Nf4MergeReport merge() {
    Nf4MergeReport r = merge_into_nf4(W_, adapter_);
    adapter_.B().setZero();
    return r;
  }

 private:
  Nf4Tensor W_;
  adapter_type adapter_;
};

}  // namespace lora
