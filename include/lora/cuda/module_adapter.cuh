#pragma once
// ModuleAdapter<S, lora::cuda>: a module's adapter on the GPU, LoRA or DoRA chosen by the data
// (a magnitude vector or none), with the member functions of ModuleAdapter<S, cpu>
// (lora/dora/module_adapter.hpp): what a loaded PEFT module holds, moved to the device.

#include <lora/cuda/adapter.cuh>
#include <lora/cuda/dora.cuh>
#include <lora/cuda/runtime.hpp>
#include <lora/dora/module_adapter.hpp>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace lora {

/// LoRA or DoRA on an NVIDIA GPU, with the members of ModuleAdapter<S, cpu>: apply, backward,
/// merge and unmerge are DoRA's (DoraAdapter<S, cuda>) for a DoRA module and LoRA's
/// (LowRankAdapter<S, cuda>) otherwise; the shape and factor accessors are the low-rank part's.
/// As on those classes, a product the CPU returns has a form that returns a new DeviceMatrix and
/// one that writes a caller's buffer; the fused path (fuse, apply(fw, Xp, Y), backward(fw, …))
/// is theirs too. S is bfloat16, half or float (arithmetic in float); the magnitude is float.
///
///   const auto peft = lora::io::load_peft_adapter("dora-adapter/");
///   const auto& host = peft.at("model.layers.0.self_attn.q_proj").adapter;   // ModuleAdapter<float, cpu, …>
///   auto q = lora::ModuleAdapter<lora::bfloat16, lora::cuda, lora::dynamic_scaling>::from_host(host);
///   auto Y = q.apply(W, X);   // (m ⊘ ‖W + s·B·A‖_row) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) when q.is_dora()
///   auto n = q.merge(W);      // DoRA's row norms (empty for LoRA), what unmerge needs
///   q.unmerge(W, n);
template <class Scalar, ScalingPolicy Scaling>
class ModuleAdapter<Scalar, cuda, Scaling>
    : public detail::LoraOrDora<LowRankAdapter<Scalar, cuda, Scaling>, DoraAdapter<Scalar, cuda, Scaling>> {
  static_assert(is_device_scalar_v<Scalar>, "ModuleAdapter<S, cuda>: S must be float, bfloat16 or half");
  using base = detail::LoraOrDora<LowRankAdapter<Scalar, cuda, Scaling>, DoraAdapter<Scalar, cuda, Scaling>>;
  using base::v_;

 public:
  using typename base::lora_type;
  using typename base::dora_type;
  using base::dora;
  using base::is_dora;
  using base::lora;
  using base::out_features;
  using base::spec;
  using base::who;
  using host_type = ModuleAdapter<Scalar, cpu, Scaling>;
  using scalar_type = Scalar;
  using device_type = cuda;
  using scaling_policy = Scaling;
  using view = DeviceView<Scalar>;
  using cview = DeviceView<const Scalar>;
  using gradients = DeviceDoraGradients<Scalar>;

  /// A plain LoRA module (implicit: every LoRA adapter is a module adapter).
  ModuleAdapter(lora_type lora) : base(std::move(lora)) {}
  /// A DoRA module.
  ModuleAdapter(dora_type dora) : base(std::move(dora)) {}
  /// DoRA when `magnitude` (float, out_features elements) is given, else LoRA.
  ModuleAdapter(lora_type lora, std::optional<DeviceMatrix<float>> magnitude) : base(std::move(lora)) {
    if (magnitude) v_ = dora_type(std::get<lora_type>(std::move(v_)), std::move(*magnitude));
  }

  /// Copies a CPU module (factors rounded to S; alpha, scaling, multiplier, options; the
  /// magnitude in float for DoRA) to the device: a loaded PEFT module is a ModuleAdapter<float, cpu>.
  template <class HostScalar>
  static ModuleAdapter from_host(const ModuleAdapter<HostScalar, cpu, Scaling>& h,
                                 std::shared_ptr<CudaContext> ctx = {}) {
    lora_type lora = lora_type::from_host(detail::with_scalar<Scalar>(h.lora()), std::move(ctx));
    if (!h.is_dora()) return ModuleAdapter(std::move(lora));
    const Matrix<float> m = h.magnitude().template cast<float>();
    return ModuleAdapter(dora_type(std::move(lora), DeviceMatrix<float>::from_host(m)));
  }
  /// The CPU module with the current device factors and magnitude, factors as T (S by default;
  /// T = float gives what io::PeftModule holds). Synchronises.
  template <class T = Scalar>
  ModuleAdapter<T, cpu, Scaling> to_host() const {
    auto l = detail::with_scalar<T>(lora().to_host());
    if (!is_dora()) return l;
    const Matrix<float> m = lora::to_host(magnitude());
    Vector<compute_t<T>> v(out_features());
    for (Index i = 0; i < v.size(); ++i) v[i] = static_cast<compute_t<T>>(m.data()[i]);
    return ModuleAdapter<T, cpu, Scaling>(std::move(l), std::optional<Vector<compute_t<T>>>(std::move(v)));
  }

  /// DoRA's m [out × 1] in float on the device; throws lora::error for a LoRA module.
  DeviceView<const float> magnitude() const { return dora().magnitude(); }
  /// The same kind of adapter with another low-rank part: DoRA keeps (a device copy of) its
  /// magnitude, on `lora`'s context.
  ModuleAdapter with_lora(lora_type lora) const {
    if (!is_dora()) return ModuleAdapter(std::move(lora));
    const DeviceView<const float> m = magnitude();
    DeviceMatrix<float> copy(m.rows, m.cols);
    CudaContext& from = dora().context();
    CudaContext& to = lora.context();
    if (&from != &to) from.synchronize();  // m's last writer ran on the other stream
    if (copy.size())
      LORA_CUDA_CHECK(cudaMemcpy2DAsync(copy.data(), m.cols * sizeof(float), m.data, m.ld * sizeof(float),
                                        m.cols * sizeof(float), m.rows, cudaMemcpyDeviceToDevice, to.stream()));
    return ModuleAdapter(dora_type(std::move(lora), std::move(copy)));
  }

  CudaContext& context() const { return lora().context(); }

  /// The adapted layer, unmerged, no bias: Y = X·Wᵀ + s·(X·Aᵀ)·Bᵀ, times m ⊘ ‖W + s·B·A‖_row for
  /// DoRA, for X [T × in] into Y [T × out].
  void apply(cview W, cview X, view Y) const {
    if (is_dora()) return std::get<dora_type>(v_).apply(W, X, Y);
    std::get<lora_type>(v_).apply(W, X, Y);
  }
  DeviceMatrix<Scalar> apply(cview W, cview X) const {
    DeviceMatrix<Scalar> y(X.rows, out_features());
    apply(W, X, y.view());
    return y;
  }
  /// Gradients of apply(W, X) (W frozen; DoRA's norm held constant, as PEFT): dA, dB and dm in
  /// float, dX in S; dm is empty for LoRA.
  gradients backward(cview W, cview X, cview dY) const {
    if (is_dora()) return std::get<dora_type>(v_).backward(W, X, dY);
    DeviceGradients<Scalar> g = std::get<lora_type>(v_).backward(W, X, dY);
    return {std::move(g.dA), std::move(g.dB), DeviceMatrix<float>(), std::move(g.dX)};
  }
  /// W ← W + ΔW (LoRA) or (m ⊘ n) ⊙ (W + ΔW) (DoRA), in place; returns DoRA's n = ‖W + ΔW‖_row
  /// [out × 1], which unmerge needs, or an empty matrix for LoRA.
  DeviceMatrix<float> merge(view W) const {
    if (is_dora()) return std::get<dora_type>(v_).merge(W);
    std::get<lora_type>(v_).merge(W);
    return {};
  }
  /// Undoes merge with the norms it returned (none for LoRA).
  void unmerge(view W, DeviceView<const float> n = {}) const {
    if (is_dora()) return std::get<dora_type>(v_).unmerge(W, n);
    if (n.rows * n.cols != 0)
      detail::fail("{}LoRA unmerge takes no weight norms (merge returned none), got {}", who(), n.rows * n.cols);
    std::get<lora_type>(v_).unmerge(W);
  }
  /// W + ΔW (LoRA) or (m ⊘ n) ⊙ (W + ΔW) (DoRA) in W's orientation, rounded to S; W unchanged.
  DeviceMatrix<Scalar> merged_weight(cview W) const {
    if (is_dora()) return std::get<dora_type>(v_).merged_weight(W);
    spec().check_weight(W.rows, W.cols);
    DeviceMatrix<Scalar> M(W.rows, W.cols);
    if (M.size())
      LORA_CUDA_CHECK(cudaMemcpy2DAsync(M.data(), M.cols() * sizeof(Scalar), W.data, W.ld * sizeof(Scalar),
                                        W.cols * sizeof(Scalar), W.rows, cudaMemcpyDeviceToDevice,
                                        context().stream()));
    std::get<lora_type>(v_).merge(M.view());
    return M;
  }

  // ---- the fused path (LowRankAdapter<S, cuda>'s and DoraAdapter<S, cuda>'s; W [out × in]) ----

  /// The fused block of W and the factors; refresh(fw) after A or B change.
  FusedWeight<Scalar> fuse(cview W) const { return lora().fuse(W); }
  void refresh(FusedWeight<Scalar>& fw) const {
    if (is_dora()) return std::get<dora_type>(v_).refresh(fw);
    lora().refresh(fw);
  }
  DeviceMatrix<Scalar> padded_input(Index tokens) const { return lora().padded_input(tokens); }
  DeviceMatrix<Scalar> padded_grad(Index tokens) const { return lora().padded_grad(tokens); }
  /// Fused forward, Y as apply(W, X) gives it, with Xp = [X | scratch] (padded_input).
  void apply(const FusedWeight<Scalar>& fw, view Xp, view Y) const {
    if (is_dora()) return std::get<dora_type>(v_).apply(fw, Xp, Y);
    std::get<lora_type>(v_).apply(fw, Xp, Y);
  }
  /// Gradients of the fused apply: Y is its output (DoRA reads it; LoRA does not), dYp =
  /// [dY | scratch] (padded_grad); writes dX [T × in], dA [r × in], dB [out × r] and, for DoRA,
  /// dm [out] in float. A LoRA module takes an empty dm (it has no magnitude) and throws
  /// lora::error for any other.
  void backward(const FusedWeight<Scalar>& fw, cview Xp, cview Y, view dYp, view dX, DeviceView<float> dA,
                DeviceView<float> dB, DeviceView<float> dm) const {
    if (is_dora()) return std::get<dora_type>(v_).backward(fw, Xp, Y, dYp, dX, dA, dB, dm);
    if (dm.rows * dm.cols != 0)
      detail::fail("{}LoRA backward has no magnitude gradient: dm must be empty, got {} elements", who(),
                   dm.rows * dm.cols);
    std::get<lora_type>(v_).backward(fw, Xp, dYp, dX, dA, dB);
  }

};

}  // namespace lora
