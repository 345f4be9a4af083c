// QLoRA layer: fused NF4 products against dequantise-then-GEMM and a float64
// reference, gradients against the float64 reference and finite differences,
// merging into an NF4 base.
#include <lora/core/init.hpp>
#include <lora/quant/qlora.hpp>

#include <cmath>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using test::MatD;

namespace {

LowRankAdapter<float> random_adapter(Index in, Index out, Index r, double alpha, Generator& gen) {
  return LowRankAdapter<float>::from_factors(test::random_matrix<float>(r, in, gen, 0.1),
                                             test::random_matrix<float>(out, r, gen, 0.1), alpha);
}

}  // namespace

TEST_CASE("qlora: fused NF4 products equal dequantise-then-multiply", "[quant][qlora]") {
  Generator gen(test::fresh_seed());
  // Shapes with rows that start mid-block and mid-byte (in odd, not a multiple of
  // the blocksize), and one larger than a decode chunk.
  struct Shape {
    Index out, in;
    std::int64_t bs;
  };
  for (auto [out, in, bs] : {Shape{37, 53, 32}, Shape{64, 128, 64}, Shape{19, 2500, 128}, Shape{5, 7, 64}}) {
    INFO("out " << out << " in " << in << " blocksize " << bs);
    const Matrix<float> W = test::random_matrix<float>(out, in, gen, 0.05);
    for (bool dq : {false, true}) {
      const auto Wq = Nf4Tensor::quantize(W, {bs, dq});
      const MatD Wd = Wq.dequantize<float>().cast<double>();
      for (Index T : {1, 2, 3, 4, 5, 7, 16, 17, 40}) {
        INFO("T = " << T << " double_quant " << dq);
        const Matrix<float> X = test::random_matrix<float>(T, in, gen);
        const MatD ref = X.cast<double>() * Wd.transpose();
        const Matrix<float> fused = quant::nf4_matmul_fused(Wq, X);
        const Matrix<float> panels = quant::nf4_matmul_panels(Wq, X);
        const Matrix<float> plain = X * Wq.dequantize<float>().transpose();
        CHECK(test::rel_error(fused, ref) < 1e-5);
        CHECK(test::rel_error(panels, ref) < 1e-5);
        CHECK(test::rel_error(fused, plain) < 1e-5);
        const Matrix<float> dY = test::random_matrix<float>(T, out, gen);
        const MatD refT = dY.cast<double>() * Wd;
        CHECK(test::rel_error(quant::nf4_matmul_fused_t(Wq, dY), refT) < 1e-5);
        CHECK(test::rel_error(quant::nf4_matmul_panels_t(Wq, dY), refT) < 1e-5);
      }
    }
  }
}

TEST_CASE("qlora: fast mode forward stays within its error bound", "[quant][qlora]") {
  // Base product from int8 activations and codes (nf4_cpu.hpp); the adapter in float.
  // Per output: |Δ| ≤ Σ_k |x_k|·e_w·absmax_k + |w_k|·d_k/2 + e_w·absmax_k·d_k/2 (e_w the
  // code table's rounding, d_k/2 half a step of x_k's group of 32), plus float rounding.
  Generator gen(test::fresh_seed());
  const Index in = 160, out = 48, r = 4;
  const Matrix<float> W = test::random_matrix<float>(out, in, gen, 0.05);
  QLoraLinear<> layer(Nf4Tensor::quantize(W, {64, true}), random_adapter(in, out, r, 8.0, gen));
  layer.set_mode(quant::nf4_mode::fast);
  CHECK(layer.mode() == quant::nf4_mode::fast);
  const double s = layer.adapter().scaling();
  const MatD Wd = layer.base().dequantize<float>().cast<double>();
  const MatD A = layer.adapter().A().cast<double>(), B = layer.adapter().B().cast<double>();
  const auto& absmax = layer.base().absmax();
  for (Index T : {1, 5, 16}) {
    INFO("T = " << T);
    const Matrix<float> X = test::random_matrix<float>(T, in, gen);
    const MatD Xd = X.cast<double>();
    const MatD yref = Xd * Wd.transpose() + s * (Xd * A.transpose()) * B.transpose();
    const Matrix<float> y = layer.forward(X);
    const double ew = quant::nf4_code_i8_max_error;
    for (Index t = 0; t < T; ++t)
      for (Index i = 0; i < out; ++i) {
        double bound = 0, mag = 0;
        for (Index k = 0; k < in; ++k) {
          double amax = 0;
          for (Index j = k / 32 * 32; j < std::min<Index>(in, k / 32 * 32 + 32); ++j) amax = std::max(amax, std::abs(Xd(t, j)));
          const double hx = amax / 254.0 * (1 + 1e-5), sw = absmax[static_cast<std::size_t>((i * in + k) / 64)];
          bound += std::abs(Xd(t, k)) * ew * sw + std::abs(Wd(i, k)) * hx + ew * sw * hx;
          mag += std::abs(Xd(t, k) * Wd(i, k));
        }
        REQUIRE(std::abs(y(t, i) - yref(t, i)) <= bound + 1e-5 * (mag + 1));
      }
    // The bound is not vacuous: it is far below the outputs' size.
    CHECK(test::rel_error(y, yref) < 0.05);
  }
}

