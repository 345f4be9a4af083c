#pragma once
// The exact singular value decomposition of ΔW = s·B·A without forming ΔW:
// thin QRs of B [out × r] and Aᵀ [in × r], and the SVD of the r × r core.
// O((in + out)·r²) instead of O(in·out·min(in, out)).

#include <lora/core/adapter.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Dense>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace lora::analysis {

/// A thin SVD M = U·diag(σ)·Vᵀ: U [out × p], σ [p] descending and ≥ 0, V [in × p],
/// with p = min(r, in, out). Columns of U and V are orthonormal.
template <class Scalar>
struct LowRankSVD {
  Matrix<Scalar> U;
  Vector<Scalar> singular_values;
  Matrix<Scalar> V;
  Index size() const { return singular_values.size(); }
};

namespace detail {

/// Storage scalar → double, one element; bf16/f16 go through float.
template <class S>
inline double to_double(S v) {
  if constexpr (std::is_same_v<S, bfloat16>) {
    // bf16 is the top half of a float: a shift the compiler vectorises
    const std::uint32_t bits = static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(v)) << 16;
    return static_cast<double>(Eigen::numext::bit_cast<float>(bits));
  } else if constexpr (std::is_same_v<S, half>) {
    return static_cast<double>(static_cast<float>(v));
  } else {
    return static_cast<double>(v);
  }
}

/// Rows [r0, r0 + n) of a row-major matrix expression, converted to a
/// column-major double buffer (n × cols). Raw-pointer fast path for plain
/// row-major storage (Matrix, Map): bf16 is widened by a shift.
template <class Derived>
void rows_to_double(const Eigen::MatrixBase<Derived>& M, Index r0, Index n, Eigen::MatrixXd& out) {
  using S = typename Derived::Scalar;
  out.resize(n, M.cols());
  if constexpr (Derived::IsRowMajor && requires { M.derived().data(); }) {
    if (M.innerStride() == 1) {
      const Index ld = M.outerStride();
      for (Index i = 0; i < n; ++i) {
        const S* row = M.derived().data() + (r0 + i) * ld;
        for (Index j = 0; j < M.cols(); ++j) out(i, j) = to_double(row[j]);
      }
      return;
    }
  }
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < M.cols(); ++j) out(i, j) = to_double(M(r0 + i, j));
}

/// Columns [c0, c0 + n) of M as a column-major double buffer (rows × n).
template <class Derived>
void cols_to_double(const Eigen::MatrixBase<Derived>& M, Index c0, Index n, Eigen::MatrixXd& out) {
  using S = typename Derived::Scalar;
  out.resize(M.rows(), n);
  if constexpr (Derived::IsRowMajor && requires { M.derived().data(); }) {
    if (M.innerStride() == 1) {
      const Index ld = M.outerStride();
      for (Index i = 0; i < M.rows(); ++i) {
        const S* row = M.derived().data() + i * ld + c0;
        for (Index j = 0; j < n; ++j) out(i, j) = to_double(row[j]);
      }
      return;
    }
  }
  for (Index i = 0; i < M.rows(); ++i)
    for (Index j = 0; j < n; ++j) out(i, j) = to_double(M(i, c0 + j));
}

/// Elements converted per block: small enough to stay in L2, large enough for GEMM speed.
inline constexpr Index gram_block_elements = 1 << 15;

/// Rows [r0, r0 + n) of M transposed into a column-major double buffer (cols × n):
/// row i of a row-major M is contiguous and becomes column i of the buffer.
template <class Derived>
void rows_to_double_transposed(const Eigen::MatrixBase<Derived>& M, Index r0, Index n, Eigen::MatrixXd& out) {
  using S = typename Derived::Scalar;
  out.resize(M.cols(), n);
  if constexpr (Derived::IsRowMajor && requires { M.derived().data(); }) {
    if (M.innerStride() == 1) {
      const Index ld = M.outerStride();
      for (Index i = 0; i < n; ++i) {
        const S* row = M.derived().data() + (r0 + i) * ld;
        double* col = out.data() + i * M.cols();
        for (Index j = 0; j < M.cols(); ++j) col[j] = to_double(row[j]);
      }
      return;
    }
  }
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < M.cols(); ++j) out(j, i) = to_double(M(r0 + i, j));
}

/// G = X·Xᵀ summed over blocks of `extent` items, each block converted to double by
/// `load(start, n, buf)` into a (k × n) buffer: the rank-k update both Gram routines run.
template <class Load>
Eigen::MatrixXd gram_blocked(Index k, Index extent, Load&& load) {
  Eigen::MatrixXd G = Eigen::MatrixXd::Zero(k, k);
  const Index bs = std::max<Index>(16, gram_block_elements / std::max<Index>(k, 1));
  Eigen::MatrixXd buf;
  for (Index i0 = 0; i0 < extent; i0 += bs) {
    load(i0, std::min(bs, extent - i0), buf);
    G.selfadjointView<Eigen::Lower>().rankUpdate(buf);
  }
  G.triangularView<Eigen::StrictlyUpper>() = G.transpose();
  return G;
}

