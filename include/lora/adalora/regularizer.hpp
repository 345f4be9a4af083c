#pragma once
// AdaLoRA's orthogonal regulariser, as PEFT's AdaLoraModel.forward adds it to the loss:
//   R = (1/n) Σ_modules ( ‖A·Aᵀ − I‖_F + ‖Bᵀ·B − I‖_F ),  n = number of A and B matrices,
// and the loss becomes L + orth_reg_weight · R.

#include <lora/adalora/svd_adapter.hpp>

#include <cmath>
#include <span>
#include <vector>

namespace lora {

/// R and ∂R/∂A, ∂R/∂B for every adapter (in the adapters' order).
template <class S>
struct OrthogonalPenalty {
  double value = 0.0;
  std::vector<Matrix<S>> dA;
  std::vector<Matrix<S>> dB;
};

namespace detail {
// ‖M·Mᵀ − I‖_F and its gradient 2·(M·Mᵀ − I)·M / ‖·‖ (M is A, or Bᵀ). At 0 the norm is
// not differentiable; torch's norm backward gives 0 there, and so do we.
template <class S>
double gram_deviation(const Eigen::Ref<const Matrix<S>>& M, Matrix<S>* grad) {
  Matrix<S> D = M * M.transpose();
  D.diagonal().array() -= S(1);
  const double f = static_cast<double>(D.norm());
  if (grad) {
    if (f > 0)
      *grad = (S(2) / static_cast<S>(f)) * (D * M);
    else
      *grad = Matrix<S>::Zero(M.rows(), M.cols());
  }
  return f;
}
}  // namespace detail

/// The orthogonal regulariser R of a set of AdaLoRA adapters (see the file comment), with
/// its gradient; multiply both by orth_reg_weight before adding them to the loss and grads.
/// Adapters of rank 0 contribute two zero-size matrices, as in PEFT (‖0×0 − I‖ = 0).
template <class S>
OrthogonalPenalty<S> orthogonal_penalty(std::span<const SvdAdapter<S>> adapters, bool with_grad = true) {
  OrthogonalPenalty<S> out;
  const std::size_t n = 2 * adapters.size();
  if (n == 0) return out;
  for (const auto& ad : adapters) {
    Matrix<S> gA, gBt;
    const double fa = detail::gram_deviation<S>(ad.A(), with_grad ? &gA : nullptr);
    const Matrix<S> Bt = ad.B().transpose();
    const double fb = detail::gram_deviation<S>(Bt, with_grad ? &gBt : nullptr);
    out.value += fa + fb;
    if (with_grad) {
      out.dA.push_back(gA / static_cast<S>(n));
      out.dB.push_back(gBt.transpose() / static_cast<S>(n));
    }
  }
  out.value /= static_cast<double>(n);
  return out;
}

template <class S>
OrthogonalPenalty<S> orthogonal_penalty(const std::vector<SvdAdapter<S>>& adapters, bool with_grad = true) {
  return orthogonal_penalty<S>(std::span<const SvdAdapter<S>>(adapters), with_grad);
}

}  // namespace lora
