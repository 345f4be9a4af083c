// include/lora/quant/nf4_tensor.hpp: Nf4Tensor — quantise/dequantise against a float64
// nearest-code reference, NF4's error figures, zero blocks, partial blocks, the source dtypes,
// storage size and the checks on bad input.
#include <lora/quant/nf4_tensor.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "support/catch.hpp"
#include "support/nf4_reference.hpp"
#include "support/reference.hpp"

using namespace lora;

TEST_CASE("Nf4Tensor: all-zero blocks have absmax 0, code 0 and dequantise to 0", "[quant][nf4_tensor]") {
  Generator gen(test::fresh_seed());
  std::vector<float> x(64 * 5);
  for (auto& v : x) v = static_cast<float>(gen.normal());
  std::fill(x.begin() + 64, x.begin() + 128, 0.0f);
  std::fill(x.begin() + 256, x.end(), -0.0f);
  const auto t = Nf4Tensor::quantize_values(x.data(), {static_cast<std::int64_t>(x.size())}, {64, false});
  CHECK(t.absmax()[1] == 0.0f);
  CHECK(t.absmax()[4] == 0.0f);
  for (std::int64_t i = 64; i < 128; ++i) CHECK(t.code(i) == 0);
  const auto d = t.dequantize<float>();
  for (std::int64_t i = 64; i < 128; ++i) CHECK(d(i, 0) == 0.0f);
  for (std::int64_t i = 256; i < 320; ++i) CHECK(d(i, 0) == 0.0f);
  CHECK(t.absmax()[0] > 0.0f);
}

TEST_CASE("Nf4Tensor: error statistics on normal data match NF4's known figures", "[quant][nf4_tensor]") {
  Generator gen(test::fresh_seed());
  const Index rows = 256, cols = 512;
  const Matrix<float> W = test::random_matrix<float>(rows, cols, gen, 0.02);
  for (std::int64_t bs : {64, 128, 4096}) {
    const auto t = Nf4Tensor::quantize(W, {bs, false});
    const Matrix<float> D = t.dequantize<float>();
    double rel_sum = 0;
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) {
        const std::int64_t flat = i * cols + j;
        const double am = t.absmax()[flat / bs];
        rel_sum += std::abs(double(D(i, j)) - double(W(i, j))) / am;
        // The error never exceeds half of the widest gap between codes (-1 to -0.6962).
        REQUIRE(std::abs(double(D(i, j)) - double(W(i, j))) <= 0.5 * (1.0 - 0.6961928009986877) * am + 1e-7 * am);
      }
    const double mean_rel = rel_sum / double(rows * cols);
    INFO("blocksize " << bs << " mean |error|/absmax = " << mean_rel);
    // For Gaussian data, NF4's mean absolute error is about 2.85% of absmax at
    // blocksize 64 (2.75% at 128, 2.45% at 4096: absmax grows with the block).
    // A float64 re-implementation (nearest code) on the same data agrees.
    double ref_sum = 0;
    for (std::int64_t b = 0; b < quant::num_blocks(W.size(), bs); ++b) {
      double am = 0;
      for (std::int64_t k = b * bs; k < std::min<std::int64_t>(W.size(), (b + 1) * bs); ++k)
        am = std::max(am, std::abs(double(W.data()[k])));
      for (std::int64_t k = b * bs; k < std::min<std::int64_t>(W.size(), (b + 1) * bs); ++k) {
        const double x = W.data()[k] / am;
        ref_sum += std::abs(quant::nf4_code[test::nearest_nf4_code(x)] - x);
      }
    }
    CHECK(mean_rel == Approx(ref_sum / double(W.size())).epsilon(1e-4));
    if (bs == 64) {
      CHECK(mean_rel > 0.026);
      CHECK(mean_rel < 0.031);
    } else {
      CHECK(mean_rel > 0.020);
      CHECK(mean_rel < 0.031);
    }
    // Relative Frobenius error of NF4 on Gaussian weights: ≈ 0.09-0.11.
    const double rel = test::rel_error(D, W);
    INFO("relative Frobenius error " << rel);
    CHECK(rel > 0.05);
    CHECK(rel < 0.15);
  }
}

TEST_CASE("Nf4Tensor: round trip is idempotent (dequantised values requantise to the same codes)", "[quant][nf4_tensor]") {
  Generator gen(test::fresh_seed());
  const Matrix<float> W = test::random_matrix<float>(33, 97, gen);  // odd count, partial last block
  for (std::int64_t bs : {32, 64, 256}) {
    const auto t = Nf4Tensor::quantize(W, {bs, false});
    const Matrix<float> D = t.dequantize<float>();
    const auto t2 = Nf4Tensor::quantize(D, {bs, false});
    REQUIRE(t2.absmax() == t.absmax());
    for (std::int64_t i = 0; i < t.numel(); ++i) REQUIRE(t2.code(i) == t.code(i));
    const Matrix<float> D2 = t2.dequantize<float>();
    CHECK(D2 == D);
  }
}

