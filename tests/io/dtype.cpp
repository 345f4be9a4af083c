// include/lora/io/dtype.hpp: names, sizes, the parsers, and the codec (every bf16 and f16
// pattern, rounding against a float64 round-to-nearest-even reference).
#include <lora/io/dtype.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"

using lora::io::dtype;

TEST_CASE("parse_dtype reads exactly the safetensors spelling and round-trips every name") {
  for (dtype t : {dtype::F64, dtype::F32, dtype::F16, dtype::BF16, dtype::I64, dtype::I32, dtype::I16, dtype::I8,
                  dtype::U8, dtype::BOOL, dtype::U16, dtype::U32, dtype::U64, dtype::F8_E4M3, dtype::F8_E5M2})
    CHECK(lora::io::parse_dtype(lora::io::dtype_name(t), "t") == t);
  CHECK_THROWS_AS(lora::io::parse_dtype("bf16", "t"), lora::error);  // a file's header is not user input
  CHECK_THROWS_WITH(lora::io::parse_dtype("F33", "x.safetensors: tensor 'w'"),
                    Catch::Matchers::ContainsSubstring("x.safetensors: tensor 'w'") &&
                        Catch::Matchers::ContainsSubstring("'F33'"));
}

TEST_CASE("dtype_size matches the element widths") {
  CHECK(lora::io::dtype_size(dtype::F64) == 8);
  CHECK(lora::io::dtype_size(dtype::F32) == 4);
  CHECK(lora::io::dtype_size(dtype::BF16) == 2);
  CHECK(lora::io::dtype_size(dtype::F16) == 2);
  CHECK(lora::io::dtype_size(dtype::U8) == 1);
  CHECK(lora::io::dtype_size(dtype::F8_E4M3) == 1);
}

TEST_CASE("parse_float_dtype accepts every usual spelling in any case") {
  using lora::io::parse_float_dtype;
  for (const char* s : {"bf16", "BF16", "Bf16", "bfloat16", "BFloat16", "torch.bfloat16"})
    CHECK(parse_float_dtype(s, "--dtype") == dtype::BF16);
  for (const char* s : {"f16", "F16", "fp16", "FP16", "float16", "half", "torch.float16"})
    CHECK(parse_float_dtype(s, "--dtype") == dtype::F16);
  for (const char* s : {"f32", "F32", "fp32", "float32", "Float", "torch.float32"})
    CHECK(parse_float_dtype(s, "--dtype") == dtype::F32);
  for (const char* s : {"f64", "F64", "fp64", "float64", "double"}) CHECK(parse_float_dtype(s, "--dtype") == dtype::F64);
}

TEST_CASE("parse_float_dtype refuses non-float and unknown names, naming the option") {
  using lora::io::parse_float_dtype;
  for (const char* s : {"", "U8", "i8", "f8", "F8_E4M3", "bf16 ", "b16", "int4", "torch."}) {
    INFO(s);
    CHECK_THROWS_WITH(parse_float_dtype(s, "--adapter-dtype"),
                      Catch::Matchers::ContainsSubstring("--adapter-dtype") &&
                          Catch::Matchers::ContainsSubstring("'" + std::string(s) + "'"));
  }
}

// ---- the codec ----------------------------------------------------------------------------

namespace {

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// float64 reference of round-to-nearest-even onto a sorted table of finite non-negative
// values (the format's), with `overflow` the magnitude from which the result is infinity.
template <class Table>
double round_ref(double x, const Table& finite, double overflow) {
  const double a = std::abs(x);
  if (a >= overflow) return std::copysign(std::numeric_limits<double>::infinity(), x);
  const auto hi = std::lower_bound(finite.begin(), finite.end(), a);
  if (hi == finite.end()) return std::copysign(finite.back(), x);  // above the largest, below overflow
  if (*hi == a) return std::copysign(a, x);
  const auto lo = hi - 1;
  const double dl = a - *lo, dh = *hi - a;
  const bool up = dh < dl || (dh == dl && ((hi - finite.begin()) % 2 == 0));  // even code wins a tie
  return std::copysign(up ? *hi : *lo, x);
}

// Random floats over the whole range a format covers, plus its rounding ties.
std::vector<float> probes(std::uint64_t seed, double lo_exp, double hi_exp) {
  lora::Generator gen(seed);
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 200000; ++i)
    v.push_back(static_cast<float>((gen.uniform(0, 1) < 0.5 ? -1 : 1) * std::exp2(gen.uniform(lo_exp, hi_exp))));
  return v;
}

}  // namespace

TEST_CASE("bf16 codec: exact decode, round-to-nearest-even encode against a float64 reference") {
  using namespace lora::io;
  std::vector<double> finite;  // every finite non-negative bf16, ascending
  for (std::uint32_t h = 0; h < 0x7f80; ++h) finite.push_back(bf16_to_float(static_cast<std::uint16_t>(h)));
  const double overflow = (double(bf16_to_float(0x7f7f)) + std::ldexp(1.0, 128)) / 2;  // halfway to 2^128
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(static_cast<std::uint16_t>(h));
    CHECK(bits(f) == h << 16);
    if (std::isnan(f)) {
      const std::uint16_t back = float_to_bf16(f);
      CHECK(std::isnan(bf16_to_float(back)));
      CHECK((back & 0x8040) == ((h & 0x8000) | 0x40));  // sign kept, quiet
    } else {
      REQUIRE(float_to_bf16(f) == h);
    }
  }
  auto xs = probes(lora::test::fresh_seed(), -140, 128);
  for (std::uint32_t h = 0; h < 0x7f7f; h += 97) {  // exact ties between neighbours
    const double mid = (double(bf16_to_float(static_cast<std::uint16_t>(h))) + bf16_to_float(static_cast<std::uint16_t>(h + 1))) / 2;
    xs.push_back(static_cast<float>(mid));
    xs.push_back(static_cast<float>(-mid));
  }
  for (float x : xs) {
    INFO("x = " << x);
    const double want = round_ref(x, finite, overflow);
    REQUIRE(double(bf16_to_float(float_to_bf16(x))) == want);
    REQUIRE(float_to_bf16(x) == Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x)));  // as Eigen and torch
  }
}

