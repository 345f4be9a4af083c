#pragma once
// AdapterSpec: what every adapter class shares (shape, alpha, options) with the checks and
// messages that go with it, written once for LowRankAdapter (CPU and CUDA), DoraAdapter, the
// embedding and lora_bias helpers and AdaLoRA's SvdAdapter.

#include <lora/core/scaling.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <algorithm>
#include <cmath>
#include <string>

namespace lora {

/// Construction options that are not part of the type.
struct AdapterOptions {
  /// GPT-2's Conv1D stores W as [in × out] and computes y = x·W; PEFT's
  /// fan_in_fan_out = true. A and B keep their orientation; ΔW, apply and
  /// merge use W's.
  bool fan_in_fan_out = false;
  /// Probability of zeroing an adapter input element in training mode.
  double dropout = 0.0;
  /// Used in messages ("adapter 'model.layers.0.q_proj': ...").
  std::string name = {};
};

namespace detail {
inline void check_shape(const std::string& who, const char* what, Index rows, Index cols, Index want_rows,
                        Index want_cols) {
  if (rows != want_rows || cols != want_cols)
    fail("{}{} has shape [{} x {}], expected [{} x {}]", who, what, rows, cols, want_rows, want_cols);
}
inline void check_cols(const std::string& who, const char* what, Index cols, Index want_cols) {
  if (cols != want_cols) fail("{}{} has {} columns, expected {}", who, what, cols, want_cols);
}
}  // namespace detail

/// The shape, strength and options of an adapter, A [r × in] and B [out × r], and every
/// check on them. Each message starts with who(): "adapter 'name': " (empty without a name).
///
///   lora::AdapterSpec spec{.in_features = 4096, .out_features = 4096, .rank = 16, .alpha = 32};
///   spec.validate();                        // throws lora::error naming the adapter
///   double s = spec.factor(lora::rslora_scaling{});   // 32 / sqrt(16)
struct AdapterSpec {
  Index in_features = 0;
  Index out_features = 0;
  Index rank = 0;
  double alpha = 0;
  AdapterOptions opts = {};

  /// "adapter 'name': ", or "" for an unnamed adapter: the prefix of every message.
  std::string who() const { return opts.name.empty() ? std::string() : fmt::format("adapter '{}': ", opts.name); }
  /// "adapter 'name'", or "adapter": for messages that name the adapter as their subject.
  std::string label() const { return opts.name.empty() ? std::string("adapter") : "adapter '" + opts.name + "'"; }

  /// Scaling::factor(alpha, r).
  template <ScalingPolicy Scaling>
  double factor(const Scaling& policy) const {
    return static_cast<double>(policy.factor(alpha, static_cast<int>(rank)));
  }

  /// Throws lora::error unless in, out ≥ 1, min_rank ≤ r (≤ min(in, out) when `bounded`),
  /// alpha is finite and dropout is in [0, 1).
  void validate(Index min_rank = 1, bool bounded = true) const {
    if (in_features < 1 || out_features < 1)
      fail("{}in_features and out_features must be at least 1, got in = {}, out = {}", who(), in_features,
           out_features);
    if (rank < min_rank) fail("{}rank r must be at least {}, got r = {}", who(), min_rank, rank);
    if (bounded && rank > std::min(in_features, out_features))
      fail("{}rank r = {} exceeds min(in_features, out_features) = min({}, {}) = {}", who(), rank, in_features,
           out_features, std::min(in_features, out_features));
    check_alpha(alpha);
    check_dropout(opts.dropout);
  }
  void check_alpha(double a) const {
    if (!std::isfinite(a)) fail("{}lora_alpha must be finite, got {}", who(), a);
  }
  void check_dropout(double p) const {
    if (!(p >= 0.0 && p < 1.0)) fail("{}dropout must be in [0, 1), got {}", who(), p);
  }
  /// A multiplier applied to the adapter's output (a set's per-adapter scaling).
  void check_scaling(double s) const {
    if (!std::isfinite(s)) fail("{}scaling must be finite, got {}", who(), s);
  }
  void check_rescale(double factor) const {
    if (!std::isfinite(factor)) fail("{}rescale factor must be finite, got {}", who(), factor);
  }
  /// lora_A [r × in] and lora_B [out × r] must agree on r.
  void check_factor_ranks(Index a_rows, Index b_cols) const {
    if (a_rows != b_cols)
      fail("{}lora_A has {} rows and lora_B has {} columns; both must equal the rank r", who(), a_rows, b_cols);
  }
  /// lora_A [r × in_features] and lora_B [out_features × r], the same r in both (r itself is
  /// checked by validate()).
  void check_factor_shapes(Index a_rows, Index a_cols, Index b_rows, Index b_cols) const {
    if (a_cols != in_features)
      fail("{}lora_A has shape [{} x {}], expected [r x {}] (in_features = {})", who(), a_rows, a_cols, in_features,
           in_features);
    if (b_rows != out_features)
      fail("{}lora_B has shape [{} x {}], expected [{} x r] (out_features = {})", who(), b_rows, b_cols, out_features,
           out_features);
    check_factor_ranks(a_rows, b_cols);
  }
  /// `what` must be [want_rows × want_cols].
  void check_shape(const char* what, Index rows, Index cols, Index want_rows, Index want_cols) const {
    detail::check_shape(who(), what, rows, cols, want_rows, want_cols);
  }
  /// Tokens X [T × in].
  void check_input(Index cols) const { detail::check_cols(who(), "input X", cols, in_features); }
  /// The base weight: [out × in], or [in × out] with fan_in_fan_out.
  void check_weight(Index rows, Index cols) const {
    if (opts.fan_in_fan_out)
      detail::check_shape(who(), "base weight W (fan_in_fan_out)", rows, cols, in_features, out_features);
    else
      detail::check_shape(who(), "base weight W", rows, cols, out_features, in_features);
  }
  /// dY [T × out].
  void check_output_grad(Index rows, Index cols, Index tokens) const {
    detail::check_shape(who(), "dY", rows, cols, tokens, out_features);
  }
};

}  // namespace lora
