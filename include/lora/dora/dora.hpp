#pragma once
// DoRA (Liu et al. 2024, PEFT's use_dora): a LoRA adapter plus a magnitude vector m [out].
//
//   V = W + s·B·A                 (the adapted weight, [out × in])
//   n = ‖V‖_row                   (one L2 norm per output row)
//   Y = (X·Vᵀ) ⊙ (m ⊘ n)          = (m/n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ), scaled column by column
//
// As in the paper and PEFT, n is treated as a constant in backward (PEFT detaches it).
//
//   lora::DoraAdapter<float> dora(lora::LowRankAdapter<float>::from_factors(A, B, alpha), m);
//   auto Y = dora.apply(W, X);
//   auto g = dora.backward(W, X, dY);   // g.dA, g.dB, g.dm, g.dX
//   lora::DoraForwardCache<float> cache;  // training mode: PEFT's DoRA with lora_dropout
//   auto Yt = dora.apply_train(W, X, gen, cache);
//   auto gt = dora.backward(W, cache, dY);
//   auto n = dora.merge(W);             // W ← (m/n) ⊙ (W + ΔW); keep n to unmerge
//   dora.unmerge(W, n);                 // W ← W ⊘ (m/n) − ΔW

#include <lora/core/adapter.hpp>
#include <lora/core/merge.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Core>
#include <cmath>
#include <utility>

namespace lora {

/// Gradients of a scalar loss through a DoRA layer, given dY = ∂L/∂Y.
template <class C>
struct DoraGradients {
  Matrix<C> dA;  ///< [r × in]
  Matrix<C> dB;  ///< [out × r]
  Vector<C> dm;  ///< [out]
  Matrix<C> dX;  ///< [T × in], including the path through the frozen W
};

/// What DoraAdapter::apply_train remembers for backward.
template <class C>
struct DoraForwardCache {
  ForwardCache<C> lora;  ///< the LoRA path's: drop(X), drop(X)·Aᵀ, the dropout multipliers
  Matrix<C> xv;          ///< drop(X)·Vᵀ [T × out], V = W + s·B·A (dm's factor)
  Vector<C> norm;        ///< n = ‖V‖_row [out], held constant in backward
};

template <class Scalar, class Device = cpu, ScalingPolicy Scaling = standard_scaling>
class DoraAdapter;

/// DoRA on the CPU. W may be stored [in × out] when the LoRA adapter has fan_in_fan_out;
/// the norms are always over the input dimension (per output feature).
template <class Scalar, ScalingPolicy Scaling>
class DoraAdapter<Scalar, cpu, Scaling> {
 public:
  using lora_type = LowRankAdapter<Scalar, cpu, Scaling>;
  using scalar_type = Scalar;
  using device_type = cpu;
  using scaling_policy = Scaling;
  using compute_scalar = compute_t<Scalar>;
  using matrix = Matrix<Scalar>;
  using cmatrix = Matrix<compute_scalar>;
  using cvector = Vector<compute_scalar>;
  using input = MatrixRef<Scalar>;

  /// Adopts a LoRA adapter and a magnitude m [out].
  DoraAdapter(lora_type lora, cvector magnitude) : lora_(std::move(lora)), m_(std::move(magnitude)) {
    if (m_.size() != lora_.out_features())
      detail::fail("{}DoRA magnitude has {} elements, expected out_features = {}", who(), m_.size(),
                   lora_.out_features());
  }
  /// PEFT's initialisation: m = ‖W + s·B·A‖_row, so the layer starts equal to plain LoRA.
  static DoraAdapter from_weight(lora_type lora, const input& W) {
    const Index out = lora.out_features();
    DoraAdapter d(std::move(lora), cvector::Ones(out));
    d.m_ = d.weight_norm(W);
    return d;
  }

