#pragma once
// Initialisers matching PEFT's reset_lora_parameters (init_lora_weights).

#include <lora/core/random.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <cmath>
#include <string_view>

namespace lora {

enum class init_method {
  /// PEFT's default (init_lora_weights = true): A ~ U(−1/√in, 1/√in), which is
  /// torch's kaiming_uniform_(a = √5) as nn.Linear uses it; B = 0, so ΔW = 0.
  kaiming_uniform,
  /// init_lora_weights = "gaussian": A ~ N(0, σ = 1/r) (PEFT passes std = 1/r); B = 0.
  gaussian,
  /// A = 0 and B = 0.
  zeros,
  /// init_lora_weights = false: A and B both keep nn.Linear's default,
  /// U(−1/√fan_in, 1/√fan_in) with fan_in = in for A and r for B; ΔW ≠ 0.
  random,
};

/// Parses PEFT's names: "true"/"default" → kaiming_uniform, "gaussian", "zeros", "false" → random.
inline init_method parse_init_method(std::string_view s) {
  if (s == "true" || s == "default" || s == "kaiming_uniform") return init_method::kaiming_uniform;
  if (s == "gaussian") return init_method::gaussian;
  if (s == "zeros") return init_method::zeros;
  if (s == "false" || s == "random") return init_method::random;
  detail::fail("unknown init method '{}': expected one of default, gaussian, zeros, random", s);
}

namespace detail {
template <class M>
void fill_uniform(M& m, double bound, Generator& gen) {
  using S = typename M::Scalar;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<S>(gen.uniform(-bound, bound));
}
template <class M>
void fill_normal(M& m, double stddev, Generator& gen) {
  using S = typename M::Scalar;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<S>(gen.normal(0.0, stddev));
}
}  // namespace detail

/// Initialises an adapter's A and B in place; the same seed gives the same factors.
///
///   lora::Generator gen(1234);
///   lora::initialize(adapter, lora::init_method::kaiming_uniform, gen);
template <class Adapter>
void initialize(Adapter& ad, init_method method, Generator& gen) {
  using matrix = typename Adapter::matrix;
  matrix A(ad.rank(), ad.in_features());
  matrix B(ad.out_features(), ad.rank());
  B.setZero();
  switch (method) {
    case init_method::kaiming_uniform:
      detail::fill_uniform(A, 1.0 / std::sqrt(static_cast<double>(ad.in_features())), gen);
      break;
    case init_method::gaussian:
      detail::fill_normal(A, 1.0 / static_cast<double>(ad.rank()), gen);
      break;
    case init_method::zeros:
      A.setZero();
      break;
    case init_method::random:
      detail::fill_uniform(A, 1.0 / std::sqrt(static_cast<double>(ad.in_features())), gen);
      detail::fill_uniform(B, 1.0 / std::sqrt(static_cast<double>(ad.rank())), gen);
      break;
  }
  ad.set_A(A);
  ad.set_B(B);
}

/// Seed convenience: initialize(ad, method, seed).
template <class Adapter>
void initialize(Adapter& ad, init_method method, std::uint64_t seed) {
  Generator gen(seed);
  initialize(ad, method, gen);
}

}  // namespace lora
