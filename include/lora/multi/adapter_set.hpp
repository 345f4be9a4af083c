#pragma once
// Many adapters for one base layer, and batches whose tokens use different
// adapters (SGMV-style): the base GEMM runs once for the whole batch, each
// adapter's low-rank path runs once over its own segment of tokens.

#include <lora/core/adapter.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/spec.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace lora::quant {
template <class Device>
class Nf4Tensor;  // lora/quant/nf4_tensor.hpp: apply's NF4 base
}  // namespace lora::quant

namespace lora::multi {

namespace detail {

/// The checks an adapter set runs on an adapter before it loads it, for a base layer
/// [out × in]; `set` names the set in messages ("AdapterSet", "AdapterSet<cuda>"). `slots`
/// holds the loaded adapters (pointers with a `name`; empty ones null) and `replacing` the
/// id being replaced (-1 when adding). A backend that caps the rank below min(in, out)
/// passes its cap as `rank_limit`. Shape, rank and scaling are AdapterSpec's checks and
/// messages, prefixed with the set: "AdapterSet: adapter 'math': lora_A has shape …".
template <class Slots>
void check_set_adapter(std::string_view set, const std::string& name, const Slots& slots, int replacing, Index a_rows,
                       Index a_cols, Index b_rows, Index b_cols, double scaling, Index in, Index out,
                       Index rank_limit) {
  if (name.empty()) lora::detail::fail("{}: adapter names must not be empty", set);
  for (std::size_t i = 0; i < slots.size(); ++i)
    if (slots[i] && slots[i]->name == name && static_cast<int>(i) != replacing)
      lora::detail::fail("{}: adapter '{}' is already loaded as id {}", set, name, i);
  AdapterOptions opts;
  opts.name = name;
  const AdapterSpec spec{in, out, a_rows, 0.0, std::move(opts)};  // a set keeps s, not alpha
  try {
    spec.check_factor_shapes(a_rows, a_cols, b_rows, b_cols);
    spec.validate();
    if (a_rows > rank_limit)
      lora::detail::fail("{}rank r = {} exceeds the device limit {} (min(in, out) = {})", spec.who(), a_rows,
                         rank_limit, std::min(in, out));
    spec.check_scaling(scaling);
  } catch (const lora::error& e) {
    lora::detail::fail("{}: {}", set, e.what());
  }
}

/// A set keeps the base weight as [out × in]: fan_in_fan_out adapters are refused.
inline void check_set_orientation(std::string_view set, const std::string& name, bool fan_in_fan_out) {
  if (fan_in_fan_out)
    lora::detail::fail("{}: adapter '{}' is fan_in_fan_out; store the base weight as [out x in] and add a regular "
                       "adapter",
                       set, name);
}

}  // namespace detail

/// One adapter slot: its factors and its scaling, fixed at insertion.
template <class Scalar>
struct AdapterSlot {
  std::string name;
  Matrix<Scalar> A;  ///< [r × in]
  Matrix<Scalar> B;  ///< [out × r]
  double scaling = 1.0;
  Index rank() const { return A.rows(); }
};

struct Segments;

/// Adapters for one base layer [out × in], addressed by a stable integer id.
/// Adapters may differ in rank and scaling rule. Adding, replacing or removing
/// one leaves the others (and their ids) untouched, so an engine can hot-swap
/// while serving. Slots are held by shared pointer: gathering by id copies
/// nothing, and copying a set shares the factors.
///
///   lora::multi::AdapterSet<float> set(4096, 4096);
///   int a = set.add("math", adapter_a);          // any LowRankAdapter<float, cpu, *>
///   int b = set.add("code", A, B, /*scaling=*/2.0);
///   auto Y = lora::multi::batched_apply(set, W, X, ids);   // ids[t] ∈ {a, b, -1}
template <class Scalar = float, class Device = cpu>
class AdapterSet;

template <class Scalar>
class AdapterSet<Scalar, cpu> {
 public:
  using scalar_type = Scalar;
  using compute_scalar = compute_t<Scalar>;
  using device_type = cpu;
  using slot_type = AdapterSlot<Scalar>;

