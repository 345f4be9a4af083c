#pragma once
// lora::io::dtype — the element types of safetensors files: names as the files spell them,
// sizes, the one parser of a dtype as a user writes it (--dtype bf16, BF16, bfloat16, ...),
// and the one codec between float dtypes' bytes and float/double (every reader and writer in
// io/ converts through it).

#include <lora/error.hpp>

#include <Eigen/Core>  // Eigen::half's conversions

#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

// The bf16 loops below are plain integer arithmetic on each element; GCC at -O2 vectorises
// them only when told (with OpenMP; otherwise the pragma is left out).
#if defined(_OPENMP)
#define LORA_IO_SIMD _Pragma("omp simd")
#else
#define LORA_IO_SIMD
#endif

namespace lora::io {

/// The safetensors element types. U16/U32/U64 and the FP8 types (F8_E4M3: torch's
/// float8_e4m3fn; F8_E5M2) are read, converted and copied; writing converts to them only
/// for the integer types.
enum class dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, U16, U32, U64, F8_E4M3, F8_E5M2 };

/// The name a safetensors header uses: "F32", "BF16", ...
inline std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::F64: return "F64";
    case dtype::F32: return "F32";
    case dtype::F16: return "F16";
    case dtype::BF16: return "BF16";
    case dtype::I64: return "I64";
    case dtype::I32: return "I32";
    case dtype::I16: return "I16";
    case dtype::I8: return "I8";
    case dtype::U8: return "U8";
    case dtype::BOOL: return "BOOL";
    case dtype::U16: return "U16";
    case dtype::U32: return "U32";
    case dtype::U64: return "U64";
    case dtype::F8_E4M3: return "F8_E4M3";
    case dtype::F8_E5M2: return "F8_E5M2";
  }
  return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::F64:
    case dtype::I64:
    case dtype::U64: return 8;
    case dtype::F32:
    case dtype::I32:
    case dtype::U32: return 4;
    case dtype::F16:
    case dtype::BF16:
    case dtype::I16:
    case dtype::U16: return 2;
    case dtype::I8:
    case dtype::U8:
    case dtype::BOOL:
    case dtype::F8_E4M3:
    case dtype::F8_E5M2: return 1;
  }
  return 0;
}

/// Whether a dtype holds floating-point values the codec converts (F64, F32, F16, BF16).
inline bool is_float(dtype t) { return t == dtype::F64 || t == dtype::F32 || t == dtype::F16 || t == dtype::BF16; }

/// bfloat16 bits → float (exact: the upper half of the float).
inline float bf16_to_float(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// float → bfloat16 bits, rounded to nearest even (torch's and Eigen's rounding); a NaN stays
/// a quiet NaN with its sign and upper payload bits. Branch-free, so loops over it vectorise.
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/// IEEE binary16 bits → float (exact).
inline float f16_to_float(std::uint16_t h) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(h));
}

/// float → IEEE binary16 bits, rounded to nearest even (overflow to ±Inf, subnormals kept).
inline std::uint16_t float_to_f16(float f) { return Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(f)); }

/// torch.float8_e4m3fn → float (exact): bias 7, no infinities, S.1111.111 is NaN.
inline float f8_e4m3_to_float(std::uint8_t b) {
  const int e = (b >> 3) & 0xf, m = b & 7;
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  if (e == 0xf && m == 7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -9);  // m/8 · 2^-6
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
}

/// torch.float8_e5m2 → float (exact): the upper byte of an IEEE half.
inline float f8_e5m2_to_float(std::uint8_t b) { return f16_to_float(static_cast<std::uint16_t>(b << 8)); }

