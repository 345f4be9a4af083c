#pragma once
// Forward and backward of a tensor-parallel adapted layer on one rank, given the rank's shard
// (lora/tp/shard.hpp), its piece of the base weight and a Communicator (lora/tp/comm.hpp).
// Each function is the library's own unsharded routine run on the shard, plus the collectives
// that make the result equal the unsharded layer's:
//
//   layout  input            output             forward collective           backward collectives
//   column  X [T × in]       Y_k [T × out_k]    none                         dA (r × in), dX (T × in)*
//   row     X_k [T × in_k]   Y [T × out]        Y (T × out)* or XA (T × r)   dB (out × r)
//
// (* the base layer's own all-reduce: the adapter folds into it.) In the row layout, dY is the
// whole [T × out] (the output is replicated after the all-reduce); in the column layout dY is
// the rank's columns dY_k [T × out_k]. Gradients come back as the rank needs them: column:
// dA whole, dB rows [range), dX whole; row: dA columns [range), dB whole, dX columns [range).
// Evaluation mode (no dropout) throughout.

#include <lora/core/adapter.hpp>
#include <lora/core/types.hpp>
#include <lora/dora/dora.hpp>
#include <lora/error.hpp>
#include <lora/multi/adapter_set.hpp>
#include <lora/tp/comm.hpp>
#include <lora/tp/shard.hpp>

#include <span>

