// PiSSA and OLoRA initialisers (include/lora/core/init_svd.hpp) against PEFT's fixtures
// (tests/data/peft/init_pissa, init_olora) and against their defining properties.
#include <lora/core/adapter.hpp>
#include <lora/core/init_svd.hpp>
#include <lora/io/safetensors.hpp>

#include <Eigen/SVD>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::MatD;
using lora::test::random_matrix;
using lora::test::rel_error;

namespace {

// Compares (A, B) with PEFT's up to a sign per rank-one pair (A row i and B column i flip together).
void check_factors(const Matrix<float>& A, const Matrix<float>& B, const Matrix<float>& Aref, const Matrix<float>& Bref,
                   bool allow_flip, double tol) {
  REQUIRE(A.rows() == Aref.rows());
  Matrix<float> As = A, Bs = B;
  for (Index i = 0; i < A.rows(); ++i) {
    const float d = A.row(i).dot(Aref.row(i));
    if (allow_flip && d < 0) {
      As.row(i) *= -1.0f;
      Bs.col(i) *= -1.0f;
    }
  }
  CHECK(rel_error(As, Aref) < tol);
  CHECK(rel_error(Bs, Bref) < tol);
}

int check_fixture(const std::string& kind) {
  auto base = io::SafetensorsFile::open(data("peft/init_" + kind + "/base/model.safetensors"));
  auto ref = io::SafetensorsFile::open(data("peft/init_" + kind + "/reference.safetensors"));
  int n = 0;
  for (const auto& key : ref.names()) {
    const std::string suf = ".lora_A";
    if (key.size() < suf.size() || key.compare(key.size() - suf.size(), suf.size(), suf) != 0) continue;
    const std::string m = key.substr(0, key.size() - suf.size());
    INFO(kind << ": " << m);
    Matrix<float> W = base.tensor(m + ".weight").to_matrix<float>();
    const Matrix<float> W0 = W;
    const auto Aref = ref.tensor(m + ".lora_A").to_matrix<float>();
    const auto Bref = ref.tensor(m + ".lora_B").to_matrix<float>();
    const auto Rref = ref.tensor(m + ".residual_weight").to_matrix<float>();
    const double s = ref.tensor(m + ".scaling").at<double>(0);
    const Index r = Aref.rows();
    LowRankAdapter<float> ad(W.cols(), W.rows(), r, s * static_cast<double>(r));  // alpha/r = s
    REQUIRE(ad.scaling() == Approx(s));
    if (kind == "pissa")
      initialize_pissa(ad, W);
    else
      initialize_olora(ad, W);
    // PEFT runs LAPACK in float32, we run Eigen in float64: agreement to float32 accuracy.
    check_factors(ad.A(), ad.B(), Aref, Bref, /*allow_flip=*/kind == "pissa", 2e-5);
    // The residual W − s·B·A does not depend on the signs.
    CHECK(rel_error(W, Rref) < 1e-5);
    CHECK(test::max_abs_diff(W, Rref) < 1e-5);
    // and the adapted layer equals the original one
    CHECK(rel_error(MatD(W.cast<double>() + ad.delta_weight().cast<double>()), W0) < 1e-6);
    ++n;
  }
  return n;
}
}  // namespace

// Each fixture initialises q_proj and down_proj of every layer of its base.
TEST_CASE("PiSSA matches PEFT's init_pissa fixture", "[init][peft]") {
  CHECK(check_fixture("pissa") == 2 * lora::test::layers_of(data("peft/init_pissa/base/model.safetensors")));
}
TEST_CASE("OLoRA matches PEFT's init_olora fixture", "[init][peft]") {
  CHECK(check_fixture("olora") == 2 * lora::test::layers_of(data("peft/init_olora/base/model.safetensors")));
}

TEST_CASE("PiSSA: s·B·A is the best rank-r approximation, split evenly", "[init]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (auto [out, in, r] : {std::tuple{20, 13, 3}, {9, 30, 5}, {12, 12, 12}}) {
    const MatD W = random_matrix(out, in, gen);
    const double s = gen.uniform(0.2, 5.0);
    auto f = pissa_factors<double>(W, r, s);
    Eigen::JacobiSVD<MatD> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const MatD best = svd.matrixU().leftCols(r) * svd.singularValues().head(r).asDiagonal() *
                      svd.matrixV().leftCols(r).transpose();
    CHECK(rel_error(MatD(s * f.B * f.A), best) < 1e-12);
    CHECK(rel_error(MatD(f.residual + s * f.B * f.A), W) < 1e-14);
    // A·Aᵀ = Bᵀ·B = diag(σ/s): orthogonal rows / columns with equal shares of σ
    const MatD want = (svd.singularValues().head(r) / s).asDiagonal();
    CHECK(rel_error(MatD(f.A * f.A.transpose()), want) < 1e-12);
    CHECK(rel_error(MatD(f.B.transpose() * f.B), want) < 1e-12);
  }
}

