#pragma once
// AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW computes it, and gradient-norm
// clipping as torch.nn.utils.clip_grad_norm_, for adapter parameters held in Eigen matrices.

#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Core>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace lora {

/// torch.optim.AdamW's defaults.
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

/// AdamW over registered parameters. Each parameter has its own learning rate and weight
/// decay (torch's param groups), its own moments and step count t. One update with gradient g
/// and η = lr · lr_factor():
///   θ ← θ·(1 − η·λ);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
///   θ ← θ − (η / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε).
///
///   lora::AdamW<float> opt({.lr = 1e-3});
///   auto a = opt.add(adapter.A()), b = opt.add(adapter.B(), /*lr=*/16e-3);
///   opt.update(a, grads.dA);  opt.update(b, grads.dB);
template <class S>
class AdamW {
 public:
  explicit AdamW(AdamWOptions opts = {}) : opts_(opts) {
    if (!(opts.lr >= 0)) detail::fail("AdamW: lr must be >= 0, got {}", opts.lr);
    if (!(opts.beta1 >= 0 && opts.beta1 < 1)) detail::fail("AdamW: beta1 must be in [0, 1), got {}", opts.beta1);
    if (!(opts.beta2 >= 0 && opts.beta2 < 1)) detail::fail("AdamW: beta2 must be in [0, 1), got {}", opts.beta2);
    if (!(opts.eps >= 0)) detail::fail("AdamW: eps must be >= 0, got {}", opts.eps);
    if (!(opts.weight_decay >= 0)) detail::fail("AdamW: weight_decay must be >= 0, got {}", opts.weight_decay);
  }

  const AdamWOptions& options() const { return opts_; }

  /// Registers a parameter stored contiguously (a Matrix<S>, a Vector<S>, or a Ref to one);
  /// its storage must outlive the optimiser and keep its shape. lr and weight decay default to
  /// the options'. Returns the parameter's index.
  template <class Derived>
  std::size_t add(Eigen::PlainObjectBase<Derived>& p, std::optional<double> lr = {},
                  std::optional<double> weight_decay = {}, std::string name = {}) {
    static_assert(std::is_same_v<typename Derived::Scalar, S>, "AdamW<S>::add: parameter scalar must be S");
    static_assert(Derived::IsRowMajor || Derived::IsVectorAtCompileTime, "AdamW::add: use lora::Matrix (row-major)");
    return add_raw(p.data(), p.rows(), p.cols(), lr, weight_decay, std::move(name));
  }
  /// Same, for the mutable views adapters hand out (`adapter.A()`).
  template <class M>
  std::size_t add(Eigen::Ref<M> p, std::optional<double> lr = {}, std::optional<double> weight_decay = {},
                  std::string name = {}) {
    static_assert(std::is_same_v<typename M::Scalar, S>, "AdamW<S>::add: parameter scalar must be S");
    static_assert(M::IsRowMajor || M::IsVectorAtCompileTime, "AdamW::add: use lora::Matrix (row-major)");
    bool contiguous = p.innerStride() == 1;
    if constexpr (!M::IsVectorAtCompileTime)
      contiguous = contiguous && p.outerStride() == (M::IsRowMajor ? p.cols() : p.rows());
    if (!contiguous && p.size() > 1)
      detail::fail("AdamW: parameter '{}' is not stored contiguously", name);
    return add_raw(p.data(), p.rows(), p.cols(), lr, weight_decay, std::move(name));
  }

  std::size_t size() const { return params_.size(); }
  /// Steps taken by parameter i.
  long steps(std::size_t i) const { return at(i).t; }
  double lr(std::size_t i) const { return at(i).lr; }
  void set_lr(std::size_t i, double lr) { at(i).lr = lr; }
  /// A multiplier applied to every parameter's lr (what a schedule sets, as torch's LambdaLR).
  double lr_factor() const { return factor_; }
  void set_lr_factor(double f) {
    if (!(f >= 0) || !std::isfinite(f)) detail::fail("AdamW: lr factor must be finite and >= 0, got {}", f);
    factor_ = f;
  }

