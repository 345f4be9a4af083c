// Subspace similarity φ(i, j) against its definition on explicit bases.
#include <lora/analysis/similarity.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;
using lora::test::random_orthonormal;


TEST_CASE("subspace_similarity equals the definition", "[analysis][similarity]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD U1 = random_orthonormal(40, 6, gen), U2 = random_orthonormal(40, 9, gen);
  const auto phi = subspace_similarity(U1, U2);
  REQUIRE(phi.rows() == 6);
  REQUIRE(phi.cols() == 9);
  for (Index i = 1; i <= 6; ++i)
    for (Index j = 1; j <= 9; ++j) {
      const double want = (U1.leftCols(i).transpose() * U2.leftCols(j)).squaredNorm() / double(std::min(i, j));
      CHECK(phi(i - 1, j - 1) == Approx(want).margin(1e-13));
      CHECK(phi(i - 1, j - 1) <= 1.0 + 1e-12);
    }
  // identical subspaces: φ(i, i) = 1; a basis against a rotation of itself: φ(k, k) = 1
  const auto self = subspace_similarity(U1, U1);
  for (Index i = 0; i < 6; ++i) CHECK(self(i, i) == Approx(1.0));
  const MatD R = random_orthonormal(6, 6, gen);
  CHECK(subspace_similarity(U1, MatD(U1 * R))(5, 5) == Approx(1.0));
  // orthogonal subspaces: 0
  const MatD Q = random_orthonormal(40, 12, gen);
  CHECK(subspace_similarity(Q.leftCols(6), Q.rightCols(6)).cwiseAbs().maxCoeff() < 1e-12);
  CHECK_THROWS_AS(subspace_similarity(U1, MatD(U2.topRows(30))), lora::error);
}

TEST_CASE("module_similarity compares A and ΔW subspaces", "[analysis][similarity]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD B1 = lora::test::random_matrix(30, 4, gen), A1 = lora::test::random_matrix(4, 25, gen);
  const MatD B2 = lora::test::random_matrix(30, 8, gen);
  // A2's row space contains A1's: the top-4 input subspace of ΔW₁ lies in A2's
  MatD A2(8, 25);
  A2.topRows(4) = lora::test::random_matrix(4, 4, gen) * A1;
  A2.bottomRows(4) = lora::test::random_matrix(4, 25, gen);
  const auto m = module_similarity(B1, A1, 2.0, B2, A2, 0.5);
  REQUIRE(m.phi_A.rows() == 4);
  REQUIRE(m.phi_A.cols() == 8);
  CHECK(m.phi_A(3, 7) == Approx(1.0).epsilon(1e-10));  // span(A1) ⊂ span(A2)
  // against a dense SVD of ΔW₁ and the right singular vectors of A₂
  Eigen::BDCSVD<Eigen::MatrixXd> d1(2.0 * B1 * A1, Eigen::ComputeThinV), a2(A2.transpose(), Eigen::ComputeThinU);
  const auto phi = subspace_similarity(MatD(d1.matrixV().leftCols(4)), MatD(a2.matrixU()));
  CHECK((subspace_similarity(right_singular_vectors(A1), right_singular_vectors(A2)) - m.phi_A).norm() < 1e-8);
  CHECK(phi(3, 7) == Approx(1.0).epsilon(1e-10));
  CHECK(mean_similarity(m.phi_delta) > 0.0);
  CHECK(mean_similarity(m.phi_delta) <= 1.0);
}
