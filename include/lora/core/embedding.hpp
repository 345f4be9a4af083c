#pragma once
// LoRA on an embedding layer (PEFT's lora.Embedding), held in a LowRankAdapter.
//
// PEFT stores lora_embedding_A [r × vocab] and lora_embedding_B [dim × r]; the embedding
// weight E is [vocab × dim] and a token id t reads row E(t, :). The adapted layer is
//
//   ΔE = s·(B·A)ᵀ                          [vocab × dim]
//   y(t) = E(t, :) + s·A(:, t)ᵀ·Bᵀ           one row per token id
//
// which is a LowRankAdapter with A [r × vocab], B [dim × r] and fan_in_fan_out = true
// (in = vocab, out = dim, the weight stored [in × out]): its delta_weight() is ΔE and its
// merge() adds ΔE to E. embedding_adapter() builds one; embedding_forward() is the lookup.
//
//   auto ad = lora::embedding_adapter<float>(A, B, /*alpha=*/8);
//   Matrix<float> y = lora::embedding_forward(ad, E, ids);   // [ids.size() × dim]

#include <lora/core/adapter.hpp>
#include <lora/core/spec.hpp>
#include <lora/error.hpp>

#include <cstdint>
#include <span>
#include <string>

namespace lora {

/// A LowRankAdapter for an embedding: A = lora_embedding_A [r × vocab], B =
/// lora_embedding_B [dim × r], fan_in_fan_out set (opts.fan_in_fan_out is overridden).
template <class Scalar, ScalingPolicy Scaling = standard_scaling>
LowRankAdapter<Scalar, cpu, Scaling> embedding_adapter(Matrix<Scalar> A, Matrix<Scalar> B, double alpha,
                                                       AdapterOptions opts = {}, Scaling policy = {}) {
  opts.fan_in_fan_out = true;
  return LowRankAdapter<Scalar, cpu, Scaling>::from_factors(std::move(A), std::move(B), alpha, std::move(opts),
                                                            policy);
}

/// The adapted embedding of token ids: row i is E(ids[i], :) + s·A(:, ids[i])ᵀ·Bᵀ, as PEFT's
/// lora.Embedding forward in eval mode. E is [vocab × dim]; `ad` must be an embedding adapter
/// (fan_in_fan_out, in = vocab, out = dim). Throws lora::error for an id outside [0, vocab);
/// messages start with the adapter's AdapterSpec::who().
template <class Scalar, ScalingPolicy Scaling>
Matrix<compute_t<Scalar>> embedding_forward(const LowRankAdapter<Scalar, cpu, Scaling>& ad,
                                            const MatrixRef<Scalar>& E, std::span<const std::int64_t> ids) {
  using C = compute_t<Scalar>;
  const AdapterSpec& spec = ad.spec();
  if (!ad.fan_in_fan_out())
    detail::fail("{}expected an embedding adapter (fan_in_fan_out, A [r × vocab]), got a linear one (A [r × in])",
                 spec.who());
  spec.check_shape("embedding weight E [vocab x dim]", E.rows(), E.cols(), ad.in_features(), ad.out_features());
  const Index n = static_cast<Index>(ids.size());
  Matrix<C> xa(n, ad.rank());
  Matrix<C> y(n, ad.out_features());
  for (Index i = 0; i < n; ++i) {
    const std::int64_t t = ids[static_cast<std::size_t>(i)];
    if (t < 0 || t >= ad.in_features())
      detail::fail("{}token id {} at position {} is outside the vocabulary [0, {})", spec.who(), t, i, ad.in_features());
    y.row(i) = E.row(static_cast<Index>(t)).template cast<C>();
    xa.row(i) = ad.A().col(static_cast<Index>(t)).transpose().template cast<C>();
  }
  xa *= static_cast<C>(ad.scaling());
  y.noalias() += xa * ad.B().transpose().template cast<C>();
  return y;
}

}  // namespace lora
