#pragma once
// lora::io::dtype — the element types of safetensors files: names as the files spell them,
// sizes, and the one parser of a dtype as a user writes it (--dtype bf16, BF16, bfloat16, ...).

#include <lora/error.hpp>

#include <cctype>
#include <cstddef>
#include <string>
#include <string_view>

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
