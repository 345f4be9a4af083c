#pragma once
// The merge math, written once: W ± s·B·A and DoRA's rescale, a block of rows at a time.
// LowRankAdapter::merge/unmerge, DoraAdapter and the streaming checkpoint merge (io/merge.hpp)
// all call these, so a merged tensor is the same bits whichever path produced it.
//
// A weight is merged in its stored orientation, rows of W at a time:
//
//   V(i, :) = W(i, :) + s·Σ_k coef(i, k)·basis(k, :)
//
// with coef = B [out × r], basis = A [r × in] for W [out × in], or coef = Aᵀ [in × r],
// basis = Bᵀ [r × out] for a fan_in_fan_out W [in × out]. The sum over k is formed first and
// multiplied by s once, as PEFT's W + (B·A)·s; unmerge passes −s. DoRA then scales each
// output feature to its magnitude: V(i, :) ← (m_i / ‖V(i, :)‖)·V(i, :) (output features are
// W's columns with fan_in_fan_out: see dora_scale_columns).
//
//   Matrix<float> V = ...;                                   // rows i0 .. i0 + n of W, n ≤ 8
//   lora::low_rank_update_rows(B.data() + i0 * r, A.data(), r, cols, s, V.data(), cols, n);
//   lora::dora_rescale_rows(V.topRows(n), m.data() + i0);

#include <lora/core/types.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>

// Full unrolling keeps the accumulator tile in registers (GCC, Clang; not needed by nvcc's
// device pass, which never sees this host code).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define LORA_MERGE_UNROLL _Pragma("GCC unroll 16")
#else
#define LORA_MERGE_UNROLL
#endif

#if defined(_OPENMP)
#define LORA_MERGE_OMP(x) _Pragma(#x)
#else
#define LORA_MERGE_OMP(x)
#endif

namespace lora {

/// Rows per block of low_rank_update_rows: the register tile is this many rows × 32 floats
/// (16 doubles) of accumulators, and each basis load feeds that many FMAs.
inline constexpr Index merge_row_block = 8;

namespace detail {
/// v[ii] += s·coef(ii, :)·basis for RB rows at once, the accumulators of a CT-column tile
/// held in registers: RB × CT/P packets (Eigen's packet of C, P lanes), each basis packet
/// loaded once per k and fed to RB fused multiply-adds. Per element this is acc = fma(c, b,
/// acc) over k in order, then v = fma(acc, s, v): the same operations, in the same order, as
/// the scalar loop, so the tile shape does not change any bit. (Plain loops over an
/// acc[RB][CT] array left it on the stack at -O2: a load and a store per FMA, 5x slower.)
template <class C, int RB, int CT>
void add_low_rank_rows(const C* coef, const C* basis, Index r, Index cols, C s, C* const* v) {
  using P = typename Eigen::internal::packet_traits<C>::type;
  constexpr int PS = Eigen::internal::packet_traits<C>::size;
  constexpr int NP = CT / PS > 0 ? CT / PS : 1;
  constexpr int T = NP * PS;  // the tile's columns: CT, or one packet when CT < PS
  using Eigen::internal::ploadu;
  using Eigen::internal::pmadd;
  using Eigen::internal::pset1;
  using Eigen::internal::pstoreu;
  Index j0 = 0;
  for (; j0 + T <= cols; j0 += T) {
    P acc[RB][NP];
    LORA_MERGE_UNROLL
    for (int ii = 0; ii < RB; ++ii)
      LORA_MERGE_UNROLL
      for (int p = 0; p < NP; ++p) acc[ii][p] = pset1<P>(C(0));
    for (Index k = 0; k < r; ++k) {
      const C* b = basis + k * cols + j0;
      P bp[NP];
      LORA_MERGE_UNROLL
      for (int p = 0; p < NP; ++p) bp[p] = ploadu<P>(b + p * PS);
      LORA_MERGE_UNROLL
      for (int ii = 0; ii < RB; ++ii) {
        const P c = pset1<P>(coef[ii * r + k]);
        LORA_MERGE_UNROLL
        for (int p = 0; p < NP; ++p) acc[ii][p] = pmadd(c, bp[p], acc[ii][p]);
      }
    }
    const P sp = pset1<P>(s);
    LORA_MERGE_UNROLL
    for (int ii = 0; ii < RB; ++ii) {
      C* vi = v[ii] + j0;
      LORA_MERGE_UNROLL
      for (int p = 0; p < NP; ++p) pstoreu(vi + p * PS, pmadd(acc[ii][p], sp, ploadu<P>(vi + p * PS)));
    }
  }
  for (; j0 < cols; ++j0)  // the last cols % T columns
    for (int ii = 0; ii < RB; ++ii) {
      C a = 0;
      for (Index k = 0; k < r; ++k) a += coef[ii * r + k] * basis[k * cols + j0];
      v[ii][j0] += a * s;
    }
}
}  // namespace detail

/// One row block of the merge: for i < n (n ≤ merge_row_block),
///   V(i, :) += s·Σ_k coef(i, k)·basis(k, :)
/// coef points at the block's first row of the row-major [· × r] coefficient matrix, basis is
/// row-major [r × cols], V has leading dimension ldv. C is float or double. Pass −s to unmerge.
/// The result depends only on the row's data, not on the block it falls in.
template <class C>
void low_rank_update_rows(const C* coef, const C* basis, Index r, Index cols, C s, C* V, Index ldv, Index n) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "low_rank_update_rows: C is float or double");
  constexpr int RB = static_cast<int>(merge_row_block);
  constexpr int CT = std::is_same_v<C, float> ? 32 : 16;
  if (n <= 0) return;
  C* rowp[RB];
  for (int ii = 0; ii < RB; ++ii) rowp[ii] = V + std::min<Index>(ii, n - 1) * ldv;
  if (n == RB) {
    detail::add_low_rank_rows<C, RB, CT>(coef, basis, r, cols, s, rowp);
  } else {
    for (Index ii = 0; ii < n; ++ii) {
      C* one[1] = {rowp[ii]};
      detail::add_low_rank_rows<C, 1, CT>(coef + ii * r, basis, r, cols, s, one);
    }
  }
}

