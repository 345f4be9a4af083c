#pragma once
// Tensor-parallel sharding of adapters (Megatron / vLLM layouts) for a base layer W [out × in]
// split over `world` GPUs:
//
//   column-parallel (q/k/v/gate/up): W's output rows are split. B [out × r] is split by rows,
//     A [r × in] is replicated; X·Aᵀ is computed whole on every rank: no extra communication.
//   row-parallel (o/down): W's input columns are split. A is split by columns, B is
//     replicated; each rank's X_k·A_kᵀ is a partial sum of X·Aᵀ, completed by one all-reduce
//     of T × r values, or folded into the layer's own all-reduce of T × out (lora/tp/layer.hpp).
//
// Uneven splits: a dimension n is cut into `world` contiguous pieces, the first n mod world
// one element longer (torch.tensor_split's rule). Megatron asserts divisibility instead; the
// adapter math is exact for any partition, so we accept the uneven one, and the base layer
// must use the same partition (shard_range / shard_weight). An engine with another partition
// passes its ShardRange explicitly. A piece must not be empty (world ≤ n), and as every
// LowRankAdapter a shard needs r ≤ min(in_k, out_k): both are refused with lora::error.
//
//   auto range = lora::tp::shard_range(out, rank, world);
//   auto local = lora::tp::shard(adapter, lora::tp::TpLayout::column, rank, world);
//   auto W_k   = lora::tp::shard_weight(W, lora::tp::TpLayout::column, rank, world);

#include <lora/core/adapter.hpp>
#include <lora/core/types.hpp>
#include <lora/dora/dora.hpp>
#include <lora/error.hpp>
#include <lora/multi/adapter_set.hpp>

#include <algorithm>
#include <string>
#include <utility>

