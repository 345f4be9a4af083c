// Weighted combination against PEFT 0.21's add_weighted_adapter
// (tests/data/peft/weighted_combos) and against the dense definitions.
#include <lora/analysis/combine.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <fstream>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;
using lora::test::rel_error;

TEST_CASE("combinations equal PEFT's add_weighted_adapter", "[analysis][combine][peft]") {
  const std::string root = std::string(LORA_TEST_DATA_DIR) + "/peft/weighted_combos";
  std::ifstream cin_(root + "/combinations.json");
  const auto combos = nlohmann::json::parse(cin_);
  auto ref = io::SafetensorsFile::open(root + "/reference.safetensors");
  std::map<std::string, nlohmann::json> cfg;
  std::map<std::string, io::SafetensorsFile> files;
  for (const std::string name : {"a1", "a2", "a3"}) {
    std::ifstream in(root + "/adapters/" + name + "/adapter_config.json");
    cfg[name] = nlohmann::json::parse(in);
    files.emplace(name, io::SafetensorsFile::open(root + "/adapters/" + name + "/adapter_model.safetensors"));
  }
  int checked = 0;
  for (auto& [combo, spec] : combos.items()) {
    const auto type = parse_combination_type(spec["combination_type"].get<std::string>());
    for (const std::string module : {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                     "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}) {
      INFO(combo << " " << module);
      std::vector<WeightedFactors> in;
      Index sum_r = 0;
      for (std::size_t i = 0; i < spec["adapters"].size(); ++i) {
        const std::string name = spec["adapters"][i];
        const auto& f = files.at(name);
        WeightedFactors w;
        w.A = f.tensor("base_model.model." + module + ".lora_A.weight").to_matrix<double>();
        w.B = f.tensor("base_model.model." + module + ".lora_B.weight").to_matrix<double>();
        const double r = cfg[name]["r"], alpha = cfg[name]["lora_alpha"];
        w.scaling = alpha / r;
        w.weight = spec["weights"][i];
        sum_r += w.A.rows();
        in.push_back(std::move(w));
      }
      const Index new_rank = type == combination_type::svd ? spec["svd_rank"].get<Index>()
                             : type == combination_type::cat ? sum_r
                                                             : in[0].A.rows();
      const auto f = combine(in, type, new_rank);
      const auto want_B = ref.tensor(module + "." + combo + ".lora_B").to_matrix<double>();
      const auto want_A = ref.tensor(module + "." + combo + ".lora_A").to_matrix<double>();
      const double new_scaling = ref.tensor(module + "." + combo + ".scaling").at<double>(0);
      CHECK(new_scaling == 1.0);  // PEFT: lora_alpha = r of the new adapter
      REQUIRE(f.A.rows() == want_A.rows());
      REQUIRE(f.B.cols() == want_B.cols());
      const auto want = ref.tensor(module + "." + combo + ".delta_weight").to_matrix<double>();
      CHECK(rel_error(MatD(new_scaling * f.B * f.A), want) < 1e-5);
      if (type != combination_type::svd) {  // svd factors may differ in sign
        CHECK(rel_error(f.A, want_A) < 1e-6);
        CHECK(rel_error(f.B, want_B) < 1e-6);
      } else {
        for (Index i = 0; i < f.A.rows(); ++i) CHECK(f.B.col(i).norm() == Approx(want_B.col(i).norm()).epsilon(1e-4));
      }
      ++checked;
    }
  }
  CHECK(checked == 12);
}

TEST_CASE("combine_svd is the truncated SVD of Σ w·s·B·A; cat and linear by definition", "[analysis][combine]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  std::vector<WeightedFactors> in(3);
  const Index ranks[3] = {4, 6, 4};
  for (int i = 0; i < 3; ++i) {
    in[i].B = lora::test::random_matrix(30, ranks[i], gen);
    in[i].A = lora::test::random_matrix(ranks[i], 20, gen);
    in[i].scaling = 0.5 + i;
    in[i].weight = i == 1 ? -0.7 : 0.4;
  }
  MatD D = MatD::Zero(30, 20);
  for (auto& w : in) D += w.weight * w.scaling * w.B * w.A;
  Eigen::BDCSVD<Eigen::MatrixXd> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const auto f = combine_svd(in, 5);
  const MatD want = svd.matrixU().leftCols(5) * svd.singularValues().head(5).asDiagonal() *
                    svd.matrixV().leftCols(5).transpose();
  CHECK(rel_error(MatD(f.B * f.A), want) < 1e-10);
  CHECK((f.A * f.A.transpose() - MatD::Identity(5, 5)).cwiseAbs().maxCoeff() < 1e-10);  // A = V_kᵀ
  // rank beyond the spectrum pads with zeros
  const auto big = combine_svd(in, 20);
  CHECK(big.rank() == 20);
  CHECK(rel_error(MatD(big.B * big.A), D) < 1e-10);
  // cat: exact sum Σ w·s·B·A
  MatD S = MatD::Zero(30, 20);
  for (auto& w : in) S += w.weight * w.scaling * w.B * w.A;
  const auto c = combine_cat(in, 16);
  CHECK(rel_error(MatD(c.B * c.A), S) < 1e-12);
  CHECK_THROWS_AS(combine_cat(in, 10), lora::error);
  // linear: needs equal ranks
  CHECK_THROWS_WITH(combine_linear(in), Catch::Matchers::ContainsSubstring("same r"));
  std::vector<WeightedFactors> two = {in[0], in[2]};
  const auto l = combine_linear(two);
  MatD Bl = MatD::Zero(30, 4), Al = MatD::Zero(4, 20);
  for (auto& w : two) {
    const double c2 = w.weight * w.scaling;
    Bl += std::sqrt(std::abs(c2)) * w.B;
    Al += (c2 < 0 ? -1 : 1) * std::sqrt(std::abs(c2)) * w.A;
  }
  CHECK(rel_error(l.B, Bl) < 1e-14);
  CHECK(rel_error(l.A, Al) < 1e-14);
  CHECK_THROWS_WITH(parse_combination_type("ties"), Catch::Matchers::ContainsSubstring("svd, cat or linear"));
}

TEST_CASE("combine_adapters on PEFT folders equals the fixtures", "[analysis][combine][peft]") {
  const std::string root = std::string(LORA_TEST_DATA_DIR) + "/peft/weighted_combos";
  std::ifstream cin_(root + "/combinations.json");
  const auto combos = nlohmann::json::parse(cin_);
  auto ref = io::SafetensorsFile::open(root + "/reference.safetensors");
  std::map<std::string, io::PeftAdapter> ads;
  for (const std::string name : {"a1", "a2", "a3"}) ads[name] = io::load_peft_adapter(root + "/adapters/" + name);
  int checked = 0;
  for (auto& [combo, spec] : combos.items()) {
    std::vector<const io::PeftAdapter*> in;
    std::vector<double> w;
    for (std::size_t i = 0; i < spec["adapters"].size(); ++i) {
      in.push_back(&ads.at(spec["adapters"][i].get<std::string>()));
      w.push_back(spec["weights"][i]);
    }
    const auto type = parse_combination_type(spec["combination_type"].get<std::string>());
    const auto out = combine_adapters(in, w, type, spec.contains("svd_rank") ? spec["svd_rank"].get<Index>() : 0);
    CHECK(out.config.lora_alpha == out.config.r);
    CHECK_FALSE(out.config.use_rslora);
    REQUIRE(out.modules.size() == 6);
    for (const auto& m : out.modules) {
      INFO(combo << " " << m.name);
      CHECK(m.adapter.scaling() == 1.0);
      const auto want = ref.tensor(m.name + "." + combo + ".delta_weight").to_matrix<double>();
      CHECK(rel_error(m.adapter.delta_weight(), want) < 1e-5);
      ++checked;
    }
  }
  CHECK(checked == 18);
  CHECK_THROWS_WITH(combine_adapters({&ads["a1"]}, {1.0, 2.0}, combination_type::cat),
                    Catch::Matchers::ContainsSubstring("one weight per adapter"));
}
