#pragma once
// ModuleAdapter: the adapter of one module as PEFT's LoraLayer holds it, a LoRA adapter or,
// when the module carries a magnitude vector (use_dora), a DoRA adapter. apply, backward,
// merge and unmerge are DoRA's for a DoRA module and LoRA's otherwise; the shape, factors and
// scaling accessors are those of the low-rank part (for DoRA, ΔW = s·B·A is not the whole
// change a merge makes: that is merged_weight(W) − W).
//
//   const auto ad = lora::io::load_peft_adapter("dora-adapter/");
//   const auto& q = ad.at("model.layers.0.self_attn.q_proj").adapter;   // a ModuleAdapter
//   auto Y = q.apply(W, X);     // (m ⊘ ‖W + s·B·A‖_row) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) when q.is_dora()
//   auto n = q.merge(W);        // DoRA's row norms (empty for LoRA), what unmerge needs
//   q.unmerge(W, n);

#include <lora/core/adapter.hpp>
#include <lora/dora/dora.hpp>
#include <lora/error.hpp>

#include <optional>
#include <utility>
#include <variant>

namespace lora {

template <class Scalar, class Device = cpu, ScalingPolicy Scaling = standard_scaling>
class ModuleAdapter;

/// LoRA or DoRA on the CPU, chosen by the data (a magnitude vector or none), with one set of
/// members: what a loaded PEFT module is (io::PeftModule::adapter).
template <class Scalar, ScalingPolicy Scaling>
class ModuleAdapter<Scalar, cpu, Scaling> {
 public:
  using lora_type = LowRankAdapter<Scalar, cpu, Scaling>;
  using dora_type = DoraAdapter<Scalar, cpu, Scaling>;
  using scalar_type = Scalar;
  using device_type = cpu;
  using scaling_policy = Scaling;
  using compute_scalar = compute_t<Scalar>;
  using matrix = Matrix<Scalar>;
  using cmatrix = Matrix<compute_scalar>;
  using cvector = Vector<compute_scalar>;
  using input = MatrixRef<Scalar>;

  /// A plain LoRA module (implicit: every LoRA adapter is a module adapter).
  ModuleAdapter(lora_type lora) : v_(std::move(lora)) {}
  /// A DoRA module.
  ModuleAdapter(dora_type dora) : v_(std::move(dora)) {}
  /// DoRA when `magnitude` is given (its length must be out_features), else LoRA.
  ModuleAdapter(lora_type lora, std::optional<cvector> magnitude) : v_(std::move(lora)) {
    if (magnitude) v_ = dora_type(std::get<lora_type>(std::move(v_)), std::move(*magnitude));
  }

  static ModuleAdapter from_host(const ModuleAdapter& host) { return host; }
  ModuleAdapter to_host() const { return *this; }

  bool is_dora() const { return std::holds_alternative<dora_type>(v_); }
  /// The low-rank part (the whole adapter for LoRA).
  const lora_type& lora() const { return is_dora() ? std::get<dora_type>(v_).lora() : std::get<lora_type>(v_); }
  lora_type& lora() { return is_dora() ? std::get<dora_type>(v_).lora() : std::get<lora_type>(v_); }
  /// The DoRA adapter; throws lora::error for a LoRA module.
  const dora_type& dora() const {
    require_dora();
    return std::get<dora_type>(v_);
  }
  dora_type& dora() {
    require_dora();
    return std::get<dora_type>(v_);
  }
  /// DoRA's m [out]; throws lora::error for a LoRA module.
  const cvector& magnitude() const { return dora().magnitude(); }
  /// The same kind of adapter with another low-rank part: DoRA keeps its magnitude (compress,
  /// normalize and the like replace the factors of a module).
  ModuleAdapter with_lora(lora_type lora) const {
    if (!is_dora()) return lora;
    return dora_type(std::move(lora), magnitude());
  }

  Index in_features() const { return lora().in_features(); }
  Index out_features() const { return lora().out_features(); }
  Index rank() const { return lora().rank(); }
  double alpha() const { return lora().alpha(); }
  double scaling() const { return lora().scaling(); }
  double multiplier() const { return lora().multiplier(); }
  const Scaling& policy() const { return lora().policy(); }
  const std::string& name() const { return lora().name(); }
  bool fan_in_fan_out() const { return lora().fan_in_fan_out(); }
  double dropout() const { return lora().dropout(); }
  const AdapterSpec& spec() const { return lora().spec(); }
  const matrix& A() const { return lora().A(); }
  const matrix& B() const { return lora().B(); }
  /// s·B·A, the low-rank part (`[in × out]` with fan_in_fan_out).
  cmatrix delta_weight() const { return lora().delta_weight(); }
  void set_alpha(double a) { lora().set_alpha(a); }
  void rescale(double factor) { lora().rescale(factor); }
  /// (in + out)·r, plus out for DoRA's magnitude.
  Index trainable_parameters() const {
    return is_dora() ? std::get<dora_type>(v_).trainable_parameters() : lora().trainable_parameters();
  }

  /// The adapted layer, unmerged, no bias: X·Wᵀ + s·(X·Aᵀ)·Bᵀ, times m ⊘ ‖W + s·B·A‖_row for DoRA.
  cmatrix apply(const input& W, const input& X) const {
    return is_dora() ? std::get<dora_type>(v_).apply(W, X) : std::get<lora_type>(v_).apply(W, X);
  }
  /// Gradients of apply(W, X) (W frozen; DoRA's norm held constant, as PEFT); dm is empty for LoRA.
  DoraGradients<compute_scalar> backward(const input& W, const input& X, const Eigen::Ref<const cmatrix>& dY) const {
    if (is_dora()) return std::get<dora_type>(v_).backward(W, X, dY);
    auto g = std::get<lora_type>(v_).backward(W, X, dY);
    return {std::move(g.dA), std::move(g.dB), cvector(), std::move(g.dX)};
  }
  /// W ← W + ΔW (LoRA) or (m ⊘ n) ⊙ (W + ΔW) (DoRA), in place; returns DoRA's n = ‖W + ΔW‖_row,
  /// which unmerge needs, or an empty vector for LoRA.
  cvector merge(Eigen::Ref<matrix> W) const {
    if (is_dora()) return std::get<dora_type>(v_).merge(W);
    std::get<lora_type>(v_).merge(W);
    return {};
  }
  /// Undoes merge with the vector it returned.
  void unmerge(Eigen::Ref<matrix> W, const cvector& n = {}) const {
    if (is_dora()) return std::get<dora_type>(v_).unmerge(W, n);
    if (n.size() != 0)
      detail::fail("{}LoRA unmerge takes no weight norms (merge returned none), got {}", spec().who(), n.size());
    std::get<lora_type>(v_).unmerge(W);
  }
  /// W + ΔW (LoRA) or (m ⊘ n) ⊙ (W + ΔW) (DoRA) in W's orientation and compute precision; W unchanged.
  cmatrix merged_weight(const input& W) const {
    if (is_dora()) return std::get<dora_type>(v_).merged_weight(W);
    spec().check_weight(W.rows(), W.cols());
    cmatrix V = W.template cast<compute_scalar>();
    V += delta_weight();
    return V;
  }

 private:
  void require_dora() const {
    if (!is_dora()) detail::fail("{}not a DoRA adapter (it has no magnitude vector)", spec().who());
  }

  std::variant<lora_type, dora_type> v_;
};

}  // namespace lora
