#pragma once
// Scaling policies: how alpha and r become the factor s in ΔW = s·B·A.

#include <cmath>
#include <concepts>
#include <string_view>

namespace lora {

/// A scaling rule is any type with `factor(alpha, r)` callable on a const
/// instance (a static member function qualifies) and a `name`.
///
///   struct half_scaling {
///     static double factor(double alpha, int r) { return alpha / (2.0 * r); }
///     static constexpr std::string_view name = "half";
///   };
///   static_assert(lora::ScalingPolicy<half_scaling>);
template <class P>
concept ScalingPolicy = std::default_initializable<P> && requires(const P& p, double alpha, int r) {
  { p.factor(alpha, r) } -> std::convertible_to<double>;
  { P::name } -> std::convertible_to<std::string_view>;
};

/// LoRA's rule (Hu et al. 2021, PEFT's default): s = alpha / r.
struct standard_scaling {
  static constexpr std::string_view name = "standard";
  static constexpr double factor(double alpha, int r) { return alpha / r; }
};

/// rsLoRA (Kalajdzievski 2023, PEFT's use_rslora): s = alpha / sqrt(r).
struct rslora_scaling {
  static constexpr std::string_view name = "rslora";
  static double factor(double alpha, int r) { return alpha / std::sqrt(static_cast<double>(r)); }
};

/// Chosen at run time, for loaders that read `use_rslora` from a config.
struct dynamic_scaling {
  static constexpr std::string_view name = "dynamic";
  bool rslora = false;
  double factor(double alpha, int r) const {
    return rslora ? rslora_scaling::factor(alpha, r) : standard_scaling::factor(alpha, r);
  }
  std::string_view rule() const { return rslora ? rslora_scaling::name : standard_scaling::name; }
  friend bool operator==(const dynamic_scaling&, const dynamic_scaling&) = default;
};

static_assert(ScalingPolicy<standard_scaling>);
static_assert(ScalingPolicy<rslora_scaling>);
static_assert(ScalingPolicy<dynamic_scaling>);

}  // namespace lora
