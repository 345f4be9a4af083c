// include/lora/analysis/inspect.hpp: inspect_adapter against a float64 SVD of each fixture
// module (from the folder and from an adapter in memory), its config checks, and the
// natural order of module names; spectral_spikes on clean and combined adapters.
#include <lora/analysis/inspect.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;
using lora::test::MatD;

TEST_CASE("inspect_adapter: spectra equal a float64 SVD of s·B·A; config and tensors must agree",
          "[analysis][inspect]") {
  namespace fs = std::filesystem;
  const fs::path data = fs::path(LORA_TEST_DATA_DIR) / "peft";
  for (const char* c : {"lora_r8_a16_all", "dora_r4_a8_qv"}) {
    INFO(c);
    const fs::path folder = data / c / "adapter";
    const auto rep = inspect_adapter(folder, {.threads = 1});
    const auto f = io::SafetensorsFile::open(folder / "adapter_model.safetensors");
    REQUIRE(!rep.modules.empty());
    for (const auto& m : rep.modules) {
      const std::string k = "base_model.model." + m.name;
      const MatD A = f.tensor(k + ".lora_A.weight").to_matrix<double>();
      const MatD B = f.tensor(k + ".lora_B.weight").to_matrix<double>();
      const MatD dW = m.scaling * B * A;
      const Eigen::VectorXd want = Eigen::JacobiSVD<Eigen::MatrixXd>(dW).singularValues().head(m.singular_values.size());
      CHECK((m.singular_values - want).cwiseAbs().maxCoeff() <= 1e-5 * want(0));
    }
    // the in-memory overload reports the same modules, in the same order, with the same spectra
    const auto mem = inspect_adapter(io::load_peft_adapter(folder), {.threads = 1});
    REQUIRE(mem.modules.size() == rep.modules.size());
    for (std::size_t i = 0; i < rep.modules.size(); ++i) {
      CHECK(mem.modules[i].name == rep.modules[i].name);
      CHECK(mem.modules[i].rank == rep.modules[i].rank);
      const auto& a = mem.modules[i].singular_values;
      const auto& b = rep.modules[i].singular_values;
      REQUIRE(a.size() == b.size());
      CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-5 * b(0));
    }
    CHECK(mem.parameters == rep.parameters);
  }
  // use_dora must match the magnitude tensors, as when loading
  const fs::path tmp = fs::temp_directory_path() / fmt::format("lora-test-inspect-{:x}", lora::test::fresh_seed());
  auto flipped = [&](const char* c, bool dora) {
    const fs::path p = tmp / c;
    fs::create_directories(p);
    fs::copy(data / c / "adapter", p, fs::copy_options::recursive);
    nlohmann::ordered_json j;
    std::ifstream(p / "adapter_config.json") >> j;
    j["use_dora"] = dora;
    std::ofstream(p / "adapter_config.json") << j.dump(2);
    return p;
  };
  CHECK_THROWS_WITH(inspect_adapter(flipped("dora_r4_a8_qv", false)), Catch::Matchers::ContainsSubstring("use_dora"));
  CHECK_THROWS_WITH(inspect_adapter(flipped("lora_r8_a16_all", true)), Catch::Matchers::ContainsSubstring("use_dora"));
  std::error_code ec;
  fs::remove_all(tmp, ec);
}

TEST_CASE("natural_less orders digit runs as numbers; module_type is the last component", "[analysis][inspect]") {
  CHECK(natural_less("model.layers.2.mlp", "model.layers.10.mlp"));
  CHECK_FALSE(natural_less("model.layers.10.mlp", "model.layers.2.mlp"));
  CHECK(natural_less("layers.02.q", "layers.3.q"));  // leading zeros do not count
  CHECK_FALSE(natural_less("layers.7.q", "layers.7.q"));
  CHECK(natural_less("layers.7", "layers.7.q"));  // a prefix first
  CHECK(natural_less("a9", "b1"));
  std::vector<std::string> names = {"l.10.v", "l.2.q", "l.1.v", "l.2.k", "l.100.q", "l.10.k"};
  std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) { return natural_less(a, b); });
  CHECK(names == std::vector<std::string>{"l.1.v", "l.2.k", "l.2.q", "l.10.k", "l.10.v", "l.100.q"});
  CHECK(module_type("model.layers.0.self_attn.q_proj") == "q_proj");
  CHECK(module_type("lm_head") == "lm_head");
}