  AdapterSet(Index in_features, Index out_features) : in_(in_features), out_(out_features) {
    if (in_ < 1 || out_ < 1)
      lora::detail::fail("AdapterSet: in_features and out_features must be at least 1, got in = {}, out = {}", in_, out_);
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  /// Number of adapters loaded.
  std::size_t size() const {
    return static_cast<std::size_t>(std::count_if(slots_.begin(), slots_.end(), [](auto& s) { return s != nullptr; }));
  }
  /// One past the largest id ever handed out (ids are in [0, capacity())).
  int capacity() const { return static_cast<int>(slots_.size()); }
  bool contains(int id) const { return id >= 0 && id < capacity() && slots_[static_cast<std::size_t>(id)] != nullptr; }

  const slot_type& at(int id) const {
    if (!contains(id)) lora::detail::fail("AdapterSet: no adapter with id {} (loaded: {})", id, size());
    return *slots_[static_cast<std::size_t>(id)];
  }
  /// The id of the adapter called `name`, if loaded.
  std::optional<int> find(std::string_view name) const {
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i] && slots_[i]->name == name) return static_cast<int>(i);
    return std::nullopt;
  }

  /// Adds factors A [r × in], B [out × r] with scaling s; returns the new id
  /// (the lowest free one). Names must be unique.
  int add(std::string name, Matrix<Scalar> A, Matrix<Scalar> B, double scaling) {
    auto slot = make_slot(std::move(name), std::move(A), std::move(B), scaling, -1);
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (!slots_[i]) {
        slots_[i] = std::move(slot);
        return static_cast<int>(i);
      }
    slots_.push_back(std::move(slot));
    return capacity() - 1;
  }
  /// Adds factors at a chosen id (which must be free), so that several layers'
  /// sets can share one numbering of adapters.
  void insert(int id, std::string name, Matrix<Scalar> A, Matrix<Scalar> B, double scaling) {
    if (id < 0) lora::detail::fail("AdapterSet: cannot insert adapter '{}' at negative id {}", name, id);
    if (contains(id)) lora::detail::fail("AdapterSet: cannot insert adapter '{}' at id {}: '{}' is there", name, id, at(id).name);
    auto slot = make_slot(std::move(name), std::move(A), std::move(B), scaling, -1);
    if (id >= capacity()) slots_.resize(static_cast<std::size_t>(id) + 1);
    slots_[static_cast<std::size_t>(id)] = std::move(slot);
  }

  /// Adds a LowRankAdapter (any scaling policy; its scaling() is taken as it is now).
  template <class S, ScalingPolicy P>
  int add(std::string name, const LowRankAdapter<S, cpu, P>& ad) {
    check_orientation(name, ad);
    return add(std::move(name), ad.A().template cast<Scalar>(), ad.B().template cast<Scalar>(), ad.scaling());
  }

  /// Replaces adapter `id` in place (rank may change); other adapters are untouched.
  void replace(int id, std::string name, Matrix<Scalar> A, Matrix<Scalar> B, double scaling) {
    if (!contains(id)) lora::detail::fail("AdapterSet: cannot replace id {}: no such adapter", id);
    slots_[static_cast<std::size_t>(id)] = make_slot(std::move(name), std::move(A), std::move(B), scaling, id);
  }
  template <class S, ScalingPolicy P>
  void replace(int id, std::string name, const LowRankAdapter<S, cpu, P>& ad) {
    check_orientation(name, ad);
    replace(id, std::move(name), ad.A().template cast<Scalar>(), ad.B().template cast<Scalar>(), ad.scaling());
  }

  /// Unloads adapter `id`; its id may be reused by a later add.
  void remove(int id) {
    if (!contains(id)) lora::detail::fail("AdapterSet: cannot remove id {}: no such adapter", id);
    slots_[static_cast<std::size_t>(id)].reset();
  }

  /// Largest rank loaded (0 if empty).
  Index max_rank() const {
    Index r = 0;
    for (auto& s : slots_)
      if (s) r = std::max(r, s->rank());
    return r;
  }

  /// A copy (sharing the factors): the CPU side of the device-generic `AdapterSet<S, D>::from_host`.
  static AdapterSet from_host(const AdapterSet& host) { return host; }
  /// A copy in host memory (sharing the factors), as the CUDA set's to_host() gives.
  AdapterSet to_host() const { return *this; }

  /// Groups tokens by adapter id (−1: base only); see make_segments.
  Segments segments(std::span<const int> ids) const;
  /// The mixed-adapter layer X·Wᵀ + per-token adapter paths: batched_apply(*this, W, X, ids).
  Matrix<compute_scalar> apply(const MatrixRef<Scalar>& W, const MatrixRef<Scalar>& X, std::span<const int> ids) const;
  /// The same over an NF4 base (QLoRA serving, as AdapterSet<S, cuda>::apply(Nf4Tensor<cuda>, …)):
  /// X·dequant(Wq)ᵀ by quant::nf4_matmul (activations in float; include lora/quant/qlora.hpp or
  /// lora/lora.hpp, which this header leaves out for compile time) plus the per-token adapter paths.
  template <class Q>
    requires std::same_as<Q, quant::Nf4Tensor<cpu>>
  Matrix<compute_scalar> apply(const Q& Wq, const MatrixRef<Scalar>& X, std::span<const int> ids) const;
  /// The adapter paths alone: batched_forward(*this, X, ids).
  Matrix<compute_scalar> forward(const MatrixRef<Scalar>& X, std::span<const int> ids) const;