TEST_CASE("f16 codec: exact decode, round-to-nearest-even encode against a float64 reference") {
  using namespace lora::io;
  std::vector<double> finite;
  for (std::uint32_t h = 0; h < 0x7c00; ++h) finite.push_back(f16_to_float(static_cast<std::uint16_t>(h)));
  const double overflow = 65520.0;  // halfway between 65504 and 2^16
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float f = f16_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    REQUIRE(float_to_f16(f) == h);
    if ((h & 0x7fff) < 0x7c00) REQUIRE(double(f) == std::copysign(finite[h & 0x7fff], (h & 0x8000) ? -1.0 : 1.0));
  }
  CHECK(std::isnan(f16_to_float(float_to_f16(std::numeric_limits<float>::quiet_NaN()))));
  auto xs = probes(lora::test::fresh_seed(), -26, 17);
  for (std::uint32_t h = 0; h < 0x7bff; h += 31) {
    const double mid = (double(f16_to_float(static_cast<std::uint16_t>(h))) + f16_to_float(static_cast<std::uint16_t>(h + 1))) / 2;
    xs.push_back(static_cast<float>(mid));
  }
  for (float x : xs) {
    INFO("x = " << x);
    REQUIRE(double(f16_to_float(float_to_f16(x))) == round_ref(x, finite, overflow));
  }
}

TEST_CASE("fp8 decoders: torch's float8_e4m3fn and float8_e5m2") {
  using namespace lora::io;
  CHECK(f8_e4m3_to_float(0x38) == 1.0f);
  CHECK(f8_e4m3_to_float(0x7e) == 448.0f);   // the largest
  CHECK(f8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));  // the smallest subnormal
  CHECK(f8_e4m3_to_float(0xb8) == -1.0f);
  CHECK(std::isnan(f8_e4m3_to_float(0x7f)));
  CHECK(std::isnan(f8_e4m3_to_float(0xff)));
  CHECK(f8_e5m2_to_float(0x3c) == 1.0f);
  CHECK(f8_e5m2_to_float(0x7b) == 57344.0f);
  CHECK(std::isinf(f8_e5m2_to_float(0x7c)));
  CHECK(f8_e5m2_to_float(0x01) == std::ldexp(1.0f, -16));
  // every e4m3 code against its definition (1 + m/8) · 2^(e-7), subnormals m/8 · 2^-6
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) continue;
    const double v = (e == 0 ? m / 8.0 * std::ldexp(1.0, -6) : (1 + m / 8.0) * std::ldexp(1.0, e - 7)) * ((b & 0x80) ? -1 : 1);
    REQUIRE(double(f8_e4m3_to_float(static_cast<std::uint8_t>(b))) == v);
  }
}

TEST_CASE("decode_floats / encode_floats: every float dtype, float and double, as the scalar codecs") {
  using namespace lora::io;
  lora::Generator gen(lora::test::fresh_seed());
  std::vector<double> x(1001);
  for (auto& v : x) v = gen.normal(0.0, 3.0);
  for (dtype t : {dtype::F64, dtype::F32, dtype::F16, dtype::BF16}) {
    INFO(dtype_name(t));
    std::vector<std::byte> b(x.size() * dtype_size(t)), bf(b.size());
    encode_floats(t, x.data(), b.data(), x.size());
    std::vector<float> xf(x.begin(), x.end());
    encode_floats(t, xf.data(), bf.data(), x.size());
    std::vector<double> back(x.size());
    std::vector<float> backf(x.size());
    decode_floats(t, b.data(), back.data(), x.size());
    decode_floats(t, bf.data(), backf.data(), x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const float f = static_cast<float>(x[i]);
      const double want = t == dtype::F64   ? x[i]
                          : t == dtype::F32 ? double(f)
                          : t == dtype::F16 ? double(f16_to_float(float_to_f16(f)))
                                            : double(bf16_to_float(float_to_bf16(f)));
      REQUIRE(back[i] == want);
      // from float the value is rounded once (for F64 it is the float, exactly)
      REQUIRE(double(backf[i]) == (t == dtype::F64 ? double(f) : want));
    }
  }
  std::vector<std::byte> b(8);
  float v = 1.0f;
  CHECK_THROWS_WITH(encode_floats(dtype::I32, &v, b.data(), 1), Catch::Matchers::ContainsSubstring("I32"));
  CHECK_THROWS_WITH(decode_floats(dtype::U8, b.data(), &v, 1), Catch::Matchers::ContainsSubstring("U8"));
  CHECK(is_float(dtype::BF16));
  CHECK_FALSE(is_float(dtype::F8_E4M3));
}