/// G = MᵀM (cols × cols) in double, reading M in blocks of rows (bf16 converted
/// block by block, never the whole matrix). The block is stored transposed so that
/// both Gram routines run the same rank-k update G += X·Xᵀ.
template <class Derived>
Eigen::MatrixXd gram_of_columns(const Eigen::MatrixBase<Derived>& M) {
  return gram_blocked(M.cols(), M.rows(),
                      [&](Index r0, Index n, Eigen::MatrixXd& buf) { rows_to_double_transposed(M, r0, n, buf); });
}

/// G = M·Mᵀ (rows × rows) in double, reading M in blocks of columns.
template <class Derived>
Eigen::MatrixXd gram_of_rows(const Eigen::MatrixBase<Derived>& M) {
  return gram_blocked(M.rows(), M.cols(),
                      [&](Index c0, Index n, Eigen::MatrixXd& buf) { cols_to_double(M, c0, n, buf); });
}

inline void check_factors(Index b_rows, Index b_cols, Index a_rows, Index a_cols, double scaling) {
  if (b_cols != a_rows)
    lora::detail::fail("lowrank_svd: lora_B is [{} x {}] and lora_A is [{} x {}]; B's columns must equal A's rows (r)",
                       b_rows, b_cols, a_rows, a_cols);
  if (b_cols == 0) lora::detail::fail("lowrank_svd: rank r must be at least 1, got 0");
  if (!std::isfinite(scaling)) lora::detail::fail("lowrank_svd: scaling must be finite, got {}", scaling);
}

/// Calls fn(i) for i in [0, n) on up to `threads` threads (0: all cores).
/// The first exception thrown by any fn is rethrown after all threads joined.
/// With OpenMP the threads are an OpenMP team, so that Eigen's own OpenMP GEMM
/// parallelism stays off inside (nested teams would only spin); without it,
/// std::threads.
template <class Fn>
void parallel_for(Index n, unsigned threads, Fn&& fn) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = static_cast<unsigned>(std::min<Index>(threads, std::max<Index>(n, 1)));
  std::atomic<Index> next{0};
  std::exception_ptr first;
  std::mutex m;
#ifdef _OPENMP
  const int team = static_cast<int>(threads);
  // a team of one is not "inside a parallel region" for Eigen: keep its GEMMs serial meanwhile
  struct SerialEigen {
    int saved = Eigen::nbThreads();
    bool on;
    explicit SerialEigen(bool o) : on(o) { if (on) Eigen::setNbThreads(1); }
    ~SerialEigen() { if (on) Eigen::setNbThreads(saved); }
  } serial(team == 1);
#pragma omp parallel num_threads(team)
  for (;;) {
    const Index i = next.fetch_add(1);
    if (i >= n) break;
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(m);
      if (!first) first = std::current_exception();
      next.store(n);
    }
  }
  if (first) std::rethrow_exception(first);
  return;
