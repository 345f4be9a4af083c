#pragma once
// LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer): B learns ratio times faster
// than A. Also the plain registration of adapter parameters with an AdamW.

#include <lora/adalora/svd_adapter.hpp>
#include <lora/core/adapter.hpp>
#include <lora/train/optim.hpp>

#include <optional>
#include <span>
#include <vector>

namespace lora {

/// LoRA+ learning rates: η_A = lr, η_B = lr · ratio (PEFT's loraplus_lr_ratio; the paper and
/// PEFT's docs suggest 16), the same weight decay for both (PEFT's loraplus_weight_decay).
struct LoraPlusOptions {
  double lr = 1e-4;
  double ratio = 16.0;
  double weight_decay = 0.0;
};

/// Throws lora::error for a negative lr or weight decay, or a ratio ≤ 0.
inline void check_loraplus(const LoraPlusOptions& o) {
  if (!(o.lr >= 0)) detail::fail("LoRA+: lr must be >= 0, got {}", o.lr);
  if (!(o.ratio > 0)) detail::fail("LoRA+: ratio (loraplus_lr_ratio) must be > 0, got {}", o.ratio);
  if (!(o.weight_decay >= 0)) detail::fail("LoRA+: weight_decay must be >= 0, got {}", o.weight_decay);
}

/// Indices of an adapter's parameters inside an AdamW (E only for AdaLoRA adapters).
struct AdapterSlots {
  std::size_t A = 0, B = 0;
  std::optional<std::size_t> E;
};

/// Registers A (and E) at lr and B at lr·ratio. PEFT puts AdaLoRA's E ([r × 1], not named
/// lora_B) in A's group.
///
///   lora::AdamW<float> opt;
///   auto slots = lora::add_loraplus(opt, adapter, {.lr = 2e-4, .ratio = 16});
///   lora::adamw_step(opt, slots, adapter.backward(X, dY));
template <class S, ScalingPolicy P>
AdapterSlots add_loraplus(AdamW<S>& opt, LowRankAdapter<S, cpu, P>& ad, const LoraPlusOptions& o) {
  check_loraplus(o);
  AdapterSlots s;
  s.A = opt.add(ad.A(), o.lr, o.weight_decay, ad.name() + ".lora_A");
  s.B = opt.add(ad.B(), o.lr * o.ratio, o.weight_decay, ad.name() + ".lora_B");
  return s;
}
template <class S>
AdapterSlots add_loraplus(AdamW<S>& opt, SvdAdapter<S>& ad, const LoraPlusOptions& o) {
  check_loraplus(o);
  AdapterSlots s;
  s.A = opt.add(ad.A(), o.lr, o.weight_decay, ad.name() + ".lora_A");
  s.E = opt.add(ad.E(), o.lr, o.weight_decay, ad.name() + ".lora_E");
  s.B = opt.add(ad.B(), o.lr * o.ratio, o.weight_decay, ad.name() + ".lora_B");
  return s;
}

/// Registers every parameter of the adapter with the optimiser's own lr and weight decay.
template <class S, ScalingPolicy P>
AdapterSlots add_adapter(AdamW<S>& opt, LowRankAdapter<S, cpu, P>& ad) {
  AdapterSlots s;
  s.A = opt.add(ad.A(), std::nullopt, std::nullopt, ad.name() + ".lora_A");
  s.B = opt.add(ad.B(), std::nullopt, std::nullopt, ad.name() + ".lora_B");
  return s;
}
template <class S>
AdapterSlots add_adapter(AdamW<S>& opt, SvdAdapter<S>& ad) {
  AdapterSlots s;
  s.A = opt.add(ad.A(), std::nullopt, std::nullopt, ad.name() + ".lora_A");
  s.E = opt.add(ad.E(), std::nullopt, std::nullopt, ad.name() + ".lora_E");
  s.B = opt.add(ad.B(), std::nullopt, std::nullopt, ad.name() + ".lora_B");
  return s;
}

/// One AdamW update of an adapter's parameters from its Gradients / SvdGradients.
template <class S, class G>
void adamw_step(AdamW<S>& opt, const AdapterSlots& s, const G& g) {
  opt.update(s.A, g.dA);
  opt.update(s.B, g.dB);
  if constexpr (requires { g.dE; }) {
    if (!s.E) detail::fail("adamw_step: gradients have dE but the adapter was registered without E");
    opt.update(*s.E, g.dE);
  }
}

}  // namespace lora
