// Spectral metrics against their definitions evaluated on formed matrices.
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/metrics.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;

TEST_CASE("metrics of a known spectrum", "[analysis][metrics]") {
  Vector<double> s(4);
  s << 4, 2, 1, 0;
  CHECK(frobenius_norm(s) == Approx(std::sqrt(21.0)));
  CHECK(spectral_norm(s) == 4.0);
  CHECK(stable_rank(s) == Approx(21.0 / 16.0));
  // energy: 16/21 = 0.762, 20/21 = 0.952, 21/21
  CHECK(energy_rank(s, 0.5) == 1);
  CHECK(energy_rank(s, 0.9) == 2);
  CHECK(energy_rank(s, 0.99) == 3);
  CHECK(energy_rank(s, 1.0) == 3);
  CHECK(energy_kept(s, 2) == Approx(20.0 / 21.0));
  // entropy: p = 4/7, 2/7, 1/7
  const double h = -(4. / 7 * std::log(4. / 7) + 2. / 7 * std::log(2. / 7) + 1. / 7 * std::log(1. / 7));
  CHECK(entropy_rank(s) == Approx(std::exp(h)));
  CHECK(numerical_rank(s, 0.5) == 3);
  CHECK(numerical_rank(s, 1.0) == 2);
  Vector<double> flat = Vector<double>::Constant(5, 3.0);
  CHECK(entropy_rank(flat) == Approx(5.0));
  CHECK(stable_rank(flat) == Approx(5.0));
  Vector<double> zero = Vector<double>::Zero(3);
  CHECK(energy_rank(zero, 0.9) == 0);
  CHECK(entropy_rank(zero) == 0.0);
  CHECK(stable_rank(zero) == 0.0);
  CHECK_THROWS_WITH(energy_rank(s, 1.5), Catch::Matchers::ContainsSubstring("(0, 1]"));
  CHECK_THROWS_AS(energy_rank(s, 0.0), lora::error);
}

TEST_CASE("metrics from lowrank_svd agree with the formed ΔW", "[analysis][metrics]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD B = lora::test::random_matrix(70, 12, gen), A = lora::test::random_matrix(12, 50, gen);
  const MatD dw = 0.25 * B * A;
  const auto sigma = lowrank_singular_values(B, A, 0.25);
  const auto m = spectrum_metrics(sigma, 70, 50);
  CHECK(m.frobenius_norm == Approx(dw.norm()).epsilon(1e-10));
  Eigen::BDCSVD<Eigen::MatrixXd> svd(dw);
  CHECK(m.spectral_norm == Approx(svd.singularValues()(0)).epsilon(1e-10));
  CHECK(m.stable_rank == Approx(dw.squaredNorm() / std::pow(svd.singularValues()(0), 2)).epsilon(1e-9));
  CHECK(m.numerical_rank == 12);
  REQUIRE(m.energy_ranks.size() == 2);
  // energy rank k: the best rank-k approximation error² is ≤ (1-τ)·‖ΔW‖², and k-1 is not enough
  for (std::size_t t = 0; t < m.thresholds.size(); ++t) {
    const Index k = m.energy_ranks[t];
    const double tail = svd.singularValues().tail(svd.singularValues().size() - k).squaredNorm();
    CHECK(tail <= (1 - m.thresholds[t]) * dw.squaredNorm() * (1 + 1e-9));
    const double tail_before = svd.singularValues().tail(svd.singularValues().size() - k + 1).squaredNorm();
    CHECK(tail_before > (1 - m.thresholds[t]) * dw.squaredNorm());
  }
}

TEST_CASE("rank recommendation for an adapter", "[analysis][metrics]") {
  // two r = 8 modules: one with energy in 2 directions, one in 3
  ModuleSpectrum a{Vector<double>(8), 100, 50, 8}, b{Vector<double>(8), 60, 50, 8};
  a.sigma << 10, 5, 0.1, 0.1, 0.05, 0.01, 0, 0;
  b.sigma << 3, 3, 3, 0.01, 0, 0, 0, 0;
  const auto rec = recommend_rank({a, b}, 0.99);
  CHECK(rec.rank == 3);
  CHECK(rec.current_rank == 8);
  CHECK(rec.parameters_now == 150 * 8 + 110 * 8);
  CHECK(rec.parameters_after == 150 * 3 + 110 * 3);
  CHECK(rec.parameters_per_module == 150 * 2 + 110 * 3);
  CHECK(rec.min_module_energy >= 0.99);
  CHECK_THAT(rec.text, Catch::Matchers::ContainsSubstring("r = 3 keeps 99% of the energy of this r = 8 adapter"));
  const auto one = recommend_rank(a, 0.9);
  CHECK(one.rank == 2);
}
