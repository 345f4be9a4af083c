#pragma once
// LowRankAdapter: ΔW = s·B·A in PEFT's orientation (A [r × in], B [out × r]),
// forward, backward, dropout, merge/unmerge and post-hoc strength changes.

#include <lora/core/merge.hpp>
#include <lora/core/random.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Core>
#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

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

/// What forward_train remembers for backward.
template <class C>
struct ForwardCache {
  Matrix<C> x;     ///< adapter input after dropout [T × in]
  Matrix<C> xa;    ///< x·Aᵀ [T × r] (unscaled)
  Matrix<C> keep;  ///< dropout multipliers (0 or 1/(1-p)) [T × in]; empty without dropout
};

/// Gradients of a scalar loss L with respect to A, B and the input X, given
/// dY = ∂L/∂Y.
template <class C>
struct Gradients {
  Matrix<C> dA;  ///< [r × in]
  Matrix<C> dB;  ///< [out × r]
  Matrix<C> dX;  ///< [T × in]
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

template <class Scalar, class Device = cpu, ScalingPolicy Scaling = standard_scaling>
class LowRankAdapter;

/// A LoRA adapter on the CPU (Eigen). Scalar is float or double, or bfloat16 /
/// half for storage with float arithmetic.
///
///   lora::LowRankAdapter<float> ad(/*in=*/4096, /*out=*/4096, /*r=*/16, /*alpha=*/32);
///   lora::Generator gen(0);
///   lora::initialize(ad, lora::init_method::kaiming_uniform, gen);
///   auto y = ad.apply(W, X);  // X·Wᵀ + (alpha/r)·(X·Aᵀ)·Bᵀ
template <class Scalar, ScalingPolicy Scaling>
class LowRankAdapter<Scalar, cpu, Scaling> {
  static_assert(is_supported_scalar_v<Scalar>, "LowRankAdapter: Scalar must be float, double, bfloat16 or half");

 public:
  using scalar_type = Scalar;
  using compute_scalar = compute_t<Scalar>;
  using device_type = cpu;
  using scaling_policy = Scaling;
  using matrix = Matrix<Scalar>;
  using cmatrix = Matrix<compute_scalar>;
  using input = MatrixRef<Scalar>;

  /// An adapter with A = B = 0; initialise it with lora::initialize or set the
  /// factors. Throws lora::error unless 1 ≤ r ≤ min(in, out) and alpha is finite.
  LowRankAdapter(Index in_features, Index out_features, Index rank, double alpha, AdapterOptions opts = {},
                 Scaling policy = {})
      : in_(in_features), out_(out_features), r_(rank), alpha_(alpha), opts_(std::move(opts)), policy_(policy) {
    validate_dims();
    A_ = matrix::Zero(r_, in_);
    B_ = matrix::Zero(out_, r_);
  }

  /// Adopts existing factors A [r × in] and B [out × r].
  static LowRankAdapter from_factors(matrix A, matrix B, double alpha, AdapterOptions opts = {},
                                     Scaling policy = {}) {
    const std::string who = opts.name.empty() ? std::string() : fmt::format("adapter '{}': ", opts.name);
    if (A.rows() != B.cols())
      detail::fail("{}lora_A has {} rows and lora_B has {} columns; both must equal the rank r", who, A.rows(),
                   B.cols());
    LowRankAdapter ad(A.cols(), B.rows(), A.rows(), alpha, std::move(opts), policy);
    ad.A_ = std::move(A);
    ad.B_ = std::move(B);
    return ad;
  }

  /// A copy: the CPU side of the device-generic `LowRankAdapter<S, D>::from_host(host)`.
  static LowRankAdapter from_host(const LowRankAdapter& host) { return host; }
  /// A copy in host memory, as `LowRankAdapter<S, cuda>::to_host()` gives.
  LowRankAdapter to_host() const { return *this; }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index rank() const { return r_; }
  double alpha() const { return alpha_; }
  bool fan_in_fan_out() const { return opts_.fan_in_fan_out; }
  double dropout() const { return opts_.dropout; }
  const std::string& name() const { return opts_.name; }
  const Scaling& policy() const { return policy_; }

