#pragma once
// AdaLoRA's SVD-form adapter (Zhang et al. 2023; PEFT's SVDLinear):
// ΔW = Q·diag(Λ)·P · s / (ranknum + 1e-5) with P = lora_A [r × in],
// Λ = lora_E [r], Q = lora_B [out × r] and s = lora_alpha (or r when alpha ≤ 0).

#include <lora/core/adapter.hpp>
#include <lora/core/random.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Core>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace lora {

/// Gradients of a scalar loss with respect to the SVD triplets and the input.
template <class S>
struct SvdGradients {
  Matrix<S> dA;  ///< [r × in]
  Vector<S> dE;  ///< [r]
  Matrix<S> dB;  ///< [out × r]
  Matrix<S> dX;  ///< [T × in]
};

/// What SvdAdapter::forward_train keeps for backward.
template <class S>
struct SvdForwardCache {
  Matrix<S> x;     ///< input after dropout [T × in]
  Matrix<S> xa;    ///< x·Aᵀ [T × r], unscaled and without E
  Matrix<S> keep;  ///< dropout multipliers; empty without dropout
};

/// The AdaLoRA adapter of one linear layer. Unlike LowRankAdapter, the rank is
/// budgeted at run time by zeroing entries of E (RankAllocator), and r may be 0.
///
///   lora::SvdAdapter<float> ad(/*in=*/64, /*out=*/64, /*r=*/6, /*alpha=*/8);
///   lora::Generator gen(0);
///   ad.reset_parameters(gen);            // PEFT: E = 0, A, B ~ N(0, 0.02²)
///   auto y = ad.apply(W, X);             // X·Wᵀ + c·(X·(A∘E)ᵀ)·Bᵀ
template <class Scalar>
class SvdAdapter {
  static_assert(std::is_floating_point_v<Scalar>, "SvdAdapter: Scalar must be float or double");

 public:
  using scalar_type = Scalar;
  using matrix = Matrix<Scalar>;
  using vector = Vector<Scalar>;
  using input = MatrixRef<Scalar>;

  /// A, E, B zero; ranknum = r (PEFT keeps ranknum at the initial rank while
  /// training and copies it when a pruned adapter is resized).
  SvdAdapter(Index in_features, Index out_features, Index rank, double alpha, AdapterOptions opts = {})
      : in_(in_features), out_(out_features), alpha_(alpha), ranknum_(static_cast<double>(rank)),
        opts_(std::move(opts)) {
    AdapterSpec{in_, out_, rank, alpha, opts_}.validate(/*min_rank=*/0, /*bounded=*/false);
    if (opts_.fan_in_fan_out) detail::fail("{}fan_in_fan_out is not supported by SvdAdapter", who());
    A_ = matrix::Zero(rank, in_);
    E_ = vector::Zero(rank);
    B_ = matrix::Zero(out_, rank);
  }

