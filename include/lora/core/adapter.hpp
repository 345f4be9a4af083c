#pragma once
// LowRankAdapter: ΔW = s·B·A in PEFT's orientation (A [r × in], B [out × r]),
// forward, backward, dropout, merge/unmerge and post-hoc strength changes.

#include <lora/core/merge.hpp>
#include <lora/core/random.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/spec.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Core>
#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

namespace lora {

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
      : spec_{in_features, out_features, rank, alpha, std::move(opts)}, policy_(policy) {
    spec_.validate();
    A_ = matrix::Zero(spec_.rank, spec_.in_features);
    B_ = matrix::Zero(spec_.out_features, spec_.rank);
  }

  /// Adopts existing factors A [r × in] and B [out × r].
  static LowRankAdapter from_factors(matrix A, matrix B, double alpha, AdapterOptions opts = {},
                                     Scaling policy = {}) {
    AdapterSpec{A.cols(), B.rows(), A.rows(), alpha, opts}.check_factor_ranks(A.rows(), B.cols());
    LowRankAdapter ad(A.cols(), B.rows(), A.rows(), alpha, std::move(opts), policy);
    ad.A_ = std::move(A);
    ad.B_ = std::move(B);
    return ad;
  }

  /// A copy: the CPU side of the device-generic `LowRankAdapter<S, D>::from_host(host)`.
  static LowRankAdapter from_host(const LowRankAdapter& host) { return host; }
  /// A copy in host memory, as `LowRankAdapter<S, cuda>::to_host()` gives.
  LowRankAdapter to_host() const { return *this; }

  Index in_features() const { return spec_.in_features; }
  Index out_features() const { return spec_.out_features; }
  Index rank() const { return spec_.rank; }
  double alpha() const { return spec_.alpha; }
  bool fan_in_fan_out() const { return spec_.opts.fan_in_fan_out; }
  double dropout() const { return spec_.opts.dropout; }
  const std::string& name() const { return spec_.opts.name; }
  const Scaling& policy() const { return policy_; }
  /// Shape, alpha and options, with the checks every adapter class shares.
  const AdapterSpec& spec() const { return spec_; }

  /// s = multiplier · Scaling::factor(alpha, r); the multiplier is 1 unless rescale() was called.
  double scaling() const { return multiplier_ * spec_.factor(policy_); }
  /// The post-hoc strength multiplier set by rescale().
  double multiplier() const { return multiplier_; }

  const matrix& A() const { return A_; }
  const matrix& B() const { return B_; }
  /// Mutable views for optimisers; the shape must not change.
  Eigen::Ref<matrix> A() { return A_; }
  Eigen::Ref<matrix> B() { return B_; }

  void set_A(const input& A) {
    detail::check_shape(who(), "lora_A", A.rows(), A.cols(), spec_.rank, spec_.in_features);
    A_ = A;
  }
  void set_B(const input& B) {
    detail::check_shape(who(), "lora_B", B.rows(), B.cols(), spec_.out_features, spec_.rank);
    B_ = B;
  }

  /// Changes alpha after training; scaling() follows the policy.
  void set_alpha(double alpha) {
    spec_.check_alpha(alpha);
    spec_.alpha = alpha;
  }
  /// Multiplies the adapter's strength by `factor` (PEFT's set_scale / scale_layer):
  /// ΔW becomes factor·ΔW. Cumulative.
  void rescale(double factor) {
    spec_.check_rescale(factor);
    multiplier_ *= factor;
  }

  void set_dropout(double p) {
    spec_.check_dropout(p);
    spec_.opts.dropout = p;
  }

  /// (in + out)·r.
  Index trainable_parameters() const { return (spec_.in_features + spec_.out_features) * spec_.rank; }

