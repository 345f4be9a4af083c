// Losses against plain formulas and their gradients against finite differences.
#include <lora/train/loss.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;

TEST_CASE("MSE loss: value by hand, gradient by finite differences", "[train]") {
  MatD p(1, 3), t(1, 3);
  p << 1, 2, 3;
  t << 0, 2, 5;
  const auto l = mse_loss<double>(p, t);
  CHECK(l.value == Approx((1.0 + 0 + 4) / 3));
  CHECK(l.grad(0, 0) == Approx(2.0 / 3));
  CHECK(l.grad(0, 2) == Approx(-4.0 / 3));
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD P = random_matrix(4, 5, gen), T = random_matrix(4, 5, gen);
  const auto L = mse_loss<double>(P, T);
  const double h = 1e-6;
  for (Index k = 0; k < P.size(); ++k) {
    MatD a = P, b = P;
    a.data()[k] += h;
    b.data()[k] -= h;
    // Central differences with h = 1e-6 carry a rounding error of about ε·|L|/h ≈ 1e-9 (the
    // quadratic has no truncation error), hence the absolute margin for small entries.
    const double fd = (mse_loss<double>(a, T).value - mse_loss<double>(b, T).value) / (2 * h);
    CHECK(L.grad.data()[k] == Approx(fd).epsilon(1e-6).margin(1e-8));
  }
  CHECK_THROWS_WITH(mse_loss<double>(P, MatD::Zero(4, 4)), Catch::Matchers::ContainsSubstring("target has shape [4 x 4], expected"));
}

TEST_CASE("cross-entropy: value by hand, gradient by finite differences", "[train]") {
  // logits (0, ln 3) with label 1: p = (1/4, 3/4), L = −ln(3/4)
  MatD z(1, 2);
  z << 0, std::log(3.0);
  const auto l = cross_entropy_loss<double>(z, std::vector<int>{1});
  CHECK(l.value == Approx(-std::log(0.75)).epsilon(1e-14));
  CHECK(l.grad(0, 0) == Approx(0.25));
  CHECK(l.grad(0, 1) == Approx(-0.25));
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD Z = random_matrix(5, 7, gen, 3.0);
  const std::vector<int> y{3, -100, 0, 6, 2};
  for (double eps : {0.0, 0.1}) {
    INFO("label smoothing " << eps);
    const auto L = cross_entropy_loss<double>(Z, y, -100, eps);
    // value: mean over the 4 counted rows of −Σ q log softmax
    double want = 0;
    for (Index t = 0; t < 5; ++t) {
      if (y[t] == -100) continue;
      double se = 0;
      for (Index c = 0; c < 7; ++c) se += std::exp(Z(t, c));
      for (Index c = 0; c < 7; ++c) {
        const double q = (c == y[t] ? 1 - eps : 0) + eps / 7;
        want -= q * std::log(std::exp(Z(t, c)) / se);
      }
    }
    CHECK(L.value == Approx(want / 4).epsilon(1e-12));
    const double h = 1e-6;
    for (Index k = 0; k < Z.size(); ++k) {
      MatD a = Z, b = Z;
      a.data()[k] += h;
      b.data()[k] -= h;
      const double fd = (cross_entropy_loss<double>(a, y, -100, eps).value - cross_entropy_loss<double>(b, y, -100, eps).value) / (2 * h);
      CHECK(L.grad.data()[k] == Approx(fd).epsilon(1e-6).margin(1e-8));  // rounding ≈ ε·|L|/h
    }
    CHECK(L.grad.row(1).norm() == 0.0);  // ignored row
  }
  // numerically stable for huge logits
  MatD big(1, 3);
  big << 1000, 0, -1000;
  CHECK(cross_entropy_loss<double>(big, std::vector<int>{0}).value == Approx(0.0).margin(1e-12));
  CHECK_THROWS_WITH(cross_entropy_loss<double>(big, std::vector<int>{3}), Catch::Matchers::ContainsSubstring("label 3 of row 0 is outside [0, 3)"));
  CHECK_THROWS_WITH(cross_entropy_loss<double>(big, std::vector<int>{0, 1}), Catch::Matchers::ContainsSubstring("2 labels for 1 rows"));
}