  /// s = multiplier · Scaling::factor(alpha, r); the multiplier is 1 unless rescale() was called.
  double scaling() const { return multiplier_ * static_cast<double>(policy_.factor(alpha_, static_cast<int>(r_))); }
  /// The post-hoc strength multiplier set by rescale().
  double multiplier() const { return multiplier_; }

  const matrix& A() const { return A_; }
  const matrix& B() const { return B_; }
  /// Mutable views for optimisers; the shape must not change.
  Eigen::Ref<matrix> A() { return A_; }
  Eigen::Ref<matrix> B() { return B_; }

  void set_A(const input& A) {
    detail::check_shape(who(), "lora_A", A.rows(), A.cols(), r_, in_);
    A_ = A;
  }
  void set_B(const input& B) {
    detail::check_shape(who(), "lora_B", B.rows(), B.cols(), out_, r_);
    B_ = B;
  }

  /// Changes alpha after training; scaling() follows the policy.
  void set_alpha(double alpha) {
    check_alpha(alpha);
    alpha_ = alpha;
  }
  /// Multiplies the adapter's strength by `factor` (PEFT's set_scale / scale_layer):
  /// ΔW becomes factor·ΔW. Cumulative.
  void rescale(double factor) {
    if (!std::isfinite(factor)) detail::fail("{}rescale factor must be finite, got {}", who(), factor);
    multiplier_ *= factor;
  }

  void set_dropout(double p) {
    if (!(p >= 0.0 && p < 1.0)) detail::fail("{}dropout must be in [0, 1), got {}", who(), p);
    opts_.dropout = p;
  }

  /// (in + out)·r.
  Index trainable_parameters() const { return (in_ + out_) * r_; }

  /// ΔW = s·B·A, [out × in] (or [in × out] with fan_in_fan_out), as PEFT's get_delta_weight.
  cmatrix delta_weight() const {
    cmatrix d = Bc() * Ac();
    d *= static_cast<compute_scalar>(scaling());
    if (opts_.fan_in_fan_out) return d.transpose();
    return d;
  }

  /// Token counts up to which forward and backward (evaluation mode) take the few-token path
  /// (dot products and GEMVs instead of GEMMs; float and double adapters).
  static constexpr Index few_tokens = 16;

  /// The adapter's contribution s·(X·Aᵀ)·Bᵀ for tokens X [T × in] (evaluation mode: no dropout).
  cmatrix forward(const input& X) const {
    check_input(X);
    if constexpr (std::is_same_v<Scalar, compute_scalar>) {
      if (X.rows() <= few_tokens) {
        // Few tokens (decode): Eigen's threaded GEMM would spin-wait on a busy machine for
        // products this small. X·Aᵀ as dot products along A's rows, then one GEMV per token
        // over B's rows (a coefficient-wise product with inner dimension r is slower).
        const cmatrix xa = static_cast<compute_scalar>(scaling()) * X.lazyProduct(A_.transpose());
        cmatrix y = cmatrix::Zero(X.rows(), out_);
        for (Index t = 0; t < X.rows(); ++t) y.row(t).noalias() += (B_ * xa.row(t).transpose()).transpose();
        return y;
      }
    }
    cmatrix xa = X.template cast<compute_scalar>() * Ac().transpose();
    xa *= static_cast<compute_scalar>(scaling());
    cmatrix y = xa * Bc().transpose();
    return y;
  }

  /// X·Wᵀ + s·(X·Aᵀ)·Bᵀ (X·W + … with fan_in_fan_out): the adapted layer, unmerged, without bias.
  cmatrix apply(const input& W, const input& X) const {
    check_weight(W);
    check_input(X);
    cmatrix y(X.rows(), out_);
    add_base(W, X, y);
    cmatrix xa = X.template cast<compute_scalar>() * Ac().transpose();
    xa *= static_cast<compute_scalar>(scaling());
    y.noalias() += xa * Bc().transpose();
    return y;
  }

