// LoftQ against the PEFT-algorithm fixture (tests/data/peft/loftq: PEFT's loftq_init with
// bitsandbytes' NF4 rule, see shared/fixtures/README-peft-batch2.md) and against its own
// definition on fresh random weights.
#include <lora/io/safetensors.hpp>
#include <lora/quant/loftq.hpp>

#include <nlohmann/json.hpp>

#include <fstream>

#include "support/catch.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::MatD;
using lora::test::rel_error;

TEST_CASE("loftq_init equals PEFT's LoftQ on the fixture (iter 1 and 3)", "[quant][loftq][peft]") {
  const std::string root = std::string(LORA_TEST_DATA_DIR) + "/peft/loftq";
  auto ref = io::SafetensorsFile::open(root + "/reference.safetensors");
  auto base = io::SafetensorsFile::open(root + "/base_weights.safetensors");
  const int layers = lora::test::layers_of(root + "/base_weights.safetensors");  // q, v, down of each
  int checked = 0;
  for (const std::string run : {"iter1", "iter3"}) {
    std::ifstream cfg_in(root + "/" + run + "/adapter_config.json");
    const auto cfg = nlohmann::json::parse(cfg_in);
    quant::LoftQOptions opt;
    opt.rank = cfg["r"];
    opt.iterations = cfg["loftq_config"]["loftq_iter"];
    for (int layer = 0; layer < layers; ++layer)
      for (const std::string m : {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}) {
        const std::string mod = fmt::format("model.layers.{}.{}", layer, m), key = run + "." + mod;
        INFO(key);
        const Matrix<float> W = base.tensor(mod + ".weight").to_matrix<float>();
        const auto got = quant::loftq_init(W, opt);
        // codes and absmax: iteration 1 quantises W itself (bit-exact); later ones quantise a
        // float32 W − L·R whose last bit may differ from torch's GEMM
        const auto packed = ref.tensor(key + ".nf4_packed").to_vector<std::uint8_t>();
        const auto absmax = ref.tensor(key + ".nf4_absmax").to_vector<float>();
        REQUIRE(packed.size() == got.packed.size());
        REQUIRE(absmax.size() == got.absmax.size());
        std::size_t differ = 0;
        for (std::size_t i = 0; i < packed.size(); ++i) differ += packed[i] != got.packed[i];
        if (opt.iterations == 1) {
          CHECK(differ == 0);
          CHECK(absmax == got.absmax);
        } else {
          CHECK(differ <= packed.size() / 1000);
          for (std::size_t b = 0; b < absmax.size(); ++b) CHECK(got.absmax[b] == Approx(absmax[b]).epsilon(1e-6));
        }
        const MatD res = ref.tensor(key + ".residual_weight").to_matrix<double>();
        CHECK(rel_error(MatD(got.residual_weight.cast<double>()), res) < 1e-6);
        // L·R is unique; L and R up to one sign per rank-one term
        const MatD A = ref.tensor(key + ".lora_A").to_matrix<double>(), B = ref.tensor(key + ".lora_B").to_matrix<double>();
        MatD gA = got.A.cast<double>(), gB = got.B.cast<double>();
        CHECK(rel_error(MatD(gB * gA), MatD(B * A)) < 2e-5);
        for (Index i = 0; i < gA.rows(); ++i)
          if (gA.row(i).dot(A.row(i)) < 0) gA.row(i) *= -1, gB.col(i) *= -1;
        CHECK(rel_error(gA, A) < 1e-4);
        CHECK(rel_error(gB, B) < 1e-4);
        // PEFT does not divide L·R by the scaling (iter3: alpha 8, r 4, scaling 2)
        CHECK(ref.tensor(key + ".scaling").at<double>(0) == Approx(double(cfg["lora_alpha"]) / opt.rank));
        const auto err = ref.tensor(key + ".err_fro").to_vector<double>();
        const auto qerr = ref.tensor(key + ".quant_err_fro").to_vector<double>();
        REQUIRE(got.error.size() == err.size());
        for (std::size_t t = 0; t < err.size(); ++t) {
          CHECK(got.error[t] == Approx(err[t]).epsilon(1e-5));
          CHECK(got.quant_error[t] == Approx(qerr[t]).epsilon(1e-5));
        }
        ++checked;
      }
  }
  // every module of the reference, of both runs, was checked
  CHECK(checked == lora::test::count_ending(ref, ".lora_A"));
  CHECK(checked == 2 * 3 * layers);
}

TEST_CASE("loftq_init: the definition, the scaling option, randomized SVD", "[quant][loftq]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Index out = 96, in = 160, r = 6;
  const Matrix<float> W = lora::test::random_matrix(out, in, gen, 0.02).cast<float>();
  quant::LoftQOptions opt;
  opt.rank = r;
  opt.iterations = 4;
  const auto got = quant::loftq_init(W, opt);
  // the reference loop, written out: quantise the residual, rank-r SVD of W − Q, repeat
  const MatD Wd = W.cast<double>();
  Matrix<float> res = W, Q(out, in);
  MatD LR;
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(quant::packed_bytes(out * in)));
  std::vector<float> absmax(static_cast<std::size_t>(quant::num_blocks(out * in, 64)));
  for (int t = 0; t < opt.iterations; ++t) {
    quant::nf4_quantize(res.data(), out * in, 64, packed.data(), absmax.data());
    quant::nf4_dequantize(packed.data(), absmax.data(), out * in, 64, Q.data());
    Eigen::JacobiSVD<MatD> svd(Wd - Q.cast<double>(), Eigen::ComputeThinU | Eigen::ComputeThinV);
    LR = svd.matrixU().leftCols(r) * svd.singularValues().head(r).asDiagonal() * svd.matrixV().leftCols(r).transpose();
    CHECK(got.error[static_cast<std::size_t>(t)] == Approx((Wd - Q.cast<double>() - LR).norm()).epsilon(1e-9));
    res = (Wd - LR).cast<float>();
  }
  CHECK(rel_error(MatD(got.B.cast<double>() * got.A.cast<double>()), LR) < 1e-6);
  CHECK(got.residual_weight == Q);
  // LoftQ beats plain QLoRA (B = 0: error ‖W − deq(NF4(W))‖ = quant_error[0])
  CHECK(got.error.back() < got.quant_error.front());
  // divide_by_scaling: s·B·A = L·R
  opt.scaling = 4.0;
  opt.divide_by_scaling = true;
  const auto scaled = quant::loftq_init(W, opt);
  CHECK(rel_error(MatD(4.0 * scaled.B.cast<double>() * scaled.A.cast<double>()), LR) < 1e-6);
  // randomized SVD: close to the exact top-r error
  opt.divide_by_scaling = false;
  opt.randomized = true;
  const auto rnd = quant::loftq_init(W, opt);
  CHECK(rnd.error.back() == Approx(got.error.back()).epsilon(0.02));
  opt.rank = 97;
  CHECK_THROWS_WITH(quant::loftq_init(W, opt), Catch::Matchers::ContainsSubstring("rank 97 outside"));
}
