#pragma once
// Float64 references and random inputs shared by the tests.

#include <lora/core/random.hpp>
#include <lora/core/types.hpp>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace lora::test {

using MatD = Matrix<double>;

/// Fresh inputs each run: seeds base + k·φ·2⁶⁴ (k = 1, 2, … per call) from a base taken off
/// the clock, or from LORA_TEST_SEED. The base is printed once to stderr (ctest shows it with
/// a failure's output), so `LORA_TEST_SEED=<base> test_x` replays that run's inputs.
inline std::uint64_t fresh_seed() {
  static std::uint64_t counter = 0;
  static const std::uint64_t base = [] {
    const char* s = std::getenv("LORA_TEST_SEED");
    const std::uint64_t b =
        s ? std::strtoull(s, nullptr, 10)
          : static_cast<std::uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    std::fprintf(stderr, "random inputs: LORA_TEST_SEED=%llu replays them\n", static_cast<unsigned long long>(b));
    return b;
  }();
  return base + 0x9e3779b97f4a7c15ULL * ++counter;
}

template <class S = double>
Matrix<S> random_matrix(Index rows, Index cols, Generator& gen, double scale = 1.0) {
  Matrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<S>(gen.normal(0.0, scale));
  return m;
}

template <class A, class B>
double rel_error(const A& got, const B& want) {
  const MatD g = got.template cast<double>();
  const MatD w = want.template cast<double>();
  const double denom = std::max(w.norm(), 1e-300);
  return (g - w).norm() / denom;
}

template <class A, class B>
double max_abs_diff(const A& got, const B& want) {
  return (got.template cast<double>() - want.template cast<double>()).cwiseAbs().maxCoeff();
}

/// A random n × k matrix with orthonormal columns (Q of a Gaussian matrix's QR). A template
/// so that Eigen's QR is compiled only in the tests that call it.
template <class = void>
MatD random_orthonormal(Index n, Index k, Generator& gen) {
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(random_matrix(n, k, gen));
  return qr.householderQ() * Eigen::MatrixXd::Identity(n, k);
}

}  // namespace lora::test