namespace lora::tp {

/// How the base layer is split: column = output features split (B split by rows, A
/// replicated); row = input features split (A split by columns, B replicated).
enum class TpLayout { column, row };

inline const char* layout_name(TpLayout l) { return l == TpLayout::column ? "column" : "row"; }

/// Elements [offset, offset + size) of a dimension held by one rank.
struct ShardRange {
  Index offset = 0;
  Index size = 0;
  friend bool operator==(const ShardRange&, const ShardRange&) = default;
};

/// The piece of a dimension of n elements that `rank` of `world` holds: contiguous, the
/// first n mod world ranks get ⌈n/world⌉ elements, the others ⌊n/world⌋.
inline ShardRange shard_range(Index n, int rank, int world) {
  if (world < 1) fail("tp::shard_range: world size must be at least 1, got {}", world);
  if (rank < 0 || rank >= world) fail("tp::shard_range: rank {} is outside [0, {})", rank, world);
  if (n < world)
    fail("tp::shard_range: a dimension of {} elements cannot be split over {} ranks (a rank would hold none)", n,
         world);
  const Index base = n / world, extra = n % world;
  const Index r = rank;
  return {r * base + std::min(r, extra), base + (r < extra ? 1 : 0)};
}

namespace detail {
inline std::string where(TpLayout l, int rank, int world) {
  return fmt::format("tp::shard ({}-parallel, rank {} of {})", layout_name(l), rank, world);
}
template <class F>
auto with_context(const std::string& where, const std::string& name, F&& f) {
  try {
    return f();
  } catch (const error& e) {
    if (name.empty()) fail("{}: {}", where, e.what());
    fail("{}, adapter '{}': {}", where, name, e.what());
  }
}
// The range of the split dimension: out (column) or in (row).
inline ShardRange range_of(TpLayout l, Index in, Index out, int rank, int world) {
  return shard_range(l == TpLayout::column ? out : in, rank, world);
}
inline void check_range(const char* what, ShardRange r, Index n) {
  if (r.size < 1 || r.offset < 0 || r.offset + r.size > n)
    fail("tp::shard: range [{}, {}) of {} is not a non-empty part of [0, {})", r.offset, r.offset + r.size, what, n);
}
}  // namespace detail

/// The shard of the base weight that a rank holds: rows [range) of W [out × in] for column,
/// columns [range) for row (W stored [in × out] with fan_in_fan_out: the other way round).
template <class Scalar>
Matrix<Scalar> shard_weight(const MatrixRef<Scalar>& W, TpLayout layout, ShardRange range, bool fan_in_fan_out = false) {
  const bool split_rows = (layout == TpLayout::column) != fan_in_fan_out;
  detail::check_range(split_rows ? "the weight's rows" : "the weight's columns", range, split_rows ? W.rows() : W.cols());
  if (split_rows) return W.middleRows(range.offset, range.size);
  return W.middleCols(range.offset, range.size);
}
template <class Scalar>
Matrix<Scalar> shard_weight(const MatrixRef<Scalar>& W, TpLayout layout, int rank, int world, bool fan_in_fan_out = false) {
  const Index out = fan_in_fan_out ? W.cols() : W.rows(), in = fan_in_fan_out ? W.rows() : W.cols();
  return shard_weight<Scalar>(W, layout, detail::range_of(layout, in, out, rank, world), fan_in_fan_out);
}

/// The adapter a rank holds, for a given range of the split dimension: column: A whole,
/// B rows [range); row: A columns [range), B whole. alpha, scaling rule, multiplier,
/// dropout and name are kept, and r is unchanged, so scaling() equals the original's.
/// A row shard's own forward() is a partial sum: use lora::tp::forward/apply (layer.hpp).
template <class Scalar, ScalingPolicy P>
LowRankAdapter<Scalar, cpu, P> shard(const LowRankAdapter<Scalar, cpu, P>& ad, TpLayout layout, ShardRange range,
                                     const std::string& where = "tp::shard") {
  return detail::with_context(where, ad.name(), [&] {
    Matrix<Scalar> A, B;
    if (layout == TpLayout::column) {
      detail::check_range("out_features", range, ad.out_features());
      A = ad.A();
      B = ad.B().middleRows(range.offset, range.size);
    } else {
      detail::check_range("in_features", range, ad.in_features());
      A = ad.A().middleCols(range.offset, range.size);
      B = ad.B();
    }
    AdapterOptions opts;
    opts.fan_in_fan_out = ad.fan_in_fan_out();
    opts.dropout = ad.dropout();
    opts.name = ad.name();
    auto local = LowRankAdapter<Scalar, cpu, P>::from_factors(std::move(A), std::move(B), ad.alpha(), std::move(opts),
                                                              ad.policy());
    if (ad.multiplier() != 1.0) local.rescale(ad.multiplier());
    return local;
  });
}
/// shard(ad, layout, shard_range(split dimension, rank, world)).
template <class Scalar, ScalingPolicy P>
LowRankAdapter<Scalar, cpu, P> shard(const LowRankAdapter<Scalar, cpu, P>& ad, TpLayout layout, int rank, int world) {
  const std::string where = detail::where(layout, rank, world);
  const ShardRange r = detail::with_context(
      where, ad.name(), [&] { return detail::range_of(layout, ad.in_features(), ad.out_features(), rank, world); });
  return shard(ad, layout, r, where);
}

/// DoRA: the LoRA factors as above; the magnitude m [out] follows the output rows (column:
/// m[range); row: m whole). Column shards are complete DoRA layers (each output row's norm
/// lives on one rank). Row shards are not: ‖W + s·B·A‖_row spans every rank's columns, and
/// lora::tp::apply/backward/weight_norm complete it with an all-reduce of the out per-row
/// squared norms (layer.hpp); a row shard's own apply() would use its partial norms.
template <class Scalar, ScalingPolicy P>
DoraAdapter<Scalar, cpu, P> shard(const DoraAdapter<Scalar, cpu, P>& d, TpLayout layout, ShardRange range,
                                  const std::string& where = "tp::shard") {
  auto lora = shard(d.lora(), layout, range, where);
  Vector<compute_t<Scalar>> m =
      layout == TpLayout::column ? Vector<compute_t<Scalar>>(d.magnitude().segment(range.offset, range.size))
                                 : Vector<compute_t<Scalar>>(d.magnitude());
  return detail::with_context(where, d.lora().name(),
                              [&] { return DoraAdapter<Scalar, cpu, P>(std::move(lora), std::move(m)); });
}
template <class Scalar, ScalingPolicy P>
DoraAdapter<Scalar, cpu, P> shard(const DoraAdapter<Scalar, cpu, P>& d, TpLayout layout, int rank, int world) {
  const std::string where = detail::where(layout, rank, world);
  const ShardRange r = detail::with_context(
      where, d.lora().name(), [&] { return detail::range_of(layout, d.in_features(), d.out_features(), rank, world); });
  return shard(d, layout, r, where);
}

/// Every adapter of a set sharded the same way, at the same ids (an engine's numbering of
/// adapters stays valid on every rank). The set is for the local layer [out_k × in] (column)
/// or [out × in_k] (row).
template <class Scalar>
multi::AdapterSet<Scalar> shard(const multi::AdapterSet<Scalar>& set, TpLayout layout, ShardRange range,
                                const std::string& where = "tp::shard") {
  const bool col = layout == TpLayout::column;
  return detail::with_context(where, std::string(), [&] {
    detail::check_range(col ? "out_features" : "in_features", range, col ? set.out_features() : set.in_features());
    multi::AdapterSet<Scalar> local(col ? set.in_features() : range.size, col ? range.size : set.out_features());
    for (int id = 0; id < set.capacity(); ++id) {
      if (!set.contains(id)) continue;
      const auto& s = set.at(id);
      Matrix<Scalar> A = col ? Matrix<Scalar>(s.A) : Matrix<Scalar>(s.A.middleCols(range.offset, range.size));
      Matrix<Scalar> B = col ? Matrix<Scalar>(s.B.middleRows(range.offset, range.size)) : Matrix<Scalar>(s.B);
      local.insert(id, s.name, std::move(A), std::move(B), s.scaling);
    }
    return local;
  });
}
template <class Scalar>
multi::AdapterSet<Scalar> shard(const multi::AdapterSet<Scalar>& set, TpLayout layout, int rank, int world) {
  const std::string where = detail::where(layout, rank, world);
  const ShardRange r = detail::with_context(
      where, std::string(), [&] { return detail::range_of(layout, set.in_features(), set.out_features(), rank, world); });
  return shard(set, layout, r, where);
}

}  // namespace lora::tp