TEST_CASE("PiSSA with the randomised SVD (pissa_niter_k) approaches the exact one", "[init]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  // a spectrum with a gap after r = 4
  const Index out = 40, in = 25, r = 4;
  MatD U = detail::thin_q(random_matrix(out, in, gen)), V = detail::thin_q(random_matrix(in, in, gen));
  Eigen::VectorXd sig(in);
  for (Index i = 0; i < in; ++i) sig(i) = i < r ? 10.0 - i : 0.1 * std::pow(0.8, double(i));
  const MatD W = U * sig.asDiagonal() * V.transpose();
  const auto exact = pissa_factors<double>(W, r, 2.0);
  const auto approx = pissa_factors<double>(W, r, 2.0, 4, &gen);
  CHECK(rel_error(MatD(approx.B * approx.A), MatD(exact.B * exact.A)) < 1e-8);
  CHECK(rel_error(MatD(approx.residual), MatD(exact.residual)) < 1e-6);
  CHECK_THROWS_WITH(pissa_factors<double>(W, r, 2.0, 2, nullptr), Catch::Matchers::ContainsSubstring("needs a Generator"));
  // wide matrices take the transposed path
  const MatD Wt = W.transpose();
  const auto wide = pissa_factors<double>(Wt, r, 2.0, 4, &gen);
  CHECK(rel_error(MatD(wide.B * wide.A), MatD(exact.B * exact.A).transpose()) < 1e-8);
}

TEST_CASE("OLoRA: B has orthonormal columns, A is upper triangular, Q·R = W", "[init]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  for (auto [out, in, r] : {std::tuple{20, 13, 3}, {9, 30, 5}}) {
    const MatD W = random_matrix(out, in, gen);
    const double s = gen.uniform(0.2, 5.0);
    auto f = olora_factors<double>(W, r, s);
    CHECK(rel_error(MatD(f.B.transpose() * f.B), MatD::Identity(r, r)) < 1e-13);
    for (Index i = 0; i < r; ++i)
      for (Index j = 0; j < i; ++j) CHECK(f.A(i, j) == 0.0);
    CHECK(rel_error(MatD(f.residual + s * f.B * f.A), W) < 1e-14);
    // The full-rank QR reproduces W: with r = min(out, in) the residual is (numerically) zero.
    const Index k = std::min(out, in);
    auto full = olora_factors<double>(W, k, 1.0);
    CHECK(full.residual.norm() < 1e-12 * W.norm());
    // LAPACK's convention: the first Householder step gives R₀₀ = −sign(W₀₀)·‖W[:,0]‖
    CHECK(f.A(0, 0) == Approx(-std::copysign(W.col(0).norm(), W(0, 0))).epsilon(1e-12));
  }
}

TEST_CASE("PiSSA with fan_in_fan_out and bad inputs", "[init]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD W = random_matrix(10, 7, gen);  // [out × in]
  LowRankAdapter<double> a(7, 10, 3, 6.0);
  MatD Wa = W;
  initialize_pissa(a, Wa);
  AdapterOptions o;
  o.fan_in_fan_out = true;
  LowRankAdapter<double> b(7, 10, 3, 6.0, o);
  MatD Wb = W.transpose();  // Conv1D stores [in × out]
  initialize_pissa(b, Wb);
  CHECK(rel_error(MatD(b.B() * b.A()), MatD(a.B() * a.A())) < 1e-12);
  CHECK(rel_error(MatD(Wb.transpose()), Wa) < 1e-12);
  MatD bad = random_matrix(9, 7, gen);
  CHECK_THROWS_WITH(initialize_pissa(a, bad), Catch::Matchers::ContainsSubstring("W has shape [9 x 7], expected [10 x 7]"));
  CHECK_THROWS_WITH(initialize_olora(b, Wb), Catch::Matchers::ContainsSubstring("fan_in_fan_out"));
  CHECK_THROWS_WITH(olora_factors<double>(W, 8, 1.0), Catch::Matchers::ContainsSubstring("rank r = 8 must be in [1, min(out, in)] = [1, 7]"));
}
