#pragma once
// PEFT's lora_bias = True: lora_B is a Linear with a bias b_B [out], so the adapter adds
// s·b_B to every output and merging adds it to the base layer's bias:
//
//   y  = X·Wᵀ + b + s·(X·Aᵀ)·Bᵀ + s·b_B
//   W' = W + s·B·A,   b' = b + s·b_B
//
// A base layer without a bias cannot take the merge (PEFT raises "Impossible to merge LoRA
// with `lora_bias=True` because the base layer has no bias"); the forward still works.
//
//   auto y = lora::apply_with_bias(ad, W, &b, b_B, X);   // pass nullptr for a bias-less base

#include <lora/core/adapter.hpp>
#include <lora/error.hpp>

namespace lora {

/// The adapted layer with lora_B's bias: X·Wᵀ + b + s·(X·Aᵀ)·Bᵀ + s·b_B (X·W + … with
/// fan_in_fan_out). `base_bias` may be null (a bias-less base layer); `lora_bias` is b_B [out].
template <class Scalar, ScalingPolicy Scaling>
Matrix<compute_t<Scalar>> apply_with_bias(const LowRankAdapter<Scalar, cpu, Scaling>& ad, const MatrixRef<Scalar>& W,
                                          const Vector<float>* base_bias, const Vector<float>& lora_bias,
                                          const MatrixRef<Scalar>& X) {
  using C = compute_t<Scalar>;
  const std::string who = ad.spec().label();
  if (lora_bias.size() != ad.out_features())
    detail::fail("{}: lora_B.bias has {} elements, expected out = {}", who, lora_bias.size(), ad.out_features());
  if (base_bias && base_bias->size() != ad.out_features())
    detail::fail("{}: base bias has {} elements, expected out = {}", who, base_bias->size(), ad.out_features());
  Matrix<C> y = ad.apply(W, X);
  Vector<C> add = lora_bias.template cast<C>() * static_cast<C>(ad.scaling());
  if (base_bias) add += base_bias->template cast<C>();
  y.rowwise() += add.transpose();
  return y;
}

/// Merges lora_B's bias into the base bias: b += s·b_B. Throws lora::error when the base
/// layer has no bias (`base_bias` null), as PEFT's merge does.
template <class Scalar, ScalingPolicy Scaling>
void merge_bias(const LowRankAdapter<Scalar, cpu, Scaling>& ad, Vector<float>* base_bias,
                const Vector<float>& lora_bias) {
  const std::string who = ad.spec().label();
  if (!base_bias)
    detail::fail("{}: cannot merge lora_bias (lora_B.bias) because the base layer has no bias (PEFT refuses this "
                 "merge too: 'Impossible to merge LoRA with lora_bias=True because the base layer has no bias')",
                 who);
  if (base_bias->size() != ad.out_features() || lora_bias.size() != ad.out_features())
    detail::fail("{}: base bias has {} elements and lora_B.bias {}, expected out = {}", who, base_bias->size(),
                 lora_bias.size(), ad.out_features());
  *base_bias += (lora_bias.template cast<double>() * ad.scaling()).template cast<float>();
}

}  // namespace lora
