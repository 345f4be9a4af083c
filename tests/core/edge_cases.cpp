// Numerical edge cases of the core adapter: non-finite inputs propagate (never
// crash), denormals, r = min(in, out), 1x1 layers, huge alpha, zero adapters.
#include <lora/core/adapter.hpp>

#include <limits>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

TEST_CASE("NaN and Inf in the input propagate to the rows that use them", "[edge]") {
  Generator gen(lora::test::fresh_seed());
  auto ad = LowRankAdapter<float>::from_factors(random_matrix<float>(4, 16, gen), random_matrix<float>(8, 4, gen), 8.0);
  Matrix<float> W = random_matrix<float>(8, 16, gen);
  Matrix<float> X = random_matrix<float>(3, 16, gen);
  X(1, 5) = std::numeric_limits<float>::quiet_NaN();
  X(2, 0) = std::numeric_limits<float>::infinity();
  auto Y = ad.apply(W, X);
  CHECK(Y.row(0).allFinite());
  CHECK(Y.row(1).array().isNaN().all());
  CHECK_FALSE(Y.row(2).allFinite());
  // the clean row is unaffected
  CHECK(rel_error(Y.row(0), ad.apply(W, X.row(0))) < 1e-6);
  auto g = ad.backward(W, X, Matrix<float>::Ones(3, 8));
  CHECK_FALSE(g.dA.allFinite());  // a NaN token poisons the factor gradients, as in torch
  CHECK(g.dX.row(0).allFinite());
  // NaN in a factor: every output that touches it
  Matrix<float> A = ad.A();
  A(0, 0) = std::numeric_limits<float>::quiet_NaN();
  ad.set_A(A);
  CHECK(ad.delta_weight().array().isNaN().any());
}

TEST_CASE("denormal inputs and factors give the float64 answer", "[edge]") {
  Generator gen(lora::test::fresh_seed());
  const double tiny = std::numeric_limits<float>::denorm_min() * 1000.0;  // ~1.4e-42, subnormal in float
  Matrix<float> A = (random_matrix<double>(3, 10, gen) * tiny).cast<float>();
  Matrix<float> B = random_matrix<float>(6, 3, gen);
  auto ad = LowRankAdapter<float>::from_factors(A, B, 3.0);
  CHECK(std::fpclassify(A(0, 0)) == FP_SUBNORMAL);
  MatD ref = 1.0 * B.cast<double>() * A.cast<double>();
  // subnormal products underflow in float: compare with an absolute tolerance at the scale of A
  CHECK(lora::test::max_abs_diff(ad.delta_weight(), ref) < 1e-3 * tiny * 10);
}

TEST_CASE("r = min(in, out), 1x1 layers, huge alpha, all-zero adapters", "[edge]") {
  Generator gen(lora::test::fresh_seed());
  for (auto [in, out] : {std::pair{1, 1}, {1, 7}, {9, 1}, {12, 12}, {5, 30}}) {
    const Index r = std::min(in, out);
    auto ad = LowRankAdapter<double>::from_factors(random_matrix(r, in, gen), random_matrix(out, r, gen), 2.0 * r);
    MatD X = random_matrix(4, in, gen), W = random_matrix(out, in, gen);
    CHECK(rel_error(ad.apply(W, X), MatD(X * W.transpose() + 2.0 * X * ad.A().transpose() * ad.B().transpose())) < 1e-13);
    MatD Wm = W;
    ad.merge(Wm);
    CHECK(rel_error(MatD(X * Wm.transpose()), ad.apply(W, X)) < 1e-13);
  }
  // huge alpha: finite as long as the product is representable
  auto big = LowRankAdapter<double>::from_factors(random_matrix(2, 8, gen), random_matrix(8, 2, gen), 1e300);
  CHECK(big.scaling() == Approx(5e299));
  CHECK(big.delta_weight().allFinite());
  auto bigf = LowRankAdapter<float>::from_factors(random_matrix<float>(2, 8, gen), random_matrix<float>(8, 2, gen), 1e300);
  CHECK_FALSE(bigf.delta_weight().allFinite());  // s overflows float: Inf, documented, not a crash
  // all-zero adapter: output is exactly the base layer
  LowRankAdapter<float> zero(16, 8, 4, 8.0);
  Matrix<float> X = random_matrix<float>(3, 16, gen), W = random_matrix<float>(8, 16, gen);
  CHECK(zero.apply(W, X) == Matrix<float>(X * W.transpose()));
  CHECK(zero.delta_weight().isZero(0));
}