TEST_CASE("Nf4Tensor: odd element counts and partial last blocks", "[quant][nf4_tensor]") {
  Generator gen(test::fresh_seed());
  for (std::int64_t n : {1, 3, 31, 33, 63, 65, 127, 4097}) {
    INFO("n = " << n);
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& v : x) v = static_cast<float>(gen.normal());
    const auto t = Nf4Tensor::quantize_values(x.data(), {n}, {32, false});
    REQUIRE(static_cast<std::int64_t>(t.packed().size()) == (n + 1) / 2);
    REQUIRE(static_cast<std::int64_t>(t.absmax().size()) == (n + 31) / 32);
    std::vector<float> d(x.size());
    t.dequantize_into(d.data());
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t b = i / 32;
      double am = 0;
      for (std::int64_t j = b * 32; j < std::min(n, b * 32 + 32); ++j) am = std::max(am, std::abs(double(x[j])));
      REQUIRE(t.absmax()[b] == static_cast<float>(am));
      const float inv = 1.0f / static_cast<float>(am);
      const int c = test::nearest_nf4_code(double(x[i] * inv));
      REQUIRE(t.code(i) == c);
      REQUIRE(d[i] == quant::nf4_code[c] * static_cast<float>(am));
    }
  }
}

TEST_CASE("Nf4Tensor: dequantisation to bfloat16 and half rounds the float32 values", "[quant][nf4_tensor]") {
  Generator gen(test::fresh_seed());
  const Matrix<float> W = test::random_matrix<float>(17, 300, gen, 3.0);
  const auto t = Nf4Tensor::quantize(W, {64, false});
  const Matrix<float> F = t.dequantize<float>();
  const Matrix<bfloat16> B = t.dequantize<bfloat16>();
  const Matrix<half> H = t.dequantize<half>();
  for (Index i = 0; i < W.rows(); ++i)
    for (Index j = 0; j < W.cols(); ++j) {
      REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(B(i, j)) ==
              Eigen::numext::bit_cast<std::uint16_t>(bfloat16(F(i, j))));
      REQUIRE(Eigen::numext::bit_cast<std::uint16_t>(H(i, j)) == Eigen::numext::bit_cast<std::uint16_t>(half(F(i, j))));
    }
}

TEST_CASE("Nf4Tensor: bfloat16 and half inputs are quantised from their float values", "[quant][nf4_tensor]") {
  Generator gen(test::fresh_seed());
  const Matrix<float> W = test::random_matrix<float>(8, 96, gen);
  const Matrix<bfloat16> Wb = W.cast<bfloat16>();
  const auto tb = Nf4Tensor::quantize(Wb, {32, false});
  const auto tf = Nf4Tensor::quantize(Matrix<float>(Wb.cast<float>()), {32, false});
  CHECK(tb.packed() == tf.packed());
  CHECK(tb.absmax() == tf.absmax());
  CHECK(tb.dtype() == source_dtype::bfloat16);
  const Matrix<half> Wh = W.cast<half>();
  CHECK(Nf4Tensor::quantize(Wh).dtype() == source_dtype::float16);
}

TEST_CASE("Nf4Tensor: bad input is rejected with a clear message", "[quant][nf4_tensor]") {
  std::vector<float> x(100, 1.0f);
  CHECK_THROWS_WITH(Nf4Tensor::quantize_values(x.data(), {100}, {48, false}),
                    Catch::Matchers::ContainsSubstring("blocksize must be a power of two from 32 to 4096, got 48"));
  CHECK_THROWS_AS(Nf4Tensor::quantize_values(x.data(), {100}, {8192, false}), lora::error);
  x[57] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(Nf4Tensor::quantize_values(x.data(), {100}), Catch::Matchers::ContainsSubstring("element 57"));
  x[57] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(Nf4Tensor::quantize_values(x.data(), {100}), Catch::Matchers::ContainsSubstring("element 57"));
  CHECK_THROWS_WITH(Nf4Tensor::from_parts({10, 10}, 64, std::vector<std::uint8_t>(49), {1.0f, 1.0f}, std::nullopt),
                    Catch::Matchers::ContainsSubstring("49 packed bytes given, shape needs 50"));
  CHECK_THROWS_WITH(Nf4Tensor::from_parts({10, 10}, 64, std::vector<std::uint8_t>(50), {1.0f}, std::nullopt),
                    Catch::Matchers::ContainsSubstring("1 absmax values given, expected 2"));
}

TEST_CASE("Nf4Tensor: bits per parameter", "[quant][nf4_tensor]") {
  CHECK(quant::nf4_bits_per_parameter(64, false) == 4.5);
  CHECK(quant::nf4_bits_per_parameter(64, true) == Approx(4.127).epsilon(1e-3));
  Generator gen(test::fresh_seed());
  const Matrix<float> W = test::random_matrix<float>(256, 1024, gen);
  const auto a = Nf4Tensor::quantize(W, {64, false});
  const auto b = Nf4Tensor::quantize(W, {64, true});
  CHECK(double(a.storage_bytes()) * 8 / double(W.size()) == Approx(4.5));
  CHECK(double(b.storage_bytes()) * 8 / double(W.size()) == Approx(4.127 + 8.0 * (4 * 256 + 4) / double(W.size())).epsilon(1e-3));
}