  /// A copy: the CPU side of the device-generic `DoraAdapter<S, D>::from_host(host)`.
  static DoraAdapter from_host(const DoraAdapter& host) { return host; }
  /// A copy in host memory, as `DoraAdapter<S, cuda>::to_host()` gives.
  DoraAdapter to_host() const { return *this; }

  const lora_type& lora() const { return lora_; }
  lora_type& lora() { return lora_; }
  const cvector& magnitude() const { return m_; }
  Eigen::Ref<cvector> magnitude() { return m_; }
  Index in_features() const { return lora_.in_features(); }
  Index out_features() const { return lora_.out_features(); }
  /// (in + out)·r + out.
  Index trainable_parameters() const { return lora_.trainable_parameters() + lora_.out_features(); }

  /// V = W + s·B·A in [out × in] orientation (W transposed first with fan_in_fan_out).
  cmatrix adapted_weight(const input& W) const {
    check_weight(W);
    cmatrix V = oriented(W);
    low_rank_update<compute_scalar>(V, Bc(), Ac(), static_cast<compute_scalar>(lora_.scaling()));
    return V;
  }
  /// n = ‖W + s·B·A‖_row [out], a few rows of W + s·B·A at a time (low_rank_row_norms: the
  /// rows a merge forms, never the whole matrix).
  cvector weight_norm(const input& W) const {
    check_weight(W);
    return weight_norm_and(W, [](Index, Index, const cmatrix&) {});
  }

  /// Y = (m ⊘ n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) for tokens X [T × in]; no bias, no dropout.
  /// Up to few_tokens tokens, X·Wᵀ is formed from the rows of W the norm pass holds (one read of
  /// W per call).
  cmatrix apply(const input& W, const input& X) const {
    check_weight(W);
    check_input(X);
    cmatrix Y;
    cvector n;
    if (X.rows() <= lora_type::few_tokens) {
      const cmatrix Xc = X.template cast<compute_scalar>();
      Y.resize(X.rows(), lora_.out_features());
      n = weight_norm_and(W, [&](Index i0, Index k, const cmatrix& V) {  // V: rows i0 … of W (oriented)
        Y.middleCols(i0, k).noalias() = Xc * V.topRows(k).transpose();
      });
      Y += lora_.forward(X);
    } else {
      n = weight_norm(W);
      Y = base_plus_lora(W, X);
    }
    Y *= m_.cwiseQuotient(n).asDiagonal();
    return Y;
  }

  /// Gradients of apply(W, X) with n held constant: with c = m ⊘ n and G = dY·diag(c),
  /// dX = G·V, dA = s·(G·B)ᵀ·X, dB = s·Gᵀ·(X·Aᵀ), dm = colsum(dY ⊙ (X·Vᵀ)) ⊘ n
  /// (backward(W, cache, dY) of a cache without dropout: V is never formed).
  DoraGradients<compute_scalar> backward(const input& W, const input& X, const Eigen::Ref<const cmatrix>& dY) const {
    check_input(X);
    DoraForwardCache<compute_scalar> cache;
    cache.norm = weight_norm(W);
    cache.lora.x = X.template cast<compute_scalar>();
    cache.lora.xa.noalias() = cache.lora.x * Ac().transpose();
    cache.xv.noalias() = (static_cast<compute_scalar>(lora_.scaling()) * cache.lora.xa) * Bc().transpose();
    add_times_weight(W, cache.lora.x, cache.xv);  // X·Vᵀ = X·Wᵀ + s·(X·Aᵀ)·Bᵀ
    return backward(W, cache, dY);
  }