  /// Adopts A [r × in], E [r] (or [r × 1]) and B [out × r].
  static SvdAdapter from_factors(matrix A, const Eigen::Ref<const matrix>& E, matrix B, double alpha,
                                 AdapterOptions opts = {}) {
    SvdAdapter ad(A.cols(), B.rows(), A.rows(), alpha, std::move(opts));
    if (E.size() != A.rows() || (E.rows() != 1 && E.cols() != 1))
      detail::fail("{}lora_E has shape [{} x {}], expected [{} x 1]", ad.who(), E.rows(), E.cols(), A.rows());
    if (B.cols() != A.rows())
      detail::fail("{}lora_B has {} columns and lora_A has {} rows; both must equal the rank r", ad.who(), B.cols(),
                   A.rows());
    ad.A_ = std::move(A);
    ad.B_ = std::move(B);
    for (Index i = 0; i < ad.E_.size(); ++i) ad.E_(i) = E(E.rows() == 1 ? 0 : i, E.rows() == 1 ? i : 0);
    return ad;
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index rank() const { return A_.rows(); }
  double alpha() const { return alpha_; }
  double dropout() const { return opts_.dropout; }
  const std::string& name() const { return opts_.name; }
  /// Shape (at the current rank), alpha and options, with the checks shared by every adapter class.
  AdapterSpec spec() const { return {in_, out_, rank(), alpha_, opts_}; }

  /// PEFT's scaling: lora_alpha if positive, else r (the initial rank).
  double scaling() const { return alpha_ > 0 ? alpha_ : ranknum_; }
  /// The rank the delta is divided by; PEFT adds 1e-5 in the parameter's dtype.
  double ranknum() const { return ranknum_; }
  void set_ranknum(double r) { ranknum_ = r; }
  /// c = scaling / (ranknum + 1e-5), the factor in front of B·diag(E)·A, in Scalar as PEFT computes it.
  Scalar factor() const {
    const Scalar rn = static_cast<Scalar>(ranknum_) + static_cast<Scalar>(1e-5);
    return static_cast<Scalar>(scaling()) / rn;
  }

  const matrix& A() const { return A_; }
  const vector& E() const { return E_; }
  const matrix& B() const { return B_; }
  /// Mutable views for optimisers; the shape must not change.
  Eigen::Ref<matrix> A() { return A_; }
  Eigen::Ref<vector> E() { return E_; }
  Eigen::Ref<matrix> B() { return B_; }

  void set_A(const input& A) {
    detail::check_shape(who(), "lora_A", A.rows(), A.cols(), rank(), in_);
    A_ = A;
  }
  void set_E(const Eigen::Ref<const vector>& E) {
    detail::check_shape(who(), "lora_E", E.rows(), 1, rank(), 1);
    E_ = E;
  }
  void set_B(const input& B) {
    detail::check_shape(who(), "lora_B", B.rows(), B.cols(), out_, rank());
    B_ = B;
  }

  /// PEFT's reset_lora_parameters: E = 0, A and B ~ N(0, 0.02²) (drawn from gen, A first).
  void reset_parameters(Generator& gen) {
    E_.setZero();
    for (Index i = 0; i < A_.size(); ++i) A_.data()[i] = static_cast<Scalar>(gen.normal(0.0, 0.02));
    for (Index i = 0; i < B_.size(); ++i) B_.data()[i] = static_cast<Scalar>(gen.normal(0.0, 0.02));
  }

  /// (in + out + 1)·r.
  Index trainable_parameters() const { return (in_ + out_ + 1) * rank(); }

  /// Triplet i is active when E_i ≠ 0 (masking zeroes E_i).
  std::vector<bool> active() const {
    std::vector<bool> k(static_cast<std::size_t>(rank()));
    for (Index i = 0; i < rank(); ++i) k[static_cast<std::size_t>(i)] = E_(i) != Scalar(0);
    return k;
  }
  /// Number of nonzero singular values.
  Index active_rank() const { return (E_.array() != Scalar(0)).count(); }

  /// Zeroes E_i wherever keep[i] is false (PEFT's masked_fill_ of lora_E).
  void mask(const std::vector<bool>& keep) {
    check_keep(keep);
    for (Index i = 0; i < rank(); ++i)
      if (!keep[static_cast<std::size_t>(i)]) E_(i) = Scalar(0);
  }

  /// ΔW = c·B·diag(E)·A, [out × in], as PEFT's get_delta_weight.
  matrix delta_weight() const {
    matrix AE = E_.asDiagonal() * A_;
    matrix d = B_ * AE;
    d *= factor();
    return d;
  }

  /// c·(X·(A∘E)ᵀ)·Bᵀ for tokens X [T × in] (evaluation mode).
  matrix forward(const input& X) const {
    detail::check_cols(who(), "input X", X.cols(), in_);
    matrix h = X * A_.transpose();
    h = h * E_.asDiagonal();
    matrix y = h * B_.transpose();
    y *= factor();
    return y;
  }

  /// X·Wᵀ + forward(X): the adapted layer, unmerged, without bias.
  matrix apply(const input& W, const input& X) const {
    detail::check_shape(who(), "base weight W", W.rows(), W.cols(), out_, in_);
    matrix y = forward(X);
    y.noalias() += X * W.transpose();
    return y;
  }

  /// Training-mode forward: dropout on X (drawn from gen), fills cache for backward.
  matrix forward_train(const input& X, Generator& gen, SvdForwardCache<Scalar>& cache) const {
    detail::check_cols(who(), "input X", X.cols(), in_);
    cache.x = X;
    if (opts_.dropout > 0.0) {
      const Scalar kept = static_cast<Scalar>(1.0 / (1.0 - opts_.dropout));
      cache.keep.resize(X.rows(), in_);
      for (Index i = 0; i < cache.keep.size(); ++i)
        cache.keep.data()[i] = gen.uniform() < opts_.dropout ? Scalar(0) : kept;
      cache.x.array() *= cache.keep.array();
    } else {
      cache.keep.resize(0, 0);
    }
    cache.xa.noalias() = cache.x * A_.transpose();
    matrix y = (cache.xa * E_.asDiagonal()) * B_.transpose();
    y *= factor();
    return y;
  }

  /// Gradients of forward given dY = ∂L/∂Y, with H = X·Aᵀ and G = dY·B:
  /// dB = c·dYᵀ·(H·diag E), dE_i = c·Σ_t G_ti·H_ti, dA = c·diag(E)·Gᵀ·X, dX = c·G·diag(E)·A.
  SvdGradients<Scalar> backward(const input& X, const Eigen::Ref<const matrix>& dY) const {
    detail::check_cols(who(), "input X", X.cols(), in_);
    SvdForwardCache<Scalar> cache;
    cache.x = X;
    cache.xa.noalias() = cache.x * A_.transpose();
    return backward(cache, dY);
  }

  /// Gradients after forward_train (dropout mask from the cache).
  SvdGradients<Scalar> backward(const SvdForwardCache<Scalar>& cache, const Eigen::Ref<const matrix>& dY) const {
    detail::check_shape(who(), "dY", dY.rows(), dY.cols(), cache.x.rows(), out_);
    const Scalar c = factor();
    SvdGradients<Scalar> g;
    matrix G = dY * B_;  // [T × r]
    matrix HE = cache.xa * E_.asDiagonal();
    g.dB.noalias() = c * (dY.transpose() * HE);
    g.dE = c * (G.array() * cache.xa.array()).colwise().sum().transpose();
    matrix GE = G * E_.asDiagonal();
    GE *= c;
    g.dA.noalias() = GE.transpose() * cache.x;
    g.dX.noalias() = GE * A_;
    if (cache.keep.size() != 0) g.dX.array() *= cache.keep.array();
    return g;
  }

  /// Gradients of apply(W, X) (W frozen): as backward(X, dY), plus dY·W in dX.
  SvdGradients<Scalar> backward(const input& W, const input& X, const Eigen::Ref<const matrix>& dY) const {
    detail::check_shape(who(), "base weight W", W.rows(), W.cols(), out_, in_);
    SvdGradients<Scalar> g = backward(X, dY);
    g.dX.noalias() += dY * W;
    return g;
  }

  /// W ← W + ΔW / W ← W − ΔW.
  void merge(Eigen::Ref<matrix> W) const {
    detail::check_shape(who(), "base weight W", W.rows(), W.cols(), out_, in_);
    W += delta_weight();
  }
  void unmerge(Eigen::Ref<matrix> W) const {
    detail::check_shape(who(), "base weight W", W.rows(), W.cols(), out_, in_);
    W -= delta_weight();
  }

  /// The adapter restricted to the kept triplets, as PEFT's resize_modules_by_rank_pattern
  /// does after training: rank = Σ keep, ranknum (and so ΔW) unchanged.
  SvdAdapter pruned(const std::vector<bool>& keep) const {
    check_keep(keep);
    Index r = 0;
    for (bool k : keep) r += k ? 1 : 0;
    SvdAdapter out(in_, out_, r, alpha_, opts_);
    out.ranknum_ = ranknum_;
    Index j = 0;
    for (Index i = 0; i < rank(); ++i) {
      if (!keep[static_cast<std::size_t>(i)]) continue;
      out.A_.row(j) = A_.row(i);
      out.E_(j) = E_(i);
      out.B_.col(j) = B_.col(i);
      ++j;
    }
    return out;
  }
  /// pruned(active()): drops the triplets whose singular value is zero.
  SvdAdapter pruned() const { return pruned(active()); }

  /// A plain LoRA of the kept triplets with the same ΔW: A' = diag(E_k)·A_k, B' = B_k and
  /// alpha' = c·r' so that alpha'/r' = c. Empty when no triplet is kept.
  std::optional<LowRankAdapter<Scalar>> to_lora(const std::vector<bool>& keep) const {
    const SvdAdapter p = pruned(keep);
    if (p.rank() == 0) return std::nullopt;
    matrix A = p.E_.asDiagonal() * p.A_;
    AdapterOptions o = opts_;
    const double alpha = static_cast<double>(factor()) * static_cast<double>(p.rank());
    return LowRankAdapter<Scalar>::from_factors(std::move(A), p.B_, alpha, std::move(o));
  }
  /// to_lora(active()).
  std::optional<LowRankAdapter<Scalar>> to_lora() const { return to_lora(active()); }

 private:
  std::string who() const { return spec().who(); }
  void check_keep(const std::vector<bool>& keep) const {
    if (static_cast<Index>(keep.size()) != rank())
      detail::fail("{}rank pattern has {} entries, expected one per singular value ({})", who(), keep.size(), rank());
  }

  Index in_, out_;
  double alpha_;
  double ranknum_;
  AdapterOptions opts_;
  matrix A_;
  vector E_;
  matrix B_;
};

}  // namespace lora