/// W ← W + s·coef·basis over all rows of W [rows × cols] (storage Scalar, arithmetic in
/// C = compute_t<Scalar>, one rounding per element), block by block, blocks split over
/// OpenMP threads. coef is [rows × r], basis [r × cols].
template <class Scalar>
void low_rank_update(Eigen::Ref<Matrix<Scalar>> W, const Matrix<compute_t<Scalar>>& coef,
                     const Matrix<compute_t<Scalar>>& basis, compute_t<Scalar> s) {
  using C = compute_t<Scalar>;
  const Index rows = W.rows(), cols = W.cols(), r = coef.cols();
  const Index blocks = (rows + merge_row_block - 1) / merge_row_block;
  const bool par = rows * cols >= (Index{1} << 16);
  (void)par;
  if constexpr (std::is_same_v<Scalar, C>) {
LORA_MERGE_OMP(omp parallel for schedule(static) if (par))
    for (Index b = 0; b < blocks; ++b) {
      const Index i0 = b * merge_row_block, n = std::min(merge_row_block, rows - i0);
      low_rank_update_rows<C>(coef.data() + i0 * r, basis.data(), r, cols, s, W.data() + i0 * W.outerStride(),
                              W.outerStride(), n);
    }
  } else {
LORA_MERGE_OMP(omp parallel if (par))
    {
      Matrix<C> V(merge_row_block, cols);
LORA_MERGE_OMP(omp for schedule(static))
      for (Index b = 0; b < blocks; ++b) {
        const Index i0 = b * merge_row_block, n = std::min(merge_row_block, rows - i0);
        V.topRows(n) = W.middleRows(i0, n).template cast<C>();
        low_rank_update_rows<C>(coef.data() + i0 * r, basis.data(), r, cols, s, V.data(), cols, n);
        W.middleRows(i0, n) = V.topRows(n).template cast<Scalar>();
      }
    }
  }
}

/// DoRA's weight norms without the whole adapted weight in memory: n_i = ‖V(i, :)‖ with
/// V = rows + s·coef·basis, a block of merge_row_block rows at a time (blocks over OpenMP
/// threads). load(i0, k, V) writes rows i0 … i0 + k − 1 of the weight, in compute precision,
/// into V's top k rows. Each row of V is low_rank_update_rows' (what a merge forms), so n_i is
/// the norm of the row a merge rescales. coef is [rows × r], basis [r × cols].
template <class C, class Load>
Vector<C> low_rank_row_norms(Index rows, Index cols, const Matrix<C>& coef, const Matrix<C>& basis, C s, Load load) {
  Vector<C> n(rows);
  const Index r = coef.cols(), blocks = (rows + merge_row_block - 1) / merge_row_block;
  const bool par = rows * cols >= (Index{1} << 16);
  (void)par;
LORA_MERGE_OMP(omp parallel if (par))
  {
    Matrix<C> V(merge_row_block, cols);
LORA_MERGE_OMP(omp for schedule(static))
    for (Index b = 0; b < blocks; ++b) {
      const Index i0 = b * merge_row_block, k = std::min(merge_row_block, rows - i0);
      load(i0, k, V);
      low_rank_update_rows<C>(coef.data() + i0 * r, basis.data(), r, cols, s, V.data(), cols, k);
      for (Index i = 0; i < k; ++i) n(i0 + i) = V.row(i).norm();
    }
  }
  return n;
}

/// DoRA's merge rescale of a row block whose rows are output features:
///   V(i, :) ← (m_i / ‖V(i, :)‖)·V(i, :),  m = the block's magnitudes.
template <class C>
void dora_rescale_rows(Eigen::Ref<Matrix<C>> V, const C* m) {
  for (Index i = 0; i < V.rows(); ++i) V.row(i) *= m[i] / V.row(i).norm();
}

/// DoRA's merge rescale when output features are columns (fan_in_fan_out):
///   V(:, j) ← c_j·V(:, j),  c = m ⊘ n with n the column norms of the whole adapted weight.
template <class C>
void dora_scale_columns(Eigen::Ref<Matrix<C>> V, const Vector<C>& c) {
  for (Index i = 0; i < V.rows(); ++i) V.row(i).array() *= c.transpose().array();
}

/// DoRA's unmerge rescale of a row block (rows are output features): V(i, :) ← (n_i / m_i)·V(i, :),
/// with n the norms merge returned.
template <class C>
void dora_unscale_rows(Eigen::Ref<Matrix<C>> V, const C* n, const C* m) {
  for (Index i = 0; i < V.rows(); ++i) V.row(i) *= n[i] / m[i];
}

}  // namespace lora