namespace lora::tp {

/// How a row-parallel layer completes its adapter path: `fold` adds s·(X_k·A_kᵀ)·Bᵀ to the
/// rank's partial base output before the layer's all-reduce (no extra collective; every rank
/// runs the T × r × out GEMM on its partial); `separate` all-reduces X_k·A_kᵀ (T × r values)
/// and then applies B (the base all-reduce stays the engine's own).
enum class RowReduce { fold, separate };

namespace detail {
template <class Scalar, class C>
Matrix<C> base_product(const MatrixRef<Scalar>& W, const MatrixRef<Scalar>& X, bool fan_in_fan_out) {
  if (fan_in_fan_out) return X.template cast<C>() * W.template cast<C>();
  return X.template cast<C>() * W.template cast<C>().transpose();
}
}  // namespace detail

/// The adapter path s·(X·Aᵀ)·Bᵀ of the layer on this rank: column: X [T × in] →
/// [T × out_k], no communication; row: X_k [T × in_k] → [T × out], one all-reduce of the
/// partial X_k·A_kᵀ (T × r).
template <class Scalar, ScalingPolicy P, Communicator Comm>
Matrix<compute_t<Scalar>> forward(const LowRankAdapter<Scalar, cpu, P>& shard, TpLayout layout,
                                  const std::type_identity_t<MatrixRef<Scalar>>& X, Comm& comm) {
  using C = compute_t<Scalar>;
  if (layout == TpLayout::column) return shard.forward(X);
  if (X.cols() != shard.in_features())
    fail("tp::forward (row-parallel, rank {}): input X_k has {} columns, expected in_k = {}", comm.rank(), X.cols(),
         shard.in_features());
  Matrix<C> xa = X.template cast<C>() * shard.A().template cast<C>().transpose();
  all_reduce(comm, xa);
  xa *= static_cast<C>(shard.scaling());
  return xa * shard.B().template cast<C>().transpose();
}

/// The adapted layer X·Wᵀ + s·(X·Aᵀ)·Bᵀ on this rank, with W_k the rank's piece of the base
/// weight (shard_weight): column: Y_k [T × out_k], no communication; row: Y [T × out] on
/// every rank, after the layer's all-reduce (`fold`) or that plus one of T × r (`separate`).
template <class Scalar, ScalingPolicy P, Communicator Comm>
Matrix<compute_t<Scalar>> apply(const LowRankAdapter<Scalar, cpu, P>& shard, TpLayout layout,
                                const std::type_identity_t<MatrixRef<Scalar>>& W,
                                const std::type_identity_t<MatrixRef<Scalar>>& X, Comm& comm,
                                RowReduce mode = RowReduce::fold) {
  using C = compute_t<Scalar>;
  if (layout == TpLayout::column) return shard.apply(W, X);
  if (mode == RowReduce::fold) {
    Matrix<C> y = shard.apply(W, X);  // partial base + partial adapter path
    all_reduce(comm, y);
    return y;
  }
  if (X.cols() != shard.in_features())
    fail("tp::apply (row-parallel, rank {}): input X_k has {} columns, expected in_k = {}", comm.rank(), X.cols(),
         shard.in_features());
  if (shard.fan_in_fan_out() ? (W.rows() != shard.in_features() || W.cols() != shard.out_features())
                             : (W.rows() != shard.out_features() || W.cols() != shard.in_features()))
    fail("tp::apply (row-parallel, rank {}): base weight shard has shape [{} x {}], expected [{} x {}]", comm.rank(),
         W.rows(), W.cols(), shard.fan_in_fan_out() ? shard.in_features() : shard.out_features(),
         shard.fan_in_fan_out() ? shard.out_features() : shard.in_features());
  Matrix<C> y = detail::base_product<Scalar, C>(W, X, shard.fan_in_fan_out());
  all_reduce(comm, y);  // the base layer's own all-reduce
  y += forward(shard, layout, X, comm);
  return y;
}

/// Gradients of apply() (W frozen) on this rank: the shard's own backward, then column:
/// all-reduce dA (r × in) and dX (T × in, the base layer's own); row: all-reduce dB (out × r),
/// which is linear in the partial X_k·A_kᵀ. dY: column dY_k [T × out_k], row dY [T × out].
template <class Scalar, ScalingPolicy P, Communicator Comm>
Gradients<compute_t<Scalar>> backward(const LowRankAdapter<Scalar, cpu, P>& shard, TpLayout layout,
                                      const std::type_identity_t<MatrixRef<Scalar>>& W,
                                      const std::type_identity_t<MatrixRef<Scalar>>& X,
                                      const Eigen::Ref<const Matrix<compute_t<Scalar>>>& dY, Comm& comm) {
  Gradients<compute_t<Scalar>> g = shard.backward(W, X, dY);
  if (layout == TpLayout::column) {
    all_reduce(comm, g.dA);
    all_reduce(comm, g.dX);
  } else {
    all_reduce(comm, g.dB);
  }
  return g;
}

/// DoRA's n = ‖W + s·B·A‖_row for this rank's output rows: column: [out_k], local; row:
/// [out], the per-row squared norms of the rank's columns all-reduced (out values).
template <class Scalar, ScalingPolicy P, Communicator Comm>
Vector<compute_t<Scalar>> weight_norm(const DoraAdapter<Scalar, cpu, P>& shard, TpLayout layout,
                                      const std::type_identity_t<MatrixRef<Scalar>>& W, Comm& comm) {
  if (layout == TpLayout::column) return shard.weight_norm(W);
  Vector<compute_t<Scalar>> sq = shard.adapted_weight(W).rowwise().squaredNorm();
  all_reduce(comm, sq);
  return sq.cwiseSqrt();
}

/// The DoRA layer (m ⊘ n) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) on this rank. Column: the shard's own
/// apply, no communication. Row: n by weight_norm (out values all-reduced), then the
/// rank's partial X_k·V_kᵀ is scaled by m ⊘ n and folded into the layer's all-reduce.
template <class Scalar, ScalingPolicy P, Communicator Comm>
Matrix<compute_t<Scalar>> apply(const DoraAdapter<Scalar, cpu, P>& shard, TpLayout layout,
                                const std::type_identity_t<MatrixRef<Scalar>>& W,
                                const std::type_identity_t<MatrixRef<Scalar>>& X, Comm& comm) {
  using C = compute_t<Scalar>;
  if (layout == TpLayout::column) return shard.apply(W, X);
  const Matrix<C> V = shard.adapted_weight(W);  // [out × in_k]
  if (X.cols() != shard.in_features())
    fail("tp::apply (DoRA, row-parallel, rank {}): input X_k has {} columns, expected in_k = {}", comm.rank(),
         X.cols(), shard.in_features());
  Vector<C> sq = V.rowwise().squaredNorm();
  all_reduce(comm, sq);
  const Vector<C> c = shard.magnitude().cwiseQuotient(sq.cwiseSqrt());
  Matrix<C> y = X.template cast<C>() * V.transpose();
  y *= c.asDiagonal();
  all_reduce(comm, y);
  return y;
}

/// Gradients of the DoRA layer (n held constant, as PEFT). Column: the shard's own
/// backward, then all-reduce dA and dX. Row: with c = m ⊘ n and G = dY·diag(c) (dY whole):
/// dX_k = G·V_k and dA_k = s·(G·B)ᵀ·X_k locally; dB = s·Gᵀ·(X·Aᵀ) all-reduced (out × r);
/// dm = colsum(dY ⊙ (X·Vᵀ)) ⊘ n, which needs X·Vᵀ whole: one all-reduce of T × out (an engine
/// keeps it from the forward pass instead, where it is the layer's output before scaling).
template <class Scalar, ScalingPolicy P, Communicator Comm>
DoraGradients<compute_t<Scalar>> backward(const DoraAdapter<Scalar, cpu, P>& shard, TpLayout layout,
                                          const std::type_identity_t<MatrixRef<Scalar>>& W,
                                          const std::type_identity_t<MatrixRef<Scalar>>& X,
                                          const Eigen::Ref<const Matrix<compute_t<Scalar>>>& dY, Comm& comm) {
  using C = compute_t<Scalar>;
  if (layout == TpLayout::column) {
    DoraGradients<C> g = shard.backward(W, X, dY);
    all_reduce(comm, g.dA);
    all_reduce(comm, g.dX);
    return g;
  }
  const Matrix<C> V = shard.adapted_weight(W);
  if (X.cols() != shard.in_features())
    fail("tp::backward (DoRA, row-parallel, rank {}): input X_k has {} columns, expected in_k = {}", comm.rank(),
         X.cols(), shard.in_features());
  if (dY.rows() != X.rows() || dY.cols() != shard.out_features())
    fail("tp::backward (DoRA, row-parallel, rank {}): dY has shape [{} x {}], expected [{} x {}]", comm.rank(),
         dY.rows(), dY.cols(), X.rows(), shard.out_features());
  Vector<C> sq = V.rowwise().squaredNorm();
  all_reduce(comm, sq);
  const Vector<C> n = sq.cwiseSqrt();
  const Vector<C> c = shard.magnitude().cwiseQuotient(n);
  const C s = static_cast<C>(shard.lora().scaling());
  const Matrix<C> Xc = X.template cast<C>();
  const Matrix<C> A = shard.lora().A().template cast<C>(), B = shard.lora().B().template cast<C>();
  const Matrix<C> G = dY * c.asDiagonal();
  const Matrix<C> GB = G * B;
  DoraGradients<C> g;
  g.dA.noalias() = s * (GB.transpose() * Xc);
  g.dX.noalias() = G * V;
  const Matrix<C> XA = Xc * A.transpose();
  g.dB.noalias() = s * (G.transpose() * XA);
  all_reduce(comm, g.dB);
  Matrix<C> XV = Xc * V.transpose();
  all_reduce(comm, XV);
  g.dm = (dY.array() * XV.array()).colwise().sum().transpose().matrix().cwiseQuotient(n);
  return g;
}

/// The mixed-adapter layer (multi::batched_apply) on this rank, from the set's shard: column:
/// Y_k [T × out_k], no communication; row: each token's partial adapter path folded into the
/// layer's all-reduce, Y [T × out] on every rank.
template <class Scalar, Communicator Comm>
Matrix<compute_t<Scalar>> batched_apply(const multi::AdapterSet<Scalar>& shard, TpLayout layout,
                                        const std::type_identity_t<MatrixRef<Scalar>>& W,
                                        const std::type_identity_t<MatrixRef<Scalar>>& X, std::span<const int> ids,
                                        Comm& comm) {
  Matrix<compute_t<Scalar>> y = multi::batched_apply(shard, W, X, ids);
  if (layout == TpLayout::row) all_reduce(comm, y);
  return y;
}

/// Gradients of batched_apply on this rank (W frozen; W = nullptr for the adapter paths
/// alone): multi::batched_backward on the shard, then column: every used adapter's dA and
/// dX all-reduced; row: every used adapter's dB all-reduced. dY as in backward().
template <class Scalar, Communicator Comm>
multi::BatchedGradients<compute_t<Scalar>> batched_backward(
    const multi::AdapterSet<Scalar>& shard, TpLayout layout, const std::type_identity_t<MatrixRef<Scalar>>& X,
    std::span<const int> ids, const std::type_identity_t<Eigen::Ref<const Matrix<compute_t<Scalar>>>>& dY, Comm& comm,
    const Matrix<Scalar>* W = nullptr) {
  multi::BatchedGradients<compute_t<Scalar>> g = multi::batched_backward(shard, X, ids, dY, W);
  // Which adapters have gradients depends on ids alone, the same on every rank.
  for (std::size_t id = 0; id < g.dA.size(); ++id) {
    if (layout == TpLayout::column && g.dA[id].size() != 0) all_reduce(comm, g.dA[id]);
    if (layout == TpLayout::row && g.dB[id].size() != 0) all_reduce(comm, g.dB[id]);
  }
  if (layout == TpLayout::column) all_reduce(comm, g.dX);
  return g;
}

}  // namespace lora::tp