  /// Training-mode forward of the adapter path: applies dropout to X (drawn
  /// from `gen`), fills `cache` for backward and returns s·(drop(X)·Aᵀ)·Bᵀ.
  cmatrix forward_train(const input& X, Generator& gen, ForwardCache<compute_scalar>& cache) const {
    check_input(X);
    cache.x = X.template cast<compute_scalar>();
    if (opts_.dropout > 0.0) {
      const double p = opts_.dropout;
      const compute_scalar kept = static_cast<compute_scalar>(1.0 / (1.0 - p));
      cache.keep.resize(X.rows(), in_);
      for (Index i = 0; i < cache.keep.rows(); ++i)
        for (Index j = 0; j < cache.keep.cols(); ++j)
          cache.keep(i, j) = gen.uniform() < p ? compute_scalar(0) : kept;
      cache.x.array() *= cache.keep.array();
    } else {
      cache.keep.resize(0, 0);
    }
    cache.xa.noalias() = cache.x * Ac().transpose();
    cmatrix y = (static_cast<compute_scalar>(scaling()) * cache.xa) * Bc().transpose();
    return y;
  }

  /// Same as forward_train, with the base layer added: X·Wᵀ + s·(drop(X)·Aᵀ)·Bᵀ.
  cmatrix apply_train(const input& W, const input& X, Generator& gen, ForwardCache<compute_scalar>& cache) const {
    check_weight(W);
    cmatrix y = forward_train(X, gen, cache);
    add_base(W, X, y, /*accumulate=*/true);
    return y;
  }

  /// Gradients of the adapter path (forward), evaluation mode: dB = s·dYᵀ·(X·Aᵀ),
  /// dA = s·(dY·B)ᵀ·X, dX = s·(dY·B)·A.
  Gradients<compute_scalar> backward(const input& X, const Eigen::Ref<const cmatrix>& dY) const {
    check_input(X);
    if constexpr (std::is_same_v<Scalar, compute_scalar>) {
      if (X.rows() <= few_tokens) {
        detail::check_shape(who(), "dY", dY.rows(), dY.cols(), X.rows(), out_);
        const compute_scalar s = static_cast<compute_scalar>(scaling());
        Gradients<compute_scalar> g;
        const cmatrix xa = X.lazyProduct(A_.transpose());  // [T × r]
        const cmatrix gb = s * dY.lazyProduct(B_);          // [T × r]
        g.dB = s * dY.transpose().lazyProduct(xa);
        // Sums of outer products walk X and A along their contiguous rows.
        g.dA = cmatrix::Zero(r_, in_);
        for (Index t = 0; t < X.rows(); ++t) g.dA.noalias() += gb.row(t).transpose() * X.row(t);
        g.dX = cmatrix::Zero(X.rows(), in_);
        for (Index k = 0; k < r_; ++k) g.dX.noalias() += gb.col(k) * A_.row(k);
        return g;
      }
    }
    ForwardCache<compute_scalar> cache;
    cache.x = X.template cast<compute_scalar>();
    cache.xa.noalias() = cache.x * Ac().transpose();
    return backward(cache, dY);
  }

  /// Gradients after forward_train (dropout mask from the cache).
  Gradients<compute_scalar> backward(const ForwardCache<compute_scalar>& cache,
                                     const Eigen::Ref<const cmatrix>& dY) const {
    detail::check_shape(who(), "dY", dY.rows(), dY.cols(), cache.x.rows(), out_);
    const compute_scalar s = static_cast<compute_scalar>(scaling());
    Gradients<compute_scalar> g;
    cmatrix gb = dY * Bc();  // [T × r]
    gb *= s;
    g.dB.noalias() = s * (dY.transpose() * cache.xa);
    g.dA.noalias() = gb.transpose() * cache.x;
    g.dX.noalias() = gb * Ac();
    if (cache.keep.size() != 0) g.dX.array() *= cache.keep.array();
    return g;
  }

  /// Gradients of apply(W, X): as backward(X, dY), and dX also gets dY·W (W frozen).
  Gradients<compute_scalar> backward(const input& W, const input& X, const Eigen::Ref<const cmatrix>& dY) const {
    check_weight(W);
    Gradients<compute_scalar> g = backward(X, dY);
    add_base_grad(W, dY, g.dX);
    return g;
  }
  /// Gradients of apply_train (dropout from the cache); W frozen.
  Gradients<compute_scalar> backward(const input& W, const ForwardCache<compute_scalar>& cache,
                                     const Eigen::Ref<const cmatrix>& dY) const {
    check_weight(W);
    Gradients<compute_scalar> g = backward(cache, dY);
    add_base_grad(W, dY, g.dX);
    return g;
  }

