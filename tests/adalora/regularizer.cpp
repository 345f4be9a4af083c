// AdaLoRA's orthogonal regulariser against a float64 loop and finite differences.
#include <lora/adalora/regularizer.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;

namespace {
// ‖M·Mᵀ − I‖_F by loops.
double gram_dev(const MatD& M) {
  double s = 0;
  for (Index i = 0; i < M.rows(); ++i)
    for (Index j = 0; j < M.rows(); ++j) {
      double d = 0;
      for (Index k = 0; k < M.cols(); ++k) d += M(i, k) * M(j, k);
      d -= i == j ? 1.0 : 0.0;
      s += d * d;
    }
  return std::sqrt(s);
}
double ref_penalty(const std::vector<SvdAdapter<double>>& ads) {
  double s = 0;
  for (const auto& a : ads) s += gram_dev(a.A()) + gram_dev(MatD(a.B().transpose()));
  return s / (2.0 * static_cast<double>(ads.size()));
}
}  // namespace

TEST_CASE("orthogonal penalty: value and gradient", "[adalora]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  std::vector<SvdAdapter<double>> ads;
  for (auto [in, out, r] : {std::tuple{9, 7, 3}, {6, 11, 4}, {5, 5, 1}})
    ads.push_back(SvdAdapter<double>::from_factors(random_matrix(r, in, gen, 0.5), random_matrix(r, 1, gen),
                                                   random_matrix(out, r, gen, 0.5), 4.0));
  const auto pen = orthogonal_penalty(ads);
  CHECK(pen.value == Approx(ref_penalty(ads)).epsilon(1e-13));
  REQUIRE(pen.dA.size() == 3);
  const double h = 1e-6;
  for (std::size_t m = 0; m < ads.size(); ++m) {
    for (Index i = 0; i < ads[m].A().rows(); ++i)
      for (Index j = 0; j < ads[m].A().cols(); ++j) {
        auto p = ads, q = ads;
        p[m].A()(i, j) += h;
        q[m].A()(i, j) -= h;
        CHECK(pen.dA[m](i, j) == Approx((ref_penalty(p) - ref_penalty(q)) / (2 * h)).epsilon(1e-6).margin(1e-9));
      }
    for (Index i = 0; i < ads[m].B().rows(); ++i)
      for (Index j = 0; j < ads[m].B().cols(); ++j) {
        auto p = ads, q = ads;
        p[m].B()(i, j) += h;
        q[m].B()(i, j) -= h;
        CHECK(pen.dB[m](i, j) == Approx((ref_penalty(p) - ref_penalty(q)) / (2 * h)).epsilon(1e-6).margin(1e-9));
      }
  }
  // Exactly orthonormal factors cost nothing and have zero gradient (torch's norm backward at 0).
  MatD P = MatD::Identity(3, 8), Qb = MatD::Identity(8, 3);
  std::vector<SvdAdapter<double>> ortho{SvdAdapter<double>::from_factors(P, random_matrix(3, 1, gen), Qb, 1.0)};
  const auto z = orthogonal_penalty(ortho);
  CHECK(z.value == 0.0);
  CHECK(z.dA[0].norm() == 0.0);
  CHECK(z.dB[0].norm() == 0.0);
}
