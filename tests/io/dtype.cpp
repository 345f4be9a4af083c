// include/lora/io/dtype.hpp: names, sizes and the parsers.
#include <lora/io/dtype.hpp>

#include "support/catch.hpp"

#include <string>

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