#endif
  auto worker = [&] {
    for (;;) {
      const Index i = next.fetch_add(1);
      if (i >= n) return;
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(m);
        if (!first) first = std::current_exception();
        next.store(n);
      }
    }
  };
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (unsigned t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace detail

/// Thin SVD of s·B·A for B [out × r], A [r × in] (any float, double, bf16 or
/// half Eigen expressions), computed in double: B = Q_B·R_B, Aᵀ = Q_A·R_A
/// (Householder, so rank-deficient factors are fine), s·R_B·R_Aᵀ = U_c·Σ·V_cᵀ,
/// U = Q_B·U_c, V = Q_A·V_c.
///
///   auto svd = lora::analysis::lowrank_svd(ad.B(), ad.A(), ad.scaling());
///   svd.singular_values;  // σ of ΔW, descending
template <class DerivedB, class DerivedA>
LowRankSVD<double> lowrank_svd(const Eigen::MatrixBase<DerivedB>& B, const Eigen::MatrixBase<DerivedA>& A,
                               double scaling = 1.0) {
  detail::check_factors(B.rows(), B.cols(), A.rows(), A.cols(), scaling);
  const Index out = B.rows(), in = A.cols(), r = B.cols();
  Eigen::MatrixXd Bd, Atd;
  detail::rows_to_double(B, 0, out, Bd);
  {
    Eigen::MatrixXd Ad;
    detail::cols_to_double(A, 0, in, Ad);
    Atd = Ad.transpose();
  }
  if (!Bd.allFinite()) lora::detail::fail("lowrank_svd: lora_B [{} x {}] contains a NaN or Inf", out, r);
  if (!Atd.allFinite()) lora::detail::fail("lowrank_svd: lora_A [{} x {}] contains a NaN or Inf", r, in);
  const Index kb = std::min(out, r), ka = std::min(in, r);
  Eigen::HouseholderQR<Eigen::MatrixXd> qb(Bd), qa(Atd);
  const Eigen::MatrixXd Rb = qb.matrixQR().topRows(kb).template triangularView<Eigen::Upper>();  // kb × r
  const Eigen::MatrixXd Ra = qa.matrixQR().topRows(ka).template triangularView<Eigen::Upper>();  // ka × r
  const Eigen::MatrixXd core = scaling * (Rb * Ra.transpose());                                    // kb × ka
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Index p = std::min(kb, ka);
  LowRankSVD<double> result;
  result.singular_values = svd.singularValues().head(p);
  result.U = qb.householderQ() * (Eigen::MatrixXd::Identity(out, kb) * svd.matrixU().leftCols(p));
  result.V = qa.householderQ() * (Eigen::MatrixXd::Identity(in, ka) * svd.matrixV().leftCols(p));
  return result;
}

/// The thin SVD of an adapter's ΔW = s·B·A (ΔWᵀ's roles swapped for fan_in_fan_out,
/// so U always lives in ΔW's row space as stored).
template <class S, ScalingPolicy P>
LowRankSVD<double> lowrank_svd(const LowRankAdapter<S, cpu, P>& ad) {
  auto svd = lowrank_svd(ad.B(), ad.A(), ad.scaling());
  if (ad.fan_in_fan_out()) std::swap(svd.U, svd.V);
  return svd;
}

/// Singular values only of s·B·A, descending, length min(r, in, out), from the
/// r × r Gram matrices G_B = BᵀB and G_A = A·Aᵀ accumulated in double (B and A
/// are read in blocks, so bf16 storage is never converted whole): with
/// G_B = W·Λ·Wᵀ, σ² = s²·eig(Λ^½·Wᵀ·G_A·W·Λ^½). Half the flops of the QR route
/// and GEMM-shaped; agrees with it to ≈ 1e-8·σ₁ (the Gram squares the condition
/// number, so tiny singular values are accurate absolutely, not relatively).
template <class DerivedB, class DerivedA>
Vector<double> lowrank_singular_values(const Eigen::MatrixBase<DerivedB>& B, const Eigen::MatrixBase<DerivedA>& A,
                                       double scaling = 1.0) {
  detail::check_factors(B.rows(), B.cols(), A.rows(), A.cols(), scaling);
  const Index p = std::min({B.cols(), B.rows(), A.cols()});
  const Eigen::MatrixXd Gb = detail::gram_of_columns(B);
  const Eigen::MatrixXd Ga = detail::gram_of_rows(A);
  // a NaN or Inf in a factor reaches its Gram matrix (x² of Inf is Inf): one cheap check
  if (!Gb.allFinite()) lora::detail::fail("lowrank_singular_values: lora_B [{} x {}] contains a NaN or Inf", B.rows(), B.cols());
  if (!Ga.allFinite()) lora::detail::fail("lowrank_singular_values: lora_A [{} x {}] contains a NaN or Inf", A.rows(), A.cols());
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eb(Gb);
  const Eigen::VectorXd root = eb.eigenvalues().cwiseMax(0.0).cwiseSqrt();
  const Eigen::MatrixXd S = eb.eigenvectors() * root.asDiagonal();
  const Eigen::MatrixXd M = S.transpose() * Ga * S;
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> em(M, Eigen::EigenvaluesOnly);
  const Eigen::VectorXd lam = em.eigenvalues();  // ascending
  Vector<double> sigma(p);
  for (Index i = 0; i < p; ++i) sigma(i) = std::abs(scaling) * std::sqrt(std::max(0.0, lam(lam.size() - 1 - i)));
  return sigma;
}

/// Singular values of an adapter's ΔW (see lowrank_singular_values).
template <class S, ScalingPolicy P>
Vector<double> lowrank_singular_values(const LowRankAdapter<S, cpu, P>& ad) {
  return lowrank_singular_values(ad.B(), ad.A(), ad.scaling());
}

/// The top-k truncation of a thin SVD (k ≤ size()).
template <class Scalar>
LowRankSVD<Scalar> truncate(const LowRankSVD<Scalar>& svd, Index k) {
  if (k < 0 || k > svd.size()) lora::detail::fail("truncate: k = {} outside [0, {}]", k, svd.size());
  return {svd.U.leftCols(k), svd.singular_values.head(k), svd.V.leftCols(k)};
}

}  // namespace lora::analysis
