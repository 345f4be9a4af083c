#pragma once
// Subspace similarity of two adapters (Hu et al. 2021, LoRA, §7):
// φ(i, j) = ‖U₁^(i)ᵀ·U₂^(j)‖_F² / min(i, j) ∈ [0, 1], where U^(i) are the top-i
// singular vectors.
//
// Compile time: the non-template functions here are `template <class = void>`, so the
// decompositions (and JSON code) they use are compiled only in files that call them, not in
// every file that includes this header (docs/reliability.md, "Sanitizers").

#include <lora/analysis/lowrank_svd.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <Eigen/Dense>
#include <algorithm>

namespace lora::analysis {

/// φ(i, j) for i = 1..U1.cols(), j = 1..U2.cols(), as a grid (entry (i-1, j-1)).
/// U1 [n × r1] and U2 [n × r2] have orthonormal columns ordered by singular value.
/// One product U₁ᵀU₂ and a 2-D prefix sum of its squares: O(n·r1·r2).
template <class D1, class D2>
Eigen::MatrixXd subspace_similarity(const Eigen::MatrixBase<D1>& U1, const Eigen::MatrixBase<D2>& U2) {
  if (U1.rows() != U2.rows())
    lora::detail::fail("subspace_similarity: the bases live in spaces of dimension {} and {}; they must be equal",
                       U1.rows(), U2.rows());
  const Eigen::MatrixXd P = (U1.template cast<double>().transpose() * U2.template cast<double>()).cwiseAbs2();
  const Index r1 = P.rows(), r2 = P.cols();
  Eigen::MatrixXd S = Eigen::MatrixXd::Zero(r1 + 1, r2 + 1);  // S(i, j) = Σ_{a<i, b<j} P(a, b)
  for (Index i = 0; i < r1; ++i)
    for (Index j = 0; j < r2; ++j) S(i + 1, j + 1) = P(i, j) + S(i, j + 1) + S(i + 1, j) - S(i, j);
  Eigen::MatrixXd phi(r1, r2);
  for (Index i = 1; i <= r1; ++i)
    for (Index j = 1; j <= r2; ++j) phi(i - 1, j - 1) = S(i, j) / static_cast<double>(std::min(i, j));
  return phi;
}

/// Right singular vectors of A [r × in] (in × min(r, in)), ordered by singular
/// value: the input subspace the LoRA paper compares.
template <class Derived>
Eigen::MatrixXd right_singular_vectors(const Eigen::MatrixBase<Derived>& A) {
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(A.rows(), A.rows());
  return lowrank_svd(I, A, 1.0).V;
}

/// Both comparisons of two adapters on one module.
struct ModuleSimilarity {
  Eigen::MatrixXd phi_A;      ///< φ over the right singular vectors of A₁ and A₂
  Eigen::MatrixXd phi_delta;  ///< φ over the right singular vectors of ΔW₁ and ΔW₂
};

/// φ grids of two modules with the same in_features (any ranks).
template <class B1, class A1, class B2, class A2>
ModuleSimilarity module_similarity(const Eigen::MatrixBase<B1>& b1, const Eigen::MatrixBase<A1>& a1, double s1,
                                   const Eigen::MatrixBase<B2>& b2, const Eigen::MatrixBase<A2>& a2, double s2) {
  if (a1.cols() != a2.cols() || b1.rows() != b2.rows())
    lora::detail::fail("module_similarity: ΔW shapes differ: [{} x {}] vs [{} x {}]", b1.rows(), a1.cols(), b2.rows(),
                       a2.cols());
  ModuleSimilarity m;
  m.phi_A = subspace_similarity(right_singular_vectors(a1), right_singular_vectors(a2));
  m.phi_delta = subspace_similarity(lowrank_svd(b1, a1, s1).V, lowrank_svd(b2, a2, s2).V);
  return m;
}

/// Mean of φ over a grid: a one-number summary (1 for identical subspaces).
inline double mean_similarity(const Eigen::MatrixXd& phi) { return phi.size() ? phi.mean() : 0.0; }

}  // namespace lora::analysis

// ---- whole PEFT adapters -----------------------------------------------------
#include <lora/io/peft.hpp>

#include <string>
#include <vector>

namespace lora::analysis {

/// φ grids of one module that two adapters share.
struct NamedSimilarity {
  std::string name;
  Index rank1 = 0, rank2 = 0;
  ModuleSimilarity similarity;
};

/// module_similarity for every module the two adapters have in common (sorted by name).
template <class = void>
inline std::vector<NamedSimilarity> adapter_similarity(const io::PeftAdapter& a, const io::PeftAdapter& b) {
  io::require_modules_only(a, "similarity");
  io::require_modules_only(b, "similarity");
  std::vector<NamedSimilarity> out;
  for (const auto& m : a.modules) {
    const io::PeftModule* n = b.find(m.name);
    if (!n) continue;
    const auto& x = m.adapter;
    const auto& y = n->adapter;
    if (x.in_features() != y.in_features() || x.out_features() != y.out_features())
      lora::detail::fail("module '{}': ΔW is [{} x {}] in the first adapter and [{} x {}] in the second", m.name,
                         x.out_features(), x.in_features(), y.out_features(), y.in_features());
    out.push_back({m.name, x.rank(), y.rank(), module_similarity(x.B(), x.A(), x.scaling(), y.B(), y.A(), y.scaling())});
  }
  return out;
}

}  // namespace lora::analysis