 private:
  template <class S, ScalingPolicy P>
  void check_orientation(const std::string& name, const LowRankAdapter<S, cpu, P>& ad) const {
    detail::check_set_orientation("AdapterSet", name, ad.fan_in_fan_out());
  }
  std::shared_ptr<const slot_type> make_slot(std::string name, Matrix<Scalar> A, Matrix<Scalar> B, double scaling,
                                       int replacing) const {
    detail::check_set_adapter("AdapterSet", name, slots_, replacing, A.rows(), A.cols(), B.rows(), B.cols(), scaling,
                              in_, out_, std::min(in_, out_));
    auto s = std::make_shared<slot_type>();
    s->name = std::move(name);
    s->A = std::move(A);
    s->B = std::move(B);
    s->scaling = scaling;
    return s;
  }

  Index in_, out_;
  std::vector<std::shared_ptr<const slot_type>> slots_;
};

/// Tokens grouped by adapter: `order` lists token indices sorted by adapter id
/// (stable), and segment k covers order[begin[k], begin[k+1]) with adapter ids[k].
struct Segments {
  std::vector<int> adapter;      ///< adapter id of each segment (never -1)
  std::vector<Index> begin;      ///< size adapter.size() + 1
  std::vector<Index> order;      ///< token indices, grouped
  bool contiguous = true;        ///< order is the identity on the covered tokens (no gather needed)
};

namespace detail {
template <class Set>
Segments make_segments(const Set& set, std::span<const int> ids, Index tokens) {
  if (static_cast<Index>(ids.size()) != tokens)
    lora::detail::fail("batched forward: {} adapter ids given for {} tokens; expected one id per token", ids.size(),
                       tokens);
  const int cap = set.capacity();
  std::vector<Index> count(static_cast<std::size_t>(cap) + 1, 0);
  for (std::size_t t = 0; t < ids.size(); ++t) {
    const int id = ids[t];
    if (id == -1) continue;
    if (!set.contains(id))
      lora::detail::fail("batched forward: token {} asks for adapter id {}, which is not loaded", t, id);
    ++count[static_cast<std::size_t>(id)];
  }
  Segments seg;
  std::vector<Index> start(static_cast<std::size_t>(cap), 0);
  Index total = 0;
  for (int id = 0; id < cap; ++id) {
    start[static_cast<std::size_t>(id)] = total;
    if (count[static_cast<std::size_t>(id)] > 0) {
      seg.adapter.push_back(id);
      seg.begin.push_back(total);
    }
    total += count[static_cast<std::size_t>(id)];
  }
  seg.begin.push_back(total);
  seg.order.resize(static_cast<std::size_t>(total));
  for (std::size_t t = 0; t < ids.size(); ++t)
    if (ids[t] != -1) seg.order[static_cast<std::size_t>(start[static_cast<std::size_t>(ids[t])]++)] = static_cast<Index>(t);
  // Contiguous when every segment is a run of consecutive tokens.
  for (std::size_t k = 0; k + 1 < seg.begin.size() && seg.contiguous; ++k)
    for (Index j = seg.begin[k] + 1; j < seg.begin[k + 1]; ++j)
      if (seg.order[static_cast<std::size_t>(j)] != seg.order[static_cast<std::size_t>(j - 1)] + 1) {
        seg.contiguous = false;
        break;
      }
  return seg;
}
}  // namespace detail

/// Groups tokens by adapter id (−1 = no adapter). Exposed so an engine can
/// build it once per batch and reuse it across layers.
template <class Scalar>
Segments make_segments(const AdapterSet<Scalar>& set, std::span<const int> ids) {
  return detail::make_segments(set, ids, static_cast<Index>(ids.size()));
}