  /// Training mode, PEFT's DoRA forward with lora_dropout (the adapter's dropout() = p): X̃ =
  /// drop(X) (multipliers 0 or 1/(1 − p), drawn from `gen` as LowRankAdapter::forward_train
  /// draws them), c = m ⊘ n, and
  ///   Y = X·Wᵀ + (c − 1) ⊙ (X̃·Wᵀ) + c ⊙ s·(X̃·Aᵀ)·Bᵀ
  /// (the base layer on X itself, the DoRA term on X̃); with p = 0, apply(W, X). Fills `cache`.
  cmatrix apply_train(const input& W, const input& X, Generator& gen, DoraForwardCache<compute_scalar>& cache) const {
    cache.norm = weight_norm(W);
    const cvector c = m_.cwiseQuotient(cache.norm);
    const cmatrix lo = lora_.forward_train(X, gen, cache.lora);  // s·(X̃·Aᵀ)·Bᵀ
    const Index T = X.rows(), out = lora_.out_features();
    cmatrix xw = cmatrix::Zero(T, out);
    add_times_weight(W, cache.lora.x, xw);  // X̃·Wᵀ
    cache.xv = xw + lo;
    if (cache.lora.keep.size() == 0) return cache.xv * c.asDiagonal();
    cmatrix Y = cmatrix::Zero(T, out);
    add_times_weight(W, X.template cast<compute_scalar>(), Y);
    Y.noalias() += xw * (c.array() - compute_scalar(1)).matrix().asDiagonal();
    Y.noalias() += lo * c.asDiagonal();
    return Y;
  }

  /// Gradients of apply_train (dropout and n from `cache`; m, A, B as they were there; W frozen).
  /// With G = dY·diag(c) and K the dropout multipliers: dA = s·(G·B)ᵀ·X̃, dB = s·Gᵀ·(X̃·Aᵀ),
  /// dm = colsum(dY ⊙ (X̃·Vᵀ)) ⊘ n, dX = dY·W + K ⊙ ((G − dY)·W + s·(G·B)·A) (= G·V without
  /// dropout).
  DoraGradients<compute_scalar> backward(const input& W, const DoraForwardCache<compute_scalar>& cache,
                                         const Eigen::Ref<const cmatrix>& dY) const {
    check_weight(W);
    lora_.spec().check_output_grad(dY.rows(), dY.cols(), cache.lora.x.rows());
    if (cache.norm.size() != lora_.out_features() || cache.xv.rows() != dY.rows() || cache.xv.cols() != dY.cols())
      detail::fail("{}DoRA backward: the cache holds {} norms and drop(X)·Vᵀ [{} × {}], expected {} and [{} × {}] "
                   "(pass the cache apply_train filled)",
                   who(), cache.norm.size(), cache.xv.rows(), cache.xv.cols(), lora_.out_features(), dY.rows(),
                   dY.cols());
    const cvector c = m_.cwiseQuotient(cache.norm);
    const cmatrix G = dY * c.asDiagonal();
    Gradients<compute_scalar> lg = lora_.backward(cache.lora, G);  // dX: K ⊙ s·(G·B)·A
    DoraGradients<compute_scalar> g;
    g.dA = std::move(lg.dA);
    g.dB = std::move(lg.dB);
    g.dm = (dY.array() * cache.xv.array()).colwise().sum().transpose().matrix().cwiseQuotient(cache.norm);
    g.dX = std::move(lg.dX);
    if (cache.lora.keep.size() == 0) {
      add_through_weight(W, G, g.dX);
    } else {
      cmatrix gw = cmatrix::Zero(dY.rows(), lora_.in_features());
      add_through_weight(W, G - dY, gw);  // (G − dY)·W
      g.dX.array() += cache.lora.keep.array() * gw.array();
      add_through_weight(W, dY, g.dX);
    }
    return g;
  }

