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
#include <lora/core/embedding.hpp>
#include <lora/dora/dora.hpp>
#include <lora/dora/module_variant.hpp>
#include <lora/error.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <variant>

namespace lora {

template <class Scalar, class Device = cpu, ScalingPolicy Scaling = standard_scaling>
class ModuleAdapter;

/// LoRA or DoRA on the CPU, chosen by the data (a magnitude vector or none), with one set of
/// members: what a loaded PEFT module is (io::PeftModule::adapter).
template <class Scalar, ScalingPolicy Scaling>
class ModuleAdapter<Scalar, cpu, Scaling>
    : public detail::LoraOrDora<LowRankAdapter<Scalar, cpu, Scaling>, DoraAdapter<Scalar, cpu, Scaling>> {
  using base = detail::LoraOrDora<LowRankAdapter<Scalar, cpu, Scaling>, DoraAdapter<Scalar, cpu, Scaling>>;
  using base::v_;

 public:
  using typename base::lora_type;
  using typename base::dora_type;
  using base::dora;
  using base::delta_weight;
  using base::is_dora;
  using base::lora;
  using base::spec;
  using scalar_type = Scalar;
  using device_type = cpu;
  using scaling_policy = Scaling;
  using compute_scalar = compute_t<Scalar>;
  using matrix = Matrix<Scalar>;
  using cmatrix = Matrix<compute_scalar>;
  using cvector = Vector<compute_scalar>;
  using input = MatrixRef<Scalar>;

  /// A plain LoRA module (implicit: every LoRA adapter is a module adapter).
  ModuleAdapter(lora_type lora) : base(std::move(lora)) {}
  /// A DoRA module.
  ModuleAdapter(dora_type dora) : base(std::move(dora)) {}
  /// DoRA when `magnitude` is given (its length must be out_features), else LoRA.
  ModuleAdapter(lora_type lora, std::optional<cvector> magnitude) : base(std::move(lora)) {
    if (magnitude) v_ = dora_type(std::get<lora_type>(std::move(v_)), std::move(*magnitude));
  }

  static ModuleAdapter from_host(const ModuleAdapter& host) { return host; }
  ModuleAdapter to_host() const { return *this; }

  /// DoRA's m [out]; throws lora::error for a LoRA module.
  const cvector& magnitude() const { return dora().magnitude(); }
  /// The same kind of adapter with another low-rank part: DoRA keeps its magnitude (compress,
  /// normalize and the like replace the factors of a module).
  ModuleAdapter with_lora(lora_type lora) const {
    if (!is_dora()) return lora;
    return dora_type(std::move(lora), magnitude());
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
  /// Training mode (dropout() on the adapter's input, PEFT's): LoRA's apply_train, or DoRA's
  /// X·Wᵀ + (c − 1) ⊙ (X̃·Wᵀ) + c ⊙ s·(X̃·Aᵀ)·Bᵀ; fills `cache` (xv and norm only for DoRA).
  cmatrix apply_train(const input& W, const input& X, Generator& gen, DoraForwardCache<compute_scalar>& cache) const {
    if (is_dora()) return std::get<dora_type>(v_).apply_train(W, X, gen, cache);
    cache.xv.resize(0, 0);
    cache.norm.resize(0);
    return std::get<lora_type>(v_).apply_train(W, X, gen, cache.lora);
  }
  /// Gradients of apply_train (W frozen); dm is empty for LoRA.
  DoraGradients<compute_scalar> backward(const input& W, const DoraForwardCache<compute_scalar>& cache,
                                         const Eigen::Ref<const cmatrix>& dY) const {
    if (is_dora()) return std::get<dora_type>(v_).backward(W, cache, dY);
    auto g = std::get<lora_type>(v_).backward(W, cache.lora, dY);
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

};

/// DoRA on an embedding (PEFT's DoraEmbeddingVariant): the lookup of core/embedding.hpp with
/// each embedding dimension scaled by m ⊘ n, n = the column norms of E + ΔE over the
/// vocabulary ([dim], DoraAdapter::weight_norm of the [vocab × dim] table stored [in × out]):
///   y(t) = (m ⊘ n) ⊙ (E(t, :) + s·A(:, t)ᵀ·Bᵀ)
template <class Scalar, ScalingPolicy Scaling>
Matrix<compute_t<Scalar>> embedding_forward(const DoraAdapter<Scalar, cpu, Scaling>& d, const MatrixRef<Scalar>& E,
                                            std::span<const std::int64_t> ids) {
  Matrix<compute_t<Scalar>> y = embedding_forward(d.lora(), E, ids);
  y *= d.magnitude().cwiseQuotient(d.weight_norm(E)).asDiagonal();
  return y;
}

/// The embedding lookup of a module adapter: LoRA's or DoRA's.
template <class Scalar, ScalingPolicy Scaling>
Matrix<compute_t<Scalar>> embedding_forward(const ModuleAdapter<Scalar, cpu, Scaling>& m, const MatrixRef<Scalar>& E,
                                            std::span<const std::int64_t> ids) {
  if (m.is_dora()) return embedding_forward(m.dora(), E, ids);
  return embedding_forward(m.lora(), E, ids);
}

}  // namespace lora