  /// ΔW = s·B·A, [out × in] (or [in × out] with fan_in_fan_out), as PEFT's get_delta_weight.
  cmatrix delta_weight() const {
    cmatrix d = Bc() * Ac();
    d *= static_cast<compute_scalar>(scaling());
    if (spec_.opts.fan_in_fan_out) return d.transpose();
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
        cmatrix y = cmatrix::Zero(X.rows(), spec_.out_features);
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
    cmatrix y(X.rows(), spec_.out_features);
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
    if (spec_.opts.dropout > 0.0) {
      const double p = spec_.opts.dropout;
      const compute_scalar kept = static_cast<compute_scalar>(1.0 / (1.0 - p));
      cache.keep.resize(X.rows(), spec_.in_features);
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
        detail::check_shape(who(), "dY", dY.rows(), dY.cols(), X.rows(), spec_.out_features);
        const compute_scalar s = static_cast<compute_scalar>(scaling());
        Gradients<compute_scalar> g;
        const cmatrix xa = X.lazyProduct(A_.transpose());  // [T × r]
        const cmatrix gb = s * dY.lazyProduct(B_);          // [T × r]
        g.dB = s * dY.transpose().lazyProduct(xa);
        // Sums of outer products walk X and A along their contiguous rows.
        g.dA = cmatrix::Zero(spec_.rank, spec_.in_features);
        for (Index t = 0; t < X.rows(); ++t) g.dA.noalias() += gb.row(t).transpose() * X.row(t);
        g.dX = cmatrix::Zero(X.rows(), spec_.in_features);
        for (Index k = 0; k < spec_.rank; ++k) g.dX.noalias() += gb.col(k) * A_.row(k);
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
    detail::check_shape(who(), "dY", dY.rows(), dY.cols(), cache.x.rows(), spec_.out_features);
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
  std::string who() const { return spec_.who(); }
  void check_input(const input& X) const { spec_.check_input(X.cols()); }
  void check_weight(const input& W) const { spec_.check_weight(W.rows(), W.cols()); }

  decltype(auto) Ac() const { return A_.template cast<compute_scalar>(); }
  decltype(auto) Bc() const { return B_.template cast<compute_scalar>(); }

  void add_base(const input& W, const input& X, cmatrix& y, bool accumulate = false) const {
    auto Xc = X.template cast<compute_scalar>();
    auto Wc = W.template cast<compute_scalar>();
    if (spec_.opts.fan_in_fan_out) {
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
    if (spec_.opts.fan_in_fan_out)
      dX.noalias() += dY * Wc.transpose();
    else
      dX.noalias() += dY * Wc;
  }
  // One routine for every merge (core/merge.hpp): W's rows ± s·coef·basis, with coef = B,
  // basis = A, or Aᵀ and Bᵀ when W is stored [in × out].
  void add_delta(Eigen::Ref<matrix> W, int sign) const {
    check_weight(W);
    const compute_scalar s = static_cast<compute_scalar>(sign) * static_cast<compute_scalar>(scaling());
    if (spec_.opts.fan_in_fan_out)
      low_rank_update<Scalar>(W, cmatrix(Ac().transpose()), cmatrix(Bc().transpose()), s);
    else
      low_rank_update<Scalar>(W, cmatrix(Bc()), cmatrix(Ac()), s);
  }

  AdapterSpec spec_;
  [[no_unique_address]] Scaling policy_;
  double multiplier_ = 1.0;
  matrix A_, B_;
};

namespace detail {
/// The adapter with its factors rounded to T (alpha, multiplier, options and policy kept).
template <class T, class S, ScalingPolicy Sc>
LowRankAdapter<T, cpu, Sc> with_scalar(const LowRankAdapter<S, cpu, Sc>& a) {
  if constexpr (std::is_same_v<T, S>) {
    return a;
  } else {
    LowRankAdapter<T, cpu, Sc> b(a.in_features(), a.out_features(), a.rank(), a.alpha(),
                                 AdapterOptions{a.fan_in_fan_out(), a.dropout(), a.name()}, a.policy());
    b.rescale(a.multiplier());
    b.set_A(a.A().template cast<T>());
    b.set_B(a.B().template cast<T>());
    return b;
  }
}
}  // namespace detail

}  // namespace lora