TEST_CASE("spectral_spikes: a combined adapter's spike is flagged, clean ones are not", "[analysis][inspect]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  const Index n = 48, r = 4, layers = 5;
  const auto name = [](Index l, const char* t) { return fmt::format("model.layers.{}.self_attn.{}", l, t); };
  // an adapter with Gaussian factors on q_proj and v_proj of every layer
  auto clean = [&] {
    std::map<std::string, std::pair<MatD, MatD>> ad;  // module → (B, A)
    for (Index l = 0; l < layers; ++l)
      for (const char* t : {"q_proj", "v_proj"})
        ad[name(l, t)] = {lora::test::random_matrix(n, r, gen), lora::test::random_matrix(r, n, gen)};
    return ad;
  };
  // PEFT's "cat" combination: ΔW_X + ΔW_Y as one module of rank r_X + r_Y
  auto cat = [](auto x, const auto& y) {
    for (auto& [m, f] : x) {
      if (!y.count(m)) continue;
      const auto& [By, Ay] = y.at(m);
      MatD B(f.first.rows(), f.first.cols() + By.cols()), A(f.second.rows() + Ay.rows(), f.second.cols());
      B << f.first, By;
      A << f.second, Ay;
      f = {B, A};
    }
    return x;
  };
  auto report = [](const std::map<std::string, std::pair<MatD, MatD>>& ad, double scale) {
    std::vector<ModuleReport> mods;
    for (const auto& [m, f] : ad) {
      ModuleReport rep;
      rep.name = m;
      rep.singular_values = lowrank_singular_values(f.first, f.second, scale);
      mods.push_back(rep);
    }
    return spectral_spikes(mods);
  };
  const auto X = clean(), Y = clean();
  CHECK(report(X, 1.0).empty());
  CHECK(report(cat(X, Y), 1.0).empty());  // two unrelated adapters add incoherently: no spike
  // Y shares X's top direction in layer 2's q_proj, 19 times as strong: they add coherently there
  const std::string hot = name(2, "q_proj");
  auto Yc = Y;
  {
    const MatD D = X.at(hot).first * X.at(hot).second;
    Eigen::JacobiSVD<MatD> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const double s1 = svd.singularValues()(0);
    Yc[hot].first.col(0) = 19 * std::sqrt(s1) * svd.matrixU().col(0);
    Yc[hot].second.row(0) = std::sqrt(s1) * svd.matrixV().col(0).transpose();
    Yc[hot].first.rightCols(r - 1) *= 0.1;
  }
  for (double scale : {1.0, 1e-3}) {  // scale-free
    const auto sp = report(cat(X, Yc), scale);
    REQUIRE(sp.size() == 2);
    CHECK(sp[0].name == hot);
    CHECK(sp[0].kind == "top");
    CHECK(sp[0].ratio > 8);
    CHECK(sp[1].name == hot);
    CHECK(sp[1].kind == "gap");
    CHECK(sp[1].ratio > 8);
  }
  // a stack whose second member covers one module only, at 20x the scale: "top" alone
  std::map<std::string, std::pair<MatD, MatD>> one{
      {name(4, "v_proj"), {20 * lora::test::random_matrix(n, r, gen), lora::test::random_matrix(r, n, gen)}}};
  const auto sp = report(cat(X, one), 1.0);
  REQUIRE(sp.size() == 1);
  CHECK(sp[0].name == name(4, "v_proj"));
  CHECK(sp[0].kind == "top");
  CHECK(sp[0].ratio == Approx(sp[0].value / sp[0].median));
  // fewer than min_modules of a type: no median, nothing flagged
  SpikeOptions strict;
  strict.min_modules = 100;
  std::vector<ModuleReport> few(1);
  few[0].name = hot;
  few[0].singular_values = Eigen::VectorXd::LinSpaced(3, 3.0, 1.0).reverse();
  CHECK(spectral_spikes(few, strict).empty());
}