TEST_CASE("qlora: forward and backward against a float64 reference", "[quant][qlora]") {
  Generator gen(test::fresh_seed());
  const Index in = 96, out = 80, r = 8;
  const Matrix<float> W = test::random_matrix<float>(out, in, gen, 0.05);
  QLoraLinear<> layer(Nf4Tensor::quantize(W, {64, true}), random_adapter(in, out, r, 16.0, gen));
  const double s = layer.adapter().scaling();
  const MatD Wd = layer.base().dequantize<float>().cast<double>();
  const MatD A = layer.adapter().A().cast<double>(), B = layer.adapter().B().cast<double>();
  for (Index T : {1, 6, 16, 33}) {
    INFO("T = " << T);
    const Matrix<float> X = test::random_matrix<float>(T, in, gen);
    const MatD Xd = X.cast<double>();
    const MatD yref = Xd * Wd.transpose() + s * (Xd * A.transpose()) * B.transpose();
    CHECK(test::rel_error(layer.forward(X), yref) < 1e-5);

    const Matrix<float> dY = test::random_matrix<float>(T, out, gen);
    const MatD dYd = dY.cast<double>();
    const auto g = layer.backward(X, dY);
    const MatD gb = s * dYd * B;
    CHECK(test::rel_error(g.dB, s * dYd.transpose() * (Xd * A.transpose())) < 1e-5);
    CHECK(test::rel_error(g.dA, gb.transpose() * Xd) < 1e-5);
    CHECK(test::rel_error(g.dX, dYd * Wd + gb * A) < 1e-5);
  }
}

