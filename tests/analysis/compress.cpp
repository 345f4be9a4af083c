// Eckart–Young compression against a dense truncated SVD.
#include <lora/analysis/compress.hpp>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;
using lora::test::rel_error;

TEST_CASE("best_rank_k is the truncated SVD of s·B·A", "[analysis][compress]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const MatD B = lora::test::random_matrix(45, 10, gen), A = lora::test::random_matrix(10, 33, gen);
  const double s = 1.5;
  const MatD dw = s * B * A;
  Eigen::BDCSVD<Eigen::MatrixXd> svd(dw, Eigen::ComputeThinU | Eigen::ComputeThinV);
  for (Index k : {1, 4, 10}) {
    for (double s_new : {1.0, 0.25, -2.0}) {
      INFO("k " << k << " s_new " << s_new);
      const auto f = best_rank_k(B, A, s, k, s_new);
      REQUIRE(f.rank() == k);
      REQUIRE(f.B.rows() == 45);
      REQUIRE(f.A.cols() == 33);
      const MatD want = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal() *
                        svd.matrixV().leftCols(k).transpose();
      CHECK(rel_error(MatD(s_new * f.B * f.A), want) < 1e-9);
      // Eckart–Young error
      const double err = (dw - s_new * f.B * f.A).norm();
      CHECK(err == Approx(svd.singularValues().segment(k, 10 - k).norm()).margin(1e-9 * dw.norm()));
      // balanced: the columns of B and rows of A have equal norms
      for (Index i = 0; i < k; ++i) CHECK(f.B.col(i).norm() == Approx(f.A.row(i).norm()).epsilon(1e-9));
    }
  }
  CHECK_THROWS_AS(best_rank_k(B, A, s, 0, 1.0), lora::error);
  CHECK_THROWS_AS(best_rank_k(B, A, s, 11, 1.0), lora::error);
  CHECK_THROWS_AS(best_rank_k(B, A, s, 2, 0.0), lora::error);
}

TEST_CASE("compression target picks k by rank or energy", "[analysis][compress]") {
  Vector<double> sigma(6);
  sigma << 10, 3, 1, 0.5, 0.1, 0;
  CHECK(CompressionTarget{.rank = 4}.rank_for(sigma, 6) == 4);
  CHECK(CompressionTarget{.rank = 9}.rank_for(sigma, 6) == 6);
  CHECK(CompressionTarget{.energy = 0.9}.rank_for(sigma, 6) == 1);
  CHECK(CompressionTarget{.energy = 0.98}.rank_for(sigma, 6) == 2);  // 109/110.26 = 0.9886
  CHECK(CompressionTarget{.energy = 0.99}.rank_for(sigma, 6) == 3);
  Vector<double> zero = Vector<double>::Zero(3);
  CHECK(CompressionTarget{.energy = 0.9}.rank_for(zero, 3) == 1);
  CHECK_THROWS_AS(CompressionTarget{}.rank_for(sigma, 6), lora::error);
}

#include <lora/io/peft.hpp>

TEST_CASE("compress_adapter keeps the top-k part of every module", "[analysis][compress][peft]") {
  const auto in = io::load_peft_adapter(std::string(LORA_TEST_DATA_DIR) + "/peft/patterns_all/adapter");
  for (const auto& target : {CompressionTarget{.rank = 3}, CompressionTarget{.energy = 0.9}}) {
    const auto out = compress_adapter(in, target);
    REQUIRE(out.modules.size() == in.modules.size());
    for (std::size_t i = 0; i < in.modules.size(); ++i) {
      const auto& a = in.modules[i].adapter;
      const auto& b = out.modules[i].adapter;
      INFO(in.modules[i].name);
      const MatD dw = a.delta_weight().cast<double>();
      Eigen::BDCSVD<Eigen::MatrixXd> svd(dw, Eigen::ComputeThinU | Eigen::ComputeThinV);
      const Index k = b.rank();
      CHECK(k == target.rank_for(svd.singularValues().head(a.rank()), a.rank()));
      CHECK(b.alpha() == a.alpha());
      const MatD want = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal() *
                        svd.matrixV().leftCols(k).transpose();
      CHECK(rel_error(b.delta_weight(), want) < 1e-5);
    }
    // saved and loaded again, PEFT's rank_pattern rules give every module its k
    const auto dir = std::filesystem::temp_directory_path() / fmt::format("lora_compress_{}", lora::test::fresh_seed());
    io::save_peft_adapter(dir, out);
    const auto back = io::load_peft_adapter(dir);
    std::filesystem::remove_all(dir);
    REQUIRE(back.modules.size() == out.modules.size());
    for (std::size_t i = 0; i < out.modules.size(); ++i) {
      CHECK(back.modules[i].adapter.rank() == out.modules[i].adapter.rank());
      CHECK(rel_error(back.modules[i].adapter.delta_weight(), out.modules[i].adapter.delta_weight()) < 1e-6);
    }
  }
}

TEST_CASE("compress_adapter carries whole tensors, token rows and biases, and reports each module",
          "[analysis][compress][peft]") {
  for (const char* name : {"modules_to_save_lm_head", "lora_bias", "trainable_tokens"}) {
    INFO(name);
    const auto in = io::load_peft_adapter(std::string(LORA_TEST_DATA_DIR) + "/peft/" + name + "/adapter");
    std::vector<std::size_t> seen;
    const auto out = compress_adapter(in, CompressionTarget{.rank = 2},
                                      [&](std::size_t done, std::size_t total, const std::string& module) {
                                        CHECK(total == in.modules.size());
                                        CHECK(module == in.modules[done - 1].name);
                                        seen.push_back(done);
                                      });
    REQUIRE(seen.size() == in.modules.size());
    for (std::size_t i = 0; i < seen.size(); ++i) CHECK(seen[i] == i + 1);
    REQUIRE(out.saved.size() == in.saved.size());
    for (std::size_t i = 0; i < in.saved.size(); ++i) CHECK(out.saved[i].key == in.saved[i].key);
    REQUIRE(out.trainable_tokens.size() == in.trainable_tokens.size());
    for (std::size_t i = 0; i < in.modules.size(); ++i) {
      REQUIRE(out.modules[i].lora_bias.has_value() == in.modules[i].lora_bias.has_value());
      if (in.modules[i].lora_bias) CHECK((*out.modules[i].lora_bias - *in.modules[i].lora_bias).norm() == 0);
    }
  }
}