  /// W ← W + ΔW. W is [out × in] ([in × out] with fan_in_fan_out).
  void merge(Eigen::Ref<matrix> W) const { add_delta(W, +1); }
  /// W ← W − ΔW: undoes merge up to rounding, |error| ≤ 2ε·(|W| + |ΔW|) elementwise.
  void unmerge(Eigen::Ref<matrix> W) const { add_delta(W, -1); }

 private:
  std::string who() const { return opts_.name.empty() ? std::string() : fmt::format("adapter '{}': ", opts_.name); }

  void check_alpha(double alpha) const {
    if (!std::isfinite(alpha)) detail::fail("{}lora_alpha must be finite, got {}", who(), alpha);
  }
  void validate_dims() const {
    if (in_ < 1 || out_ < 1)
      detail::fail("{}in_features and out_features must be at least 1, got in = {}, out = {}", who(), in_, out_);
    if (r_ < 1) detail::fail("{}rank r must be at least 1, got r = {}", who(), r_);
    if (r_ > std::min(in_, out_))
      detail::fail("{}rank r = {} exceeds min(in_features, out_features) = min({}, {}) = {}", who(), r_, in_, out_,
                   std::min(in_, out_));
    check_alpha(alpha_);
    if (!(opts_.dropout >= 0.0 && opts_.dropout < 1.0))
      detail::fail("{}dropout must be in [0, 1), got {}", who(), opts_.dropout);
  }
  void check_input(const input& X) const { detail::check_cols(who(), "input X", X.cols(), in_); }
  void check_weight(const input& W) const {
    if (opts_.fan_in_fan_out)
      detail::check_shape(who(), "base weight W (fan_in_fan_out)", W.rows(), W.cols(), in_, out_);
    else
      detail::check_shape(who(), "base weight W", W.rows(), W.cols(), out_, in_);
  }

  decltype(auto) Ac() const { return A_.template cast<compute_scalar>(); }
  decltype(auto) Bc() const { return B_.template cast<compute_scalar>(); }

  void add_base(const input& W, const input& X, cmatrix& y, bool accumulate = false) const {
    auto Xc = X.template cast<compute_scalar>();
    auto Wc = W.template cast<compute_scalar>();
    if (opts_.fan_in_fan_out) {
      if (accumulate)
        y.noalias() += Xc * Wc;
      else
        y.noalias() = Xc * Wc;
    } else {
      if (accumulate)
        y.noalias() += Xc * Wc.transpose();
      else
        y.noalias() = Xc * Wc.transpose();
    }
  }
  void add_base_grad(const input& W, const Eigen::Ref<const cmatrix>& dY, cmatrix& dX) const {
    auto Wc = W.template cast<compute_scalar>();
    if (opts_.fan_in_fan_out)
      dX.noalias() += dY * Wc.transpose();
    else
      dX.noalias() += dY * Wc;
  }
  // One routine for every merge (core/merge.hpp): W's rows ± s·coef·basis, with coef = B,
  // basis = A, or Aᵀ and Bᵀ when W is stored [in × out].
  void add_delta(Eigen::Ref<matrix> W, int sign) const {
    check_weight(W);
    const compute_scalar s = static_cast<compute_scalar>(sign) * static_cast<compute_scalar>(scaling());
    if (opts_.fan_in_fan_out)
      low_rank_update<Scalar>(W, cmatrix(Ac().transpose()), cmatrix(Bc().transpose()), s);
    else
      low_rank_update<Scalar>(W, cmatrix(Bc()), cmatrix(Ac()), s);
  }

  Index in_, out_, r_;
  double alpha_;
  AdapterOptions opts_;
  [[no_unique_address]] Scaling policy_;
  double multiplier_ = 1.0;
  matrix A_, B_;
};

}  // namespace lora
