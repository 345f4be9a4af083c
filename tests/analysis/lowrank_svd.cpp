// lowrank_svd and lowrank_singular_values against Eigen's BDCSVD of the formed
// product (float64), and against the PEFT fixtures' svdvals.
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <fstream>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::rel_error;

namespace {

struct Case {
  Index out, in, r;
  Index rank_b = -1, rank_a = -1;  // < r: rank-deficient factor
};

// A random [rows × cols] matrix of rank k (k ≥ min: full rank).
MatD random_rank(Index rows, Index cols, Index k, Generator& gen) {
  if (k < 0 || k >= std::min(rows, cols)) return lora::test::random_matrix(rows, cols, gen);
  return lora::test::random_matrix(rows, k, gen) * lora::test::random_matrix(k, cols, gen);
}

void check_against_dense(const MatD& B, const MatD& A, double s) {
  const MatD dw = s * B * A;
  Eigen::BDCSVD<Eigen::MatrixXd> ref(dw, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const auto svd = analysis::lowrank_svd(B, A, s);
  const Index p = std::min({B.rows(), A.cols(), B.cols()});
  REQUIRE(svd.size() == p);
  REQUIRE(svd.U.rows() == B.rows());
  REQUIRE(svd.V.rows() == A.cols());
  const double s1 = ref.singularValues()(0);
  // singular values to 1e-6 relative (to ‖ΔW‖₂)
  CHECK((svd.singular_values - ref.singularValues().head(p)).cwiseAbs().maxCoeff() <= 1e-6 * s1 + 1e-300);
  // U·Σ·Vᵀ reproduces ΔW, and U, V have orthonormal columns
  CHECK(rel_error(MatD(svd.U * svd.singular_values.asDiagonal() * svd.V.transpose()), dw) < 1e-10);
  CHECK((svd.U.transpose() * svd.U - MatD::Identity(p, p)).cwiseAbs().maxCoeff() < 1e-10);
  CHECK((svd.V.transpose() * svd.V - MatD::Identity(p, p)).cwiseAbs().maxCoeff() < 1e-10);
  // singular vectors of distinct σ agree with the dense ones up to sign
  for (Index i = 0; i + 1 < p; ++i) {
    if (svd.singular_values(i) < 1e-6 * s1) break;
    const double gap = (i == 0 ? 1e300 : svd.singular_values(i - 1) - svd.singular_values(i));
    const double gap2 = svd.singular_values(i) - svd.singular_values(i + 1);
    if (std::min(gap, gap2) < 1e-3 * s1) continue;
    CHECK(std::abs(svd.U.col(i).dot(ref.matrixU().col(i))) == Approx(1.0).epsilon(1e-8));
    CHECK(std::abs(svd.V.col(i).dot(ref.matrixV().col(i))) == Approx(1.0).epsilon(1e-8));
  }
  // the Gram route agrees
  const auto fast = analysis::lowrank_singular_values(B, A, s);
  REQUIRE(fast.size() == p);
  CHECK((fast - ref.singularValues().head(p)).cwiseAbs().maxCoeff() <= 1e-6 * s1 + 1e-300);
}

}  // namespace

TEST_CASE("lowrank_svd equals the dense SVD of s·B·A", "[analysis][lowrank_svd]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const std::vector<Case> cases = {
      {1, 1, 1},         {7, 5, 3},        {5, 7, 3},       {40, 30, 8},      {30, 40, 30},  // r = min(in, out)
      {64, 176, 8},      {12, 9, 9},       {50, 20, 6, 2},  {20, 50, 6, -1, 3},
      {33, 27, 10, 4, 4}, {16, 16, 5, 0},  // B = 0
      {24, 18, 4, 1, 1},
  };
  for (const auto& c : cases) {
    INFO("out " << c.out << " in " << c.in << " r " << c.r << " rank(B) " << c.rank_b << " rank(A) " << c.rank_a);
    MatD B = c.rank_b == 0 ? MatD::Zero(c.out, c.r) : random_rank(c.out, c.r, c.rank_b, gen);
    MatD A = random_rank(c.r, c.in, c.rank_a, gen);
    if (c.rank_b == 0) {
      const auto svd = analysis::lowrank_svd(B, A, 2.0);
      CHECK(svd.singular_values.cwiseAbs().maxCoeff() == 0.0);
      CHECK(analysis::lowrank_singular_values(B, A, 2.0).cwiseAbs().maxCoeff() == 0.0);
      continue;
    }
    const double s = gen.uniform() < 0.5 ? -0.37 : 2.5;
    check_against_dense(B, A, s);
  }
}

