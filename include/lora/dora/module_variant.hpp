#pragma once
// detail::LoraOrDora: what ModuleAdapter<S, cpu> and ModuleAdapter<S, cuda> share: one of a
// LoRA adapter or a DoRA adapter of the same device, and the members that do not depend on the
// device (which one it is, the low-rank part, the shape, alpha and scaling).

#include <lora/core/spec.hpp>
#include <lora/error.hpp>

#include <string>
#include <utility>
#include <variant>

namespace lora::detail {

/// L: a LowRankAdapter; D: the DoraAdapter of the same scalar, device and scaling policy (its
/// lora() is an L). The accessors of the low-rank part are L's (for DoRA they are ΔW = s·B·A's,
/// not the whole change a merge makes).
template <class L, class D>
class LoraOrDora {
 public:
  using lora_type = L;
  using dora_type = D;

  bool is_dora() const { return std::holds_alternative<D>(v_); }
  /// The low-rank part (the whole adapter for LoRA).
  const L& lora() const { return is_dora() ? std::get<D>(v_).lora() : std::get<L>(v_); }
  L& lora() { return is_dora() ? std::get<D>(v_).lora() : std::get<L>(v_); }
  /// The DoRA adapter; throws lora::error for a LoRA module.
  const D& dora() const {
    require_dora();
    return std::get<D>(v_);
  }
  D& dora() {
    require_dora();
    return std::get<D>(v_);
  }

  Index in_features() const { return lora().in_features(); }
  Index out_features() const { return lora().out_features(); }
  Index rank() const { return lora().rank(); }
  double alpha() const { return lora().alpha(); }
  double scaling() const { return lora().scaling(); }
  double multiplier() const { return lora().multiplier(); }
  const auto& policy() const { return lora().policy(); }
  const std::string& name() const { return lora().name(); }
  bool fan_in_fan_out() const { return lora().fan_in_fan_out(); }
  double dropout() const { return spec().opts.dropout; }
  const AdapterSpec& spec() const { return lora().spec(); }
  /// The prefix of this module's error messages (its name, when it has one).
  std::string who() const { return spec().who(); }
  decltype(auto) A() const { return lora().A(); }
  decltype(auto) B() const { return lora().B(); }
  /// s·B·A, the low-rank part (`[in × out]` with fan_in_fan_out).
  auto delta_weight() const { return lora().delta_weight(); }
  void set_alpha(double a) { lora().set_alpha(a); }
  void rescale(double factor) { lora().rescale(factor); }
  /// (in + out)·r, plus out for DoRA's magnitude.
  Index trainable_parameters() const {
    return is_dora() ? std::get<D>(v_).trainable_parameters() : lora().trainable_parameters();
  }

 protected:
  explicit LoraOrDora(L lora) : v_(std::move(lora)) {}
  explicit LoraOrDora(D dora) : v_(std::move(dora)) {}

  void require_dora() const {
    if (!is_dora()) fail("{}not a DoRA adapter (it has no magnitude vector)", who());
  }

  std::variant<L, D> v_;
};

}  // namespace lora::detail