/// n elements of float dtype `t` at `src` (little-endian, any alignment) → C (float or
/// double). Exact, except F64 → float, which rounds once to nearest.
template <class C>
void decode_floats(dtype t, const std::byte* src, C* out, std::size_t n) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "decode_floats: C must be float or double");
  switch (t) {
    case dtype::BF16:
      LORA_IO_SIMD
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = static_cast<C>(bf16_to_float(h));
      }
      return;
    case dtype::F16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = static_cast<C>(f16_to_float(h));
      }
      return;
    case dtype::F32:
      if constexpr (std::is_same_v<C, float>) {
        if (n) std::memcpy(out, src, 4 * n);
      } else {
        for (std::size_t i = 0; i < n; ++i) {
          float f;
          std::memcpy(&f, src + 4 * i, 4);
          out[i] = static_cast<C>(f);
        }
      }
      return;
    case dtype::F64:
      for (std::size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        out[i] = static_cast<C>(d);
      }
      return;
    default: lora::fail("decode_floats: dtype {} is not a float type", dtype_name(t));
  }
}

/// n values of C (float or double) → float dtype `t` at `dst`, each rounded to nearest even.
/// BF16 and F16 round from the value as a float (a double is first rounded to float, as
/// torch's .to(bfloat16) of a float64 tensor does).
template <class C>
void encode_floats(dtype t, const C* in, std::byte* dst, std::size_t n) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "encode_floats: C must be float or double");
  switch (t) {
    case dtype::BF16:
      LORA_IO_SIMD
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint16_t h = float_to_bf16(static_cast<float>(in[i]));
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case dtype::F16:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint16_t h = float_to_f16(static_cast<float>(in[i]));
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case dtype::F32:
      if constexpr (std::is_same_v<C, float>) {
        if (n) std::memcpy(dst, in, 4 * n);
      } else {
        for (std::size_t i = 0; i < n; ++i) {
          const float f = static_cast<float>(in[i]);
          std::memcpy(dst + 4 * i, &f, 4);
        }
      }
      return;
    case dtype::F64:
      for (std::size_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(in[i]);
        std::memcpy(dst + 8 * i, &d, 8);
      }
      return;
    default: lora::fail("encode_floats: dtype {} is not a float type", dtype_name(t));
  }
}

/// Parses a safetensors header's dtype exactly as the format spells it ("F32", "BF16", ...);
/// `where` names the file and tensor for the message.
inline dtype parse_dtype(std::string_view s, std::string_view where) {
  static constexpr dtype all[] = {dtype::F64, dtype::F32, dtype::F16, dtype::BF16,    dtype::I64,
                                  dtype::I32, dtype::I16, dtype::I8,  dtype::U8,      dtype::BOOL,
                                  dtype::U16, dtype::U32, dtype::U64, dtype::F8_E4M3, dtype::F8_E5M2};
  for (dtype t : all)
    if (dtype_name(t) == s) return t;
  lora::fail("{}: unknown dtype '{}' (expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, U16, "
             "U32, U64, F8_E4M3, F8_E5M2)",
             where, s);
}

/// Parses a floating-point dtype as people write it, in any case: f32/fp32/float32/float,
/// bf16/bfloat16, f16/fp16/float16/half, f64/fp64/float64/double (torch's "torch.bfloat16"
/// too). `where` names the option or field for the message, e.g. "--dtype".
///   parse_float_dtype("BFloat16", "--dtype") == dtype::BF16
inline dtype parse_float_dtype(std::string_view s, std::string_view where) {
  std::string k;
  for (char c : s) k += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (k.rfind("torch.", 0) == 0) k.erase(0, 6);
  if (k == "f32" || k == "fp32" || k == "float32" || k == "float") return dtype::F32;
  if (k == "bf16" || k == "bfloat16") return dtype::BF16;
  if (k == "f16" || k == "fp16" || k == "float16" || k == "half") return dtype::F16;
  if (k == "f64" || k == "fp64" || k == "float64" || k == "double") return dtype::F64;
  lora::fail("{} must be a float type (f32, bf16, f16 or f64, in any case; also fp32, float32, bfloat16, ...), "
             "got '{}'",
             where, s);
}

}  // namespace lora::io