  /// W' = (m ⊘ n) ⊙ (W + ΔW) row by row (column by column with fan_in_fan_out), PEFT's
  /// DoRA merge; returns n, which unmerge needs (it cannot be recovered from W').
  cvector merge(Eigen::Ref<matrix> W) const {
    cmatrix V = adapted_weight(W);
    cvector n(V.rows());
    for (Index i = 0; i < V.rows(); ++i) n(i) = V.row(i).norm();
    dora_rescale_rows<compute_scalar>(V, m_.data());
    store(W, V);
    return n;
  }
  /// W ← W' ⊘ (m ⊘ n) − ΔW with the n returned by merge.
  void unmerge(Eigen::Ref<matrix> W, const cvector& n) const {
    check_weight(W);
    if (n.size() != lora_.out_features())
      detail::fail("{}DoRA unmerge: weight norm has {} elements, expected {}", who(), n.size(), lora_.out_features());
    cmatrix V = oriented(W);
    dora_unscale_rows<compute_scalar>(V, n.data(), m_.data());
    low_rank_update<compute_scalar>(V, Bc(), Ac(), -static_cast<compute_scalar>(lora_.scaling()));
    store(W, V);
  }
  /// The merged weight without modifying W.
  cmatrix merged_weight(const input& W) const {
    cmatrix V = adapted_weight(W);
    dora_rescale_rows<compute_scalar>(V, m_.data());
    if (lora_.fan_in_fan_out()) return V.transpose();
    return V;
  }

 private:
  std::string who() const { return lora_.spec().who(); }
  void check_weight(const input& W) const { lora_.spec().check_weight(W.rows(), W.cols()); }
  void check_input(const input& X) const { lora_.spec().check_input(X.cols()); }
  cmatrix oriented(const input& W) const {
    if (lora_.fan_in_fan_out()) return W.template cast<compute_scalar>().transpose();
    return W.template cast<compute_scalar>();
  }
  /// weight_norm, with `also(i0, k, V)` called on each block of rows i0 … i0 + k − 1 of W (in
  /// [out × in] orientation, compute precision; V's top k rows) before the low-rank update.
  /// Blocks run on several threads: `also` writes only what belongs to its rows.
  template <class Also>
  cvector weight_norm_and(const input& W, Also also) const {
    const bool fifo = lora_.fan_in_fan_out();
    return low_rank_row_norms<compute_scalar>(
        lora_.out_features(), lora_.in_features(), Bc(), Ac(), static_cast<compute_scalar>(lora_.scaling()),
        [&](Index i0, Index k, cmatrix& V) {
          if (fifo)
            V.topRows(k) = W.middleCols(i0, k).transpose().template cast<compute_scalar>();
          else
            V.topRows(k) = W.middleRows(i0, k).template cast<compute_scalar>();
          also(i0, k, std::as_const(V));
        });
  }
  cmatrix base_plus_lora(const input& W, const input& X) const {
    cmatrix Y = lora_.forward(X);
    add_times_weight(W, X.template cast<compute_scalar>(), Y);
    return Y;
  }
  /// Y += Xc·Wᵀ [T × out] in W's orientation (Xc·W with fan_in_fan_out).
  void add_times_weight(const input& W, const Eigen::Ref<const cmatrix>& Xc, cmatrix& Y) const {
    if (lora_.fan_in_fan_out())
      Y.noalias() += Xc * W.template cast<compute_scalar>();
    else
      Y.noalias() += Xc * W.template cast<compute_scalar>().transpose();
  }
  /// dX += M·W [T × in] for M [T × out] in W's orientation (M·Wᵀ with fan_in_fan_out).
  void add_through_weight(const input& W, const Eigen::Ref<const cmatrix>& M, cmatrix& dX) const {
    if (lora_.fan_in_fan_out())
      dX.noalias() += M * W.template cast<compute_scalar>().transpose();
    else
      dX.noalias() += M * W.template cast<compute_scalar>();
  }
  void store(Eigen::Ref<matrix> W, const cmatrix& V) const {
    if (lora_.fan_in_fan_out())
      W = V.transpose().template cast<Scalar>();
    else
      W = V.template cast<Scalar>();
  }
  cmatrix Ac() const { return lora_.A().template cast<compute_scalar>(); }
  cmatrix Bc() const { return lora_.B().template cast<compute_scalar>(); }

  lora_type lora_;
  cvector m_;
};

}  // namespace lora
