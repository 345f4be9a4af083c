// Numerical edge cases of the spectrum (see docs/reliability.md): metrics of exactly
// rank-deficient factors, all-zero adapters, r = min(in, out) and 1x1, huge alpha, and
// non-finite factors (which must not come back as a finite spectrum).
#include <lora/analysis/compress.hpp>
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/metrics.hpp>

#include <cmath>
#include <limits>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::random_matrix;

namespace {
Eigen::VectorXd dense_sigma(const MatD& B, const MatD& A, double s) {
  return Eigen::BDCSVD<Eigen::MatrixXd>(MatD(s * B * A)).singularValues();
}
}  // namespace

TEST_CASE("spectrum edge: exactly rank-deficient factors give the true rank", "[analysis][edge]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  struct Case { Index out, in, r, k; };
  for (const Case c : {Case{40, 30, 8, 3}, Case{64, 176, 16, 1}, Case{30, 30, 30, 29}, Case{12, 50, 6, 5}}) {
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " true rank " << c.k);
    // rank(B·A) = k exactly: B = P·Q with Q [k × r] (B's columns span k dimensions).
    const MatD B = random_matrix(c.out, c.k, gen) * random_matrix(c.k, c.r, gen);
    const MatD A = random_matrix(c.r, c.in, gen);
    const double s = 2.0;
    const auto svd = analysis::lowrank_svd(B, A, s);
    const Eigen::VectorXd ref = dense_sigma(B, A, s);
    const double s1 = ref(0);
    // the k non-zero values match the dense SVD, the rest are at rounding level
    CHECK((svd.singular_values.head(c.k) - ref.head(c.k)).cwiseAbs().maxCoeff() <= 1e-10 * s1);
    CHECK(svd.singular_values.tail(svd.size() - c.k).cwiseAbs().maxCoeff() <= 1e-13 * s1);
    const auto m = analysis::spectrum_metrics(svd.singular_values, c.out, c.in);
    CHECK(m.numerical_rank == c.k);
    CHECK(analysis::energy_rank(svd.singular_values, 1.0) <= c.k + 0);  // τ = 1 needs only the k non-zero values
    CHECK(m.stable_rank <= c.k + 1e-9);
    CHECK(m.entropy_rank <= c.k + 1e-9);
    // The Gram route is accurate to ≈ 1e-8·σ₁ absolutely (it squares the condition number):
    // its "zero" values are small but above the rounding-level tolerance.
    const auto fast = analysis::lowrank_singular_values(B, A, s);
    CHECK((fast.head(c.k) - ref.head(c.k)).cwiseAbs().maxCoeff() <= 1e-6 * s1);
    CHECK(fast.tail(fast.size() - c.k).cwiseAbs().maxCoeff() <= 1e-6 * s1);
    // Truncating to the true rank loses nothing.
    const auto f = analysis::best_rank_k(B, A, s, c.k, 1.0);
    CHECK(lora::test::rel_error(MatD(f.B * f.A), MatD(s * B * A)) < 1e-10);
  }
}

TEST_CASE("spectrum edge: all-zero adapters and zero scaling give zero metrics, no NaN", "[analysis][edge]") {
  Generator gen(lora::test::fresh_seed());
  const MatD A = random_matrix(4, 9, gen), B = random_matrix(7, 4, gen);
  for (const auto& [b, a, s] : {std::tuple{MatD(MatD::Zero(7, 4)), A, 1.5}, std::tuple{B, MatD(MatD::Zero(4, 9)), 1.5},
                                std::tuple{B, A, 0.0}}) {
    const auto svd = analysis::lowrank_svd(b, a, s);
    REQUIRE(svd.size() == 4);
    CHECK(svd.singular_values.cwiseAbs().maxCoeff() == 0.0);
    CHECK(svd.U.allFinite());
    CHECK(svd.V.allFinite());
    CHECK(analysis::lowrank_singular_values(b, a, s).cwiseAbs().maxCoeff() == 0.0);
    const auto m = analysis::spectrum_metrics(svd.singular_values, 7, 9);
    CHECK(m.frobenius_norm == 0.0);
    CHECK(m.spectral_norm == 0.0);
    CHECK(m.stable_rank == 0.0);
    CHECK(m.entropy_rank == 0.0);
    CHECK(m.numerical_rank == 0);
    for (auto k : m.energy_ranks) CHECK(k == 0);
  }
}

TEST_CASE("spectrum edge: r = min(in, out), r > min(in, out), 1x1 and huge alpha", "[analysis][edge]") {
  Generator gen(lora::test::fresh_seed());
  struct Case { Index out, in, r; double s; };
  for (const Case c : {Case{1, 1, 1, 3.0}, Case{1, 9, 1, -2.0}, Case{9, 1, 1, 0.5}, Case{6, 6, 6, 1.0},
                       Case{3, 5, 8, 1.0}, Case{10, 4, 4, 1e30}, Case{5, 8, 2, 1e-30}}) {
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " s " << c.s);
    const MatD B = random_matrix(c.out, c.r, gen), A = random_matrix(c.r, c.in, gen);
    const auto svd = analysis::lowrank_svd(B, A, c.s);
    const Eigen::VectorXd ref = dense_sigma(B, A, c.s);
    const Index p = std::min({c.out, c.in, c.r});
    REQUIRE(svd.size() == p);
    CHECK((svd.singular_values - ref.head(p)).cwiseAbs().maxCoeff() <= 1e-10 * ref(0));
    CHECK((analysis::lowrank_singular_values(B, A, c.s) - ref.head(p)).cwiseAbs().maxCoeff() <= 1e-6 * ref(0));
    const auto m = analysis::spectrum_metrics(svd.singular_values, c.out, c.in);
    CHECK(std::isfinite(m.frobenius_norm));
    CHECK(m.numerical_rank == p);
  }
  // 1x1: σ = |s·b·a| exactly
  MatD b(1, 1), a(1, 1);
  b(0, 0) = 0.75;
  a(0, 0) = -4.0;
  CHECK(analysis::lowrank_svd(b, a, 2.0).singular_values(0) == 6.0);
}

// A NaN or Inf in a factor must not come back as a finite spectrum: either the
// non-finite value propagates, or lora::error names it. (Before c612c18 both routes
// returned σ = 0 for a factor with a NaN: QR + Jacobi SVD / the eigensolver produce zeros.)
TEST_CASE("spectrum edge: non-finite factors are not reported as a finite spectrum", "[analysis][edge]") {
  Generator gen(lora::test::fresh_seed());
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    MatD B = random_matrix(6, 3, gen), A = random_matrix(3, 5, gen);
    B(2, 1) = bad;
    INFO("bad value " << bad);
    bool finite = false;
    try {
      finite = analysis::lowrank_svd(B, A, 2.0).singular_values.allFinite();
    } catch (const lora::error&) {
    }
    CHECK_FALSE(finite);
    finite = false;
    try {
      finite = analysis::lowrank_singular_values(B, A, 2.0).allFinite();
    } catch (const lora::error&) {
    }
    CHECK_FALSE(finite);
  }
}