namespace detail {
// Y[rows of segment k] += s_k · (X[rows]·A_kᵀ)·B_kᵀ, segments in parallel.
template <class Scalar, class C>
void add_adapter_paths(const AdapterSet<Scalar>& set, const Segments& seg, const Matrix<C>& X, Matrix<C>& Y) {
  const Index nseg = static_cast<Index>(seg.adapter.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (nseg > 1)
#endif
  for (Index k = 0; k < nseg; ++k) {
    const auto& slot = set.at(seg.adapter[static_cast<std::size_t>(k)]);
    const Index b = seg.begin[static_cast<std::size_t>(k)], n = seg.begin[static_cast<std::size_t>(k) + 1] - b;
    const auto A = slot.A.template cast<C>();
    const auto B = slot.B.template cast<C>();
    const C s = static_cast<C>(slot.scaling);
    if (seg.contiguous) {
      const Index t0 = seg.order[static_cast<std::size_t>(b)];
      Matrix<C> h = X.middleRows(t0, n) * A.transpose();
      h *= s;
      Y.middleRows(t0, n).noalias() += h * B.transpose();
    } else {
      Matrix<C> xs(n, X.cols());
      for (Index j = 0; j < n; ++j) xs.row(j) = X.row(seg.order[static_cast<std::size_t>(b + j)]);
      Matrix<C> h = xs * A.transpose();
      h *= s;
      const Matrix<C> ys = h * B.transpose();
      for (Index j = 0; j < n; ++j) Y.row(seg.order[static_cast<std::size_t>(b + j)]) += ys.row(j);
    }
  }
}
}  // namespace detail

/// Adapter paths only: Y[t] = s_i·(x_t·A_iᵀ)·B_iᵀ with i = ids[t] (0 where ids[t] = −1).
template <class Scalar>
Matrix<compute_t<Scalar>> batched_forward(const AdapterSet<Scalar>& set, const std::type_identity_t<MatrixRef<Scalar>>& X,
                                          std::span<const int> ids) {
  using C = compute_t<Scalar>;
  if (X.cols() != set.in_features())
    lora::detail::fail("batched forward: input X has {} columns, expected {}", X.cols(), set.in_features());
  const Segments seg = detail::make_segments(set, ids, X.rows());
  const Matrix<C> Xc = X.template cast<C>();
  Matrix<C> Y = Matrix<C>::Zero(X.rows(), set.out_features());
  detail::add_adapter_paths(set, seg, Xc, Y);
  return Y;
}

/// The mixed-adapter layer: Y = X·Wᵀ (one GEMM for the whole batch) plus, per
/// token t, s_i·(x_t·A_iᵀ)·B_iᵀ for its adapter i = ids[t] (none where −1).
template <class Scalar>
Matrix<compute_t<Scalar>> batched_apply(const AdapterSet<Scalar>& set, const std::type_identity_t<MatrixRef<Scalar>>& W,
                                        const std::type_identity_t<MatrixRef<Scalar>>& X, std::span<const int> ids) {
  using C = compute_t<Scalar>;
  if (W.rows() != set.out_features() || W.cols() != set.in_features())
    lora::detail::fail("batched forward: base weight W has shape [{} x {}], expected [{} x {}]", W.rows(), W.cols(),
                       set.out_features(), set.in_features());
  if (X.cols() != set.in_features())
    lora::detail::fail("batched forward: input X has {} columns, expected {}", X.cols(), set.in_features());
  const Segments seg = detail::make_segments(set, ids, X.rows());
  const Matrix<C> Xc = X.template cast<C>();
  Matrix<C> Y(X.rows(), set.out_features());
  Y.noalias() = Xc * W.template cast<C>().transpose();
  detail::add_adapter_paths(set, seg, Xc, Y);
  return Y;
}

/// Gradients of a mixed batch: per adapter id (empty matrices for ids no token
/// used or not loaded), and for the input.
template <class C>
struct BatchedGradients {
  std::vector<Matrix<C>> dA;  ///< dA[id]: [r_id × in]
  std::vector<Matrix<C>> dB;  ///< dB[id]: [out × r_id]
  Matrix<C> dX;               ///< [T × in], includes dY·W when W is given
};

/// Backward of batched_apply (W frozen; pass W = nullptr for batched_forward):
/// for each adapter i with token set S_i, H = X_S·A_iᵀ, G = dY_S:
/// dB_i = s_i·Gᵀ·H, dA_i = s_i·(G·B_i)ᵀ·X_S, dX_S += s_i·(G·B_i)·A_i.
template <class Scalar>
BatchedGradients<compute_t<Scalar>> batched_backward(const AdapterSet<Scalar>& set, const std::type_identity_t<MatrixRef<Scalar>>& X,
                                                     std::span<const int> ids,
                                                     const std::type_identity_t<Eigen::Ref<const Matrix<compute_t<Scalar>>>>& dY,
                                                     const Matrix<Scalar>* W = nullptr) {
  using C = compute_t<Scalar>;
  if (X.cols() != set.in_features())
    lora::detail::fail("batched backward: input X has {} columns, expected {}", X.cols(), set.in_features());
  if (dY.rows() != X.rows() || dY.cols() != set.out_features())
    lora::detail::fail("batched backward: dY has shape [{} x {}], expected [{} x {}]", dY.rows(), dY.cols(), X.rows(),
                       set.out_features());
  const Segments seg = detail::make_segments(set, ids, X.rows());
  const Matrix<C> Xc = X.template cast<C>();
  BatchedGradients<C> g;
  g.dA.resize(static_cast<std::size_t>(set.capacity()));
  g.dB.resize(static_cast<std::size_t>(set.capacity()));
  if (W) {
    if (W->rows() != set.out_features() || W->cols() != set.in_features())
      lora::detail::fail("batched backward: base weight W has shape [{} x {}], expected [{} x {}]", W->rows(),
                         W->cols(), set.out_features(), set.in_features());
    g.dX.noalias() = dY * W->template cast<C>();
  } else {
    g.dX = Matrix<C>::Zero(X.rows(), set.in_features());
  }
  const Index nseg = static_cast<Index>(seg.adapter.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (nseg > 1)
#endif
  for (Index k = 0; k < nseg; ++k) {
    const int id = seg.adapter[static_cast<std::size_t>(k)];
    const auto& slot = set.at(id);
    const Index b = seg.begin[static_cast<std::size_t>(k)], n = seg.begin[static_cast<std::size_t>(k) + 1] - b;
    Matrix<C> xs(n, Xc.cols()), gs(n, dY.cols());
    for (Index j = 0; j < n; ++j) {
      const Index t = seg.order[static_cast<std::size_t>(b + j)];
      xs.row(j) = Xc.row(t);
      gs.row(j) = dY.row(t);
    }
    const Matrix<C> A = slot.A.template cast<C>(), B = slot.B.template cast<C>();
    const C s = static_cast<C>(slot.scaling);
    const Matrix<C> h = xs * A.transpose();
    Matrix<C> gb = gs * B;
    gb *= s;
    g.dB[static_cast<std::size_t>(id)].noalias() = s * (gs.transpose() * h);
    g.dA[static_cast<std::size_t>(id)].noalias() = gb.transpose() * xs;
    const Matrix<C> dxs = gb * A;
    for (Index j = 0; j < n; ++j) g.dX.row(seg.order[static_cast<std::size_t>(b + j)]) += dxs.row(j);
  }
  return g;
}

template <class Scalar>
Segments AdapterSet<Scalar, cpu>::segments(std::span<const int> ids) const {
  return make_segments(*this, ids);
}
template <class Scalar>
Matrix<compute_t<Scalar>> AdapterSet<Scalar, cpu>::apply(const MatrixRef<Scalar>& W, const MatrixRef<Scalar>& X,
                                                         std::span<const int> ids) const {
  return batched_apply(*this, W, X, ids);
}
template <class Scalar>
template <class Q>
  requires std::same_as<Q, quant::Nf4Tensor<cpu>>
Matrix<compute_t<Scalar>> AdapterSet<Scalar, cpu>::apply(const Q& Wq, const MatrixRef<Scalar>& X,
                                                         std::span<const int> ids) const {
  using C = compute_t<Scalar>;
  if (Wq.shape().size() != 2 || Wq.rows() != out_ || Wq.cols() != in_)
    lora::detail::fail("AdapterSet: NF4 base weight has {} dimensions and shape [{} x {}], expected [out x in] = [{} x {}]",
                       Wq.shape().size(), Wq.rows(), Wq.cols(), out_, in_);
  if (X.cols() != in_) lora::detail::fail("batched forward: input X has {} columns, expected {}", X.cols(), in_);
  const Segments seg = detail::make_segments(*this, ids, X.rows());
  const Matrix<C> Xc = X.template cast<C>();
  Matrix<C> Y;
  if constexpr (std::is_same_v<C, float>)  // X in float once, for both products
    Y = nf4_matmul(Wq, Xc);  // ADL: lora::quant
  else
    Y = nf4_matmul(Wq, Matrix<float>(X.template cast<float>())).template cast<C>();
  detail::add_adapter_paths(*this, seg, Xc, Y);
  return Y;
}
template <class Scalar>
Matrix<compute_t<Scalar>> AdapterSet<Scalar, cpu>::forward(const MatrixRef<Scalar>& X, std::span<const int> ids) const {
  return batched_forward(*this, X, ids);
}

}  // namespace lora::multi