TEST_CASE("qlora: gradients match finite differences of the loss", "[quant][qlora]") {
  Generator gen(test::fresh_seed());
  const Index in = 40, out = 24, r = 4, T = 3;
  const Matrix<float> W = test::random_matrix<float>(out, in, gen, 0.1);
  QLoraLinear<> layer(Nf4Tensor::quantize(W, {32, false}), random_adapter(in, out, r, 8.0, gen));
  const Matrix<float> X = test::random_matrix<float>(T, in, gen);
  const Matrix<float> C = test::random_matrix<float>(T, out, gen);  // L = Σ C ⊙ Y, so dY = C
  const auto g = layer.backward(X, C);
  // Loss in float64 from the layer's own pieces (W frozen as its dequantised value).
  const MatD Wd = layer.base().dequantize<float>().cast<double>();
  auto loss = [&](const MatD& Xd, const MatD& A, const MatD& B) {
    const MatD Y = Xd * Wd.transpose() + layer.adapter().scaling() * (Xd * A.transpose()) * B.transpose();
    return (Y.array() * C.cast<double>().array()).sum();
  };
  const MatD X0 = X.cast<double>(), A0 = layer.adapter().A().cast<double>(), B0 = layer.adapter().B().cast<double>();
  const double h = 1e-5;
  for (int k = 0; k < 20; ++k) {
    const Index i = static_cast<Index>(gen.uniform() * r), j = static_cast<Index>(gen.uniform() * in);
    MatD Ap = A0, Am = A0;
    Ap(i, j) += h;
    Am(i, j) -= h;
    CHECK(g.dA(i, j) == Approx((loss(X0, Ap, B0) - loss(X0, Am, B0)) / (2 * h)).epsilon(1e-3).margin(1e-4));
    const Index o = static_cast<Index>(gen.uniform() * out), q = static_cast<Index>(gen.uniform() * r);
    MatD Bp = B0, Bm = B0;
    Bp(o, q) += h;
    Bm(o, q) -= h;
    CHECK(g.dB(o, q) == Approx((loss(X0, A0, Bp) - loss(X0, A0, Bm)) / (2 * h)).epsilon(1e-3).margin(1e-4));
    const Index t = static_cast<Index>(gen.uniform() * T), c = static_cast<Index>(gen.uniform() * in);
    MatD Xp = X0, Xm = X0;
    Xp(t, c) += h;
    Xm(t, c) -= h;
    CHECK(g.dX(t, c) == Approx((loss(Xp, A0, B0) - loss(Xm, A0, B0)) / (2 * h)).epsilon(1e-3).margin(1e-4));
  }
}

TEST_CASE("qlora: merging into an NF4 base", "[quant][qlora]") {
  Generator gen(test::fresh_seed());
  const Index in = 128, out = 64, r = 8;
  const Matrix<float> W = test::random_matrix<float>(out, in, gen, 0.05);
  for (bool dq : {false, true}) {
    QLoraLinear<> layer(Nf4Tensor::quantize(W, {64, dq}), random_adapter(in, out, r, 16.0, gen));
    const Matrix<float> X = test::random_matrix<float>(5, in, gen);
    const MatD before = layer.forward(X).cast<double>();
    const MatD merged_exact = layer.base().dequantize<float>().cast<double>() + layer.adapter().delta_weight().cast<double>();
    const auto rep = layer.merge();
    CHECK(layer.base().double_quant() == dq);
    CHECK(layer.adapter().B().isZero());
    // The reported error is the requantisation error of W + ΔW.
    const MatD R = layer.base().dequantize<float>().cast<double>();
    CHECK(rep.max_abs_error == Approx((R - merged_exact).cwiseAbs().maxCoeff()).epsilon(1e-5));
    CHECK(rep.relative_error == Approx((R - merged_exact).norm() / merged_exact.norm()).epsilon(1e-4));
    CHECK(rep.relative_error > 0.0);
    CHECK(rep.relative_error < 0.15);  // NF4's error on Gaussian-like weights
    CHECK(rep.delta_norm > 0.0);
    // The merged layer computes X·(W + ΔW)ᵀ up to that error.
    const MatD after = layer.forward(X).cast<double>();
    CHECK(test::rel_error(after, X.cast<double>() * merged_exact.transpose()) < 0.2);
    CHECK(test::rel_error(after, before) < 0.2);
  }
}

TEST_CASE("qlora: shape mismatches are rejected", "[quant][qlora]") {
  Generator gen(test::fresh_seed());
  const Matrix<float> W = test::random_matrix<float>(16, 32, gen);
  CHECK_THROWS_WITH(QLoraLinear<>(Nf4Tensor::quantize(W), random_adapter(16, 32, 4, 8, gen)),
                    Catch::Matchers::ContainsSubstring("NF4 base weight has shape [16 x 32], adapter expects [out x in] = [32 x 16]"));
  QLoraLinear<> layer(Nf4Tensor::quantize(W), random_adapter(32, 16, 4, 8, gen));
  CHECK_THROWS_WITH(layer.forward(Matrix<float>::Ones(2, 31)), Catch::Matchers::ContainsSubstring("31 columns"));
  CHECK_THROWS_AS(layer.backward(Matrix<float>::Ones(2, 32), Matrix<float>::Ones(3, 16)), lora::error);
}