  /// One AdamW update of parameter i with gradient g (same shape as the parameter; a
  /// vector parameter accepts an [n × 1] or [1 × n] gradient).
  template <class Derived>
  void update(std::size_t i, const Eigen::MatrixBase<Derived>& g) {
    Param& p = at(i);
    const bool same = (g.rows() == p.rows && g.cols() == p.cols) ||
                      ((p.rows == 1 || p.cols == 1) && (g.rows() == 1 || g.cols() == 1) && g.size() == p.rows * p.cols);
    if (!same)
      detail::fail("AdamW: gradient for parameter '{}' has shape [{} x {}], expected [{} x {}]", p.label(i), g.rows(),
                   g.cols(), p.rows, p.cols);
    const Matrix<S> gr = g.template cast<S>();  // row-major, as the parameter
    ++p.t;
    const double lr = p.lr * factor_;
    const double b1 = opts_.beta1, b2 = opts_.beta2;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(p.t));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(p.t));
    const double step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2);
    const double decay = 1.0 - lr * p.weight_decay;
    for (std::size_t k = 0; k < p.m.size(); ++k) {
      const double gk = static_cast<double>(gr.data()[k]);
      double theta = static_cast<double>(p.data[k]) * decay;
      const double m = static_cast<double>(p.m[k]) + (gk - static_cast<double>(p.m[k])) * (1.0 - b1);
      const double v = static_cast<double>(p.v[k]) * b2 + (1.0 - b2) * gk * gk;
      p.m[k] = static_cast<S>(m);
      p.v[k] = static_cast<S>(v);
      const double denom = std::sqrt(static_cast<double>(p.v[k])) / bc2_sqrt + opts_.eps;
      theta -= step_size * static_cast<double>(p.m[k]) / denom;
      p.data[k] = static_cast<S>(theta);
    }
  }

  /// Forgets the moments and step counts (parameters keep their values).
  void reset_state() {
    for (auto& p : params_) {
      std::fill(p.m.begin(), p.m.end(), S(0));
      std::fill(p.v.begin(), p.v.end(), S(0));
      p.t = 0;
    }
  }

 private:
  struct Param {
    S* data;
    Index rows, cols;
    double lr, weight_decay;
    std::string name;
    std::vector<S> m, v;
    long t = 0;
    std::string label(std::size_t i) const { return name.empty() ? std::to_string(i) : name; }
  };
  Param& at(std::size_t i) {
    if (i >= params_.size()) detail::fail("AdamW: no parameter {} (have {})", i, params_.size());
    return params_[i];
  }
  const Param& at(std::size_t i) const {
    if (i >= params_.size()) detail::fail("AdamW: no parameter {} (have {})", i, params_.size());
    return params_[i];
  }
  std::size_t add_raw(S* data, Index rows, Index cols, std::optional<double> lr, std::optional<double> wd,
                      std::string name) {
    const double l = lr.value_or(opts_.lr), w = wd.value_or(opts_.weight_decay);
    if (!(l >= 0)) detail::fail("AdamW: lr of parameter '{}' must be >= 0, got {}", name, l);
    if (!(w >= 0)) detail::fail("AdamW: weight_decay of parameter '{}' must be >= 0, got {}", name, w);
    const auto n = static_cast<std::size_t>(rows * cols);
    params_.push_back(Param{data, rows, cols, l, w, std::move(name), std::vector<S>(n, S(0)), std::vector<S>(n, S(0))});
    return params_.size() - 1;
  }

  AdamWOptions opts_;
  double factor_ = 1.0;
  std::vector<Param> params_;
};

namespace detail {
template <class T>
double sq_norm(const T& g) {
  return g.template cast<double>().squaredNorm();
}
template <class T>
void scale_by(T& g, double c) {
  g *= static_cast<typename T::Scalar>(c);
}
// The trainable parts of Gradients / SvdGradients (dX is an input gradient, not clipped).
template <class G>
concept HasAdapterGrads = requires(G g) {
  g.dA;
  g.dB;
};
template <class G>
double grads_sq_norm(const G& g) {
  double s = sq_norm(g.dA) + sq_norm(g.dB);
  if constexpr (requires { g.dE; }) s += sq_norm(g.dE);
  return s;
}
template <class G>
void grads_scale(G& g, double c) {
  scale_by(g.dA, c);
  scale_by(g.dB, c);
  if constexpr (requires { g.dE; }) scale_by(g.dE, c);
}
}  // namespace detail

/// torch.nn.utils.clip_grad_norm_: N = √(Σ‖g‖²) over all given gradients; if N > max_norm
/// every gradient is scaled by max_norm / (N + 1e-6). Returns N (before clipping).
///
///   double n = lora::clip_grad_norm(1.0, grads.dA, grads.dB);
template <class... Ms>
  requires(sizeof...(Ms) > 0 && (!detail::HasAdapterGrads<Ms> && ...))
double clip_grad_norm(double max_norm, Ms&... grads) {
  const double total = std::sqrt((detail::sq_norm(grads) + ...));
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) (detail::scale_by(grads, coef), ...);
  return total;
}

/// The same over the dA, dB (and dE) of a list of adapter gradients (Gradients or SvdGradients).
template <detail::HasAdapterGrads G>
double clip_grad_norm(double max_norm, std::span<G> grads) {
  double s = 0;
  for (const auto& g : grads) s += detail::grads_sq_norm(g);
  const double total = std::sqrt(s);
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0)
    for (auto& g : grads) detail::grads_scale(g, coef);
  return total;
}
template <detail::HasAdapterGrads G>
double clip_grad_norm(double max_norm, std::vector<G>& grads) {
  return clip_grad_norm(max_norm, std::span<G>(grads));
}

}  // namespace lora
