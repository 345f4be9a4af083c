// lora/cuda/spectrum.cuh: singular values of s·B·A on the device against a dense float64 SVD.

#include <lora/cuda.hpp>

#include "cuda/support.cuh"

#include <Eigen/SVD>

using namespace lora;
using lora::test::d;
using lora::test::MatD;
using lora::test::poison;
using lora::test::rand_s;
using lora::test::tol;
using lora::test::upload_padded;

TEMPLATE_TEST_CASE("cuda spectrum: singular values of s·B·A match a dense float64 SVD", "[cuda][spectrum]", bfloat16,
                   float) {
  using S = TestType;
  const std::uint64_t seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Index in = 200, out = 300, r = 12;
  LowRankAdapter<S> host(in, out, r, 24.0);
  host.set_A(rand_s<S>(r, in, g));
  Matrix<S> B = rand_s<S>(out, r, g);
  B.col(3) *= S(0.01f);  // a spread of singular values
  host.set_B(B);
  auto ad = LowRankAdapter<S, cuda>::from_host(host);
  const MatD dense = host.scaling() * d(host.B()) * d(host.A());
  Eigen::JacobiSVD<MatD> svd(dense);
  const Vector<double> want = svd.singularValues().head(r);
  const Vector<double> got = singular_values(ad);
  REQUIRE(got.size() == r);
  CHECK((got - want).norm() / want.norm() < 1e-5);
  CHECK(std::abs(got[r - 1] - want[r - 1]) < 1e-4 * want[0]);
}