TEST_CASE("lowrank_svd accepts float and bf16 factors and computes in double", "[analysis][lowrank_svd]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Matrix<float> B = lora::test::random_matrix<float>(48, 6, gen);
  const Matrix<float> A = lora::test::random_matrix<float>(6, 40, gen);
  const MatD dw = 0.5 * B.cast<double>() * A.cast<double>();  // exact product of the float inputs
  Eigen::BDCSVD<Eigen::MatrixXd> ref(dw);
  const auto svd = analysis::lowrank_svd(B, A, 0.5);
  CHECK(rel_error(svd.singular_values, ref.singularValues().head(6)) < 1e-12);
  // bf16 storage, read through a Map (as from a memory-mapped file)
  const Matrix<bfloat16> Bh = B.cast<bfloat16>(), Ah = A.cast<bfloat16>();
  Eigen::Map<const Matrix<bfloat16>> Bm(Bh.data(), Bh.rows(), Bh.cols()), Am(Ah.data(), Ah.rows(), Ah.cols());
  const MatD dwh = 0.5 * Bh.cast<float>().cast<double>() * Ah.cast<float>().cast<double>();
  Eigen::BDCSVD<Eigen::MatrixXd> refh(dwh);
  CHECK(rel_error(analysis::lowrank_singular_values(Bm, Am, 0.5), refh.singularValues().head(6)) < 1e-10);
  CHECK(rel_error(analysis::lowrank_svd(Bm, Am, 0.5).singular_values, refh.singularValues().head(6)) < 1e-12);
  // the adapter overload, with fan_in_fan_out swapping the roles of U and V
  auto ad = LowRankAdapter<float>::from_factors(A, B, 12.0);  // s = 2
  const auto a = analysis::lowrank_svd(ad);
  CHECK(rel_error(MatD(a.U * a.singular_values.asDiagonal() * a.V.transpose()), ad.delta_weight()) < 1e-6);
  auto adt = LowRankAdapter<float>::from_factors(A, B, 12.0, AdapterOptions{.fan_in_fan_out = true});
  const auto t = analysis::lowrank_svd(adt);
  CHECK(rel_error(MatD(t.U * t.singular_values.asDiagonal() * t.V.transpose()), adt.delta_weight()) < 1e-6);
}

TEST_CASE("lowrank_svd rejects mismatched factors", "[analysis][lowrank_svd]") {
  MatD B = MatD::Ones(4, 3), A = MatD::Ones(2, 5);
  CHECK_THROWS_WITH(analysis::lowrank_svd(B, A, 1.0), Catch::Matchers::ContainsSubstring("lora_B is [4 x 3]"));
  CHECK_THROWS_AS(analysis::lowrank_singular_values(B, A, 1.0), lora::error);
  MatD B2 = MatD::Ones(4, 2);
  CHECK_THROWS_WITH(analysis::lowrank_svd(B2, A, std::nan("")), Catch::Matchers::ContainsSubstring("finite"));
}

TEST_CASE("lowrank singular values match the PEFT fixtures' svdvals", "[analysis][lowrank_svd][peft]") {
  const std::string root = LORA_TEST_DATA_DIR;
  int modules = 0;
  for (const std::string name : {"lora_r8_a16_all", "rslora_r16_a8_attn", "patterns_all", "dora_r4_a8_qv"}) {
    std::ifstream cfg_in(root + "/peft/" + name + "/adapter/adapter_config.json");
    const auto cfg = nlohmann::json::parse(cfg_in);
    const bool rs = cfg["use_rslora"];
    auto adapter = io::SafetensorsFile::open(root + "/peft/" + name + "/adapter/adapter_model.safetensors");
    auto ref = io::SafetensorsFile::open(root + "/peft/" + name + "/reference.safetensors");
    for (const auto& key : ref.names()) {
      const std::string suffix = ".svdvals";
      if (key.size() < suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
      const std::string module = key.substr(0, key.size() - suffix.size());
      INFO(name << ": " << module);
      const auto A = adapter.tensor("base_model.model." + module + ".lora_A.weight").to_matrix<float>();
      const auto B = adapter.tensor("base_model.model." + module + ".lora_B.weight").to_matrix<float>();
      const Index r = A.rows();
      // alpha from alpha_pattern (keys are module-name suffixes) or lora_alpha
      double alpha = cfg["lora_alpha"];
      for (auto& [k, v] : cfg["alpha_pattern"].items())
        if (module.size() >= k.size() && module.compare(module.size() - k.size(), k.size(), k) == 0) alpha = v;
      const double s = rs ? alpha / std::sqrt(double(r)) : alpha / double(r);
      const auto want = ref.tensor(key).to_vector<double>();
      const auto svd = analysis::lowrank_svd(B, A, s);
      const auto fast = analysis::lowrank_singular_values(B, A, s);
      REQUIRE(svd.size() == r);
      for (Index i = 0; i < r; ++i) {
        CHECK(svd.singular_values(i) == Approx(want[i]).margin(1e-6 * want[0]).epsilon(1e-5));
        CHECK(fast(i) == Approx(want[i]).margin(1e-6 * want[0]).epsilon(1e-5));
      }
      for (std::size_t i = r; i < want.size(); ++i) CHECK(want[i] < 1e-5 * want[0]);  // float32 noise of the dense SVD
      ++modules;
    }
  }
  CHECK(modules > 20);
}
