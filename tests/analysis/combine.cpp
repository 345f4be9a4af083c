// Weighted combination against PEFT 0.21's add_weighted_adapter
// (tests/data/peft/weighted_combos) and against the dense definitions.
#include <lora/analysis/combine.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <fstream>

#include "support/catch.hpp"
#include "support/fixtures.hpp"
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
  CHECK(parse_combination_type("dare_ties_svd") == combination_type::dare_ties_svd);
  CHECK_THROWS_WITH(parse_combination_type("tie"), Catch::Matchers::ContainsSubstring("magnitude_prune_svd"));
}

TEST_CASE("combine_adapters on PEFT folders equals the fixtures", "[analysis][combine][peft]") {
  const std::string root = std::string(LORA_TEST_DATA_DIR) + "/peft/weighted_combos";
  std::ifstream cin_(root + "/combinations.json");
  const auto combos = nlohmann::json::parse(cin_);
  auto ref = io::SafetensorsFile::open(root + "/reference.safetensors");
  std::map<std::string, io::PeftAdapter> ads;
  for (const std::string name : {"a1", "a2", "a3"}) ads[name] = io::load_peft_adapter(root + "/adapters/" + name);
  // q, v and down of every layer of the base
  const int modules = lora::test::per_layer_modules(root + "/adapters/a1", root + "/base/model.safetensors");
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
    REQUIRE(out.modules.size() == static_cast<std::size_t>(modules));
    for (const auto& m : out.modules) {
      INFO(combo << " " << m.name);
      CHECK(m.adapter.scaling() == 1.0);
      const auto want = ref.tensor(m.name + "." + combo + ".delta_weight").to_matrix<double>();
      CHECK(rel_error(m.adapter.delta_weight(), want) < 1e-5);
      ++checked;
    }
  }
  CHECK(checked == 3 * modules);  // the case's three combinations
  CHECK_THROWS_WITH(combine_adapters({&ads["a1"]}, {1.0, 2.0}, combination_type::cat),
                    Catch::Matchers::ContainsSubstring("one weight per adapter"));
}

namespace {
// tests/data/peft/combos_ext: a1 (r8, a16), a2 (r8, a8), a3 (r4, a8), a4 (r8, a16, rsLoRA)
struct CombosExt {
  std::string root = std::string(LORA_TEST_DATA_DIR) + "/peft/combos_ext";
  nlohmann::json combos;
  io::SafetensorsFile ref, masks;
  std::map<std::string, io::PeftAdapter> ads;
  int layers = 0;  // of the adapters' files (the case has no base)
  CombosExt()
      : ref(io::SafetensorsFile::open(root + "/reference.safetensors")),
        masks(io::SafetensorsFile::open(root + "/dare_masks.safetensors")) {
    std::ifstream in(root + "/combinations.json");
    combos = nlohmann::json::parse(in)["combinations"];
    for (const std::string n : {"a1", "a2", "a3", "a4"}) ads[n] = io::load_peft_adapter(root + "/adapters/" + n);
    layers = lora::test::layers_of(root + "/adapters/a1/adapter_model.safetensors");
  }
  // The call's options, with PEFT's recorded masks for the DARE types.
  CombineOptions options(const std::string& combo, const nlohmann::json& call) {
    CombineOptions opt;
    opt.type = parse_combination_type(call["combination_type"].get<std::string>());
    if (call.contains("density")) opt.density = call["density"];
    if (call.contains("majority_sign_method"))
      opt.majority_sign = parse_majority_sign(call["majority_sign_method"].get<std::string>());
    if (call.contains("svd_rank")) opt.rank = call["svd_rank"];
    if (call.contains("svd_clamp")) opt.svd_clamp = call["svd_clamp"].get<double>();
    std::vector<std::string> names = call["adapters"];
    opt.dare_mask = [this, combo, names](std::string_view module, std::size_t i, dare_part part, Index rows, Index cols) {
      const char* p = part == dare_part::A ? "mask_A" : part == dare_part::B ? "mask_B" : "mask_delta";
      const auto key = fmt::format("{}.{}.{}.{}", module, combo, p, names.at(i));
      const auto m = masks.tensor(key).to_matrix<double>();
      REQUIRE(m.rows() == rows);
      REQUIRE(m.cols() == cols);
      return DareMask(m.cast<std::uint8_t>().array());
    };
    return opt;
  }
};
}  // namespace

TEST_CASE("ties, dare and magnitude_prune equal PEFT 0.21 on combos_ext", "[analysis][combine][peft]") {
  CombosExt fx;
  int checked = 0, refused = 0;
  for (auto& [combo, spec] : fx.combos.items()) {
    const auto& call = spec["call"];
    std::vector<const io::PeftAdapter*> in;
    std::vector<double> w;
    for (std::size_t i = 0; i < call["adapters"].size(); ++i) {
      in.push_back(&fx.ads.at(call["adapters"][i].get<std::string>()));
      w.push_back(call["weights"][i]);
    }
    const CombineOptions opt = fx.options(combo, call);
    INFO(combo);
    if (spec["status"] == "error") {
      // PEFT: "All adapters must have the same r value when using combination_type linear, ties, ..."
      CHECK_THROWS_WITH(combine_adapters(in, w, opt), Catch::Matchers::ContainsSubstring("must have the same r"));
      ++refused;
      continue;
    }
    const bool svd_dare = opt.type == combination_type::dare_linear_svd || opt.type == combination_type::dare_ties_svd;
    io::PeftAdapter out;
    if (svd_dare) {  // masks recorded for layer 0 only: combine the layer-0 modules
      std::vector<io::PeftAdapter> layer0;
      for (auto* a : in) {
        layer0.push_back(*a);
        std::erase_if(layer0.back().modules,
                      [](const io::PeftModule& m) { return m.name.find("layers.0.") == std::string::npos; });
      }
      for (std::size_t i = 0; i < in.size(); ++i) in[i] = &layer0[i];
      out = combine_adapters(in, w, opt);
    } else {
      out = combine_adapters(in, w, opt);
    }
    CHECK(out.config.r == spec["new_r"].get<int>());
    CHECK(out.config.lora_alpha == spec["new_lora_alpha"].get<double>());
    CHECK(out.config.use_rslora == spec["new_use_rslora"].get<bool>());
    // q, v and down of layer 0 (svd_dare) or of every layer
    CHECK(out.modules.size() == (svd_dare ? 3u : 3u * fx.layers));
    for (const auto& m : out.modules) {
      INFO(m.name);
      const std::string key = m.name + "." + combo;
      const double want_scaling = fx.ref.tensor(key + ".scaling").at<double>(0);
      CHECK(m.adapter.scaling() == Approx(want_scaling).epsilon(1e-12));
      const MatD want_A = fx.ref.tensor(key + ".lora_A").to_matrix<double>();
      const MatD want_B = fx.ref.tensor(key + ".lora_B").to_matrix<double>();
      const MatD want = want_scaling * want_B * want_A;
      const MatD got_A = m.adapter.A().cast<double>(), got_B = m.adapter.B().cast<double>();
      REQUIRE(got_A.rows() == want_A.rows());
      if (!is_svd_type(opt.type)) {  // factors themselves, elementwise
        CHECK(rel_error(got_A, want_A) < 1e-6);
        CHECK(rel_error(got_B, want_B) < 1e-6);
      } else if (!opt.svd_clamp) {  // SVD: factors up to the singular vectors' signs
        for (Index i = 0; i < got_B.cols(); ++i)
          CHECK(got_B.col(i).norm() == Approx(want_B.col(i).norm()).epsilon(1e-4).margin(1e-7));
      }
      const double tol = opt.svd_clamp ? 0.05 : 2e-5;  // clamp: depends on LAPACK's signs (below)
      CHECK(rel_error(m.adapter.delta_weight(), want) < tol);
      ++checked;
    }
  }
  CHECK(checked == 15 * 3 * fx.layers + 2 * 3);
  CHECK(refused == 2);
}

TEST_CASE("svd_clamp equals PEFT's once the singular vectors' signs agree", "[analysis][combine][peft]") {
  CombosExt fx;
  const auto& call = fx.combos["svd_clamp099_r6"]["call"];
  for (const auto& m : fx.ads["a1"].modules) {
    INFO(m.name);
    std::vector<WeightedFactors> in;
    for (std::size_t i = 0; i < call["adapters"].size(); ++i) {
      const auto& mod = fx.ads.at(call["adapters"][i].get<std::string>()).at(m.name);
      in.push_back({mod.adapter.B().cast<double>(), mod.adapter.A().cast<double>(), mod.adapter.scaling(),
                    call["weights"][i].get<double>()});
    }
    Factors f = combine_svd(in, 6);
    const std::string key = m.name + ".svd_clamp099_r6";
    const MatD want_A = fx.ref.tensor(key + ".lora_A").to_matrix<double>();
    const MatD want_B = fx.ref.tensor(key + ".lora_B").to_matrix<double>();
    for (Index i = 0; i < 6; ++i)
      if (f.A.row(i).dot(want_A.row(i)) < 0) f.A.row(i) *= -1, f.B.col(i) *= -1;
    clamp_factors(f, 0.99);
    CHECK(rel_error(f.A, want_A) < 1e-5);
    CHECK(rel_error(f.B, want_B) < 1e-5);
    CHECK((f.A.array() != Factors{combine_svd(in, 6)}.A.array()).count() > 0);  // the clamp did cut
  }
}

TEST_CASE("ΔW space: the element-wise rule on ΔW_i, then the best rank-k factors", "[analysis][combine]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  std::vector<WeightedFactors> in(3);
  const Index ranks[3] = {4, 6, 3};
  for (int i = 0; i < 3; ++i) {
    in[i].B = lora::test::random_matrix(24, ranks[i], gen);
    in[i].A = lora::test::random_matrix(ranks[i], 18, gen);
    in[i].scaling = 0.5 + i;
    in[i].weight = i == 1 ? -0.6 : 0.8;
  }
  std::vector<MatD> d;
  for (auto& w : in) d.push_back(w.scaling * w.B * w.A);
  const double density = 0.4;
  const auto kth = [](const MatD& x, double dens) {  // dense reference of magnitude pruning
    std::vector<double> a(x.data(), x.data() + x.size());
    for (auto& v : a) v = std::abs(v);
    std::sort(a.rbegin(), a.rend());
    const auto k = static_cast<std::size_t>(dens * double(x.size()));
    MatD y = x;
    for (Index i = 0; i < y.size(); ++i)
      if (std::abs(y.data()[i]) < a[k - 1]) y.data()[i] = 0;
    return y;
  };
  for (auto method : {majority_sign_method::total, majority_sign_method::frequency}) {
    // dense TIES written out entry by entry
    std::vector<MatD> p;
    for (auto& x : d) p.push_back(kth(x, density));
    MatD want = MatD::Zero(24, 18);
    for (Index e = 0; e < want.size(); ++e) {
      double elect = 0;
      for (auto& x : p) elect += method == majority_sign_method::total ? x.data()[e] : (x.data()[e] > 0) - (x.data()[e] < 0);
      double sum = 0;
      int n = 0;
      for (std::size_t i = 0; i < p.size(); ++i) {
        const double v = p[i].data()[e];
        if (v != 0 && (v > 0) == (elect >= 0)) sum += in[i].weight * v, ++n;
      }
      want.data()[e] = n ? sum / n : 0.0;
    }
    Eigen::JacobiSVD<MatD> svd(want, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Index k = 5;
    const MatD best = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal() *
                      svd.matrixV().leftCols(k).transpose();
    CombineOptions opt;
    opt.type = combination_type::ties;
    opt.density = density;
    opt.majority_sign = method;
    opt.space = combine_space::delta;
    opt.rank = k;
    const double s_new = std::sqrt(5.0);  // an rsLoRA first adapter: the factors must absorb it
    const auto f = combine(in, opt, s_new);
    CHECK(f.rank() == k);
    CHECK(rel_error(MatD(s_new * f.B * f.A), best) < 1e-10);
    // PEFT's ties_svd is the same rule on the same ΔW_i (factors for scaling 1)
    opt.type = combination_type::ties_svd;
    opt.space = combine_space::peft;
    const auto g = combine(in, opt);
    CHECK(rel_error(MatD(g.B * g.A), best) < 1e-10);
  }
  // magnitude_prune in ΔW space: Σ w_i·prune(ΔW_i)
  CombineOptions mp;
  mp.type = combination_type::magnitude_prune;
  mp.density = density;
  mp.space = combine_space::delta;
  mp.rank = 18;
  MatD want = MatD::Zero(24, 18);
  for (std::size_t i = 0; i < d.size(); ++i) want += in[i].weight * kth(d[i], density);
  CHECK(rel_error(MatD(combine(in, mp).B * combine(in, mp).A), want) < 1e-10);
  // linear in ΔW space is exact Σ w_i·ΔW_i (rank ≤ Σ r_i), unlike PEFT's cross terms
  CombineOptions lin;
  lin.type = combination_type::linear;
  lin.space = combine_space::delta;
  lin.rank = 13;
  MatD sum = MatD::Zero(24, 18);
  for (std::size_t i = 0; i < d.size(); ++i) sum += in[i].weight * d[i];
  CHECK(rel_error(MatD(combine(in, lin).B * combine(in, lin).A), sum) < 1e-10);
  CombineOptions bad;
  bad.type = combination_type::ties;
  bad.density = 0.5;
  CHECK_THROWS_WITH(combine(in, bad), Catch::Matchers::ContainsSubstring("same r"));
  bad.type = combination_type::dare_ties;
  bad.density = 0.0;
  CHECK_THROWS_WITH(combine(in, bad), Catch::Matchers::ContainsSubstring("density"));
}

TEST_CASE("DARE without masks: Bernoulli(density) keeps, rescaled so the mean is unpruned", "[analysis][combine]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  std::vector<WeightedFactors> in(2);
  for (auto& w : in) {
    w.B = lora::test::random_matrix(16, 4, gen);
    w.A = lora::test::random_matrix(4, 12, gen);
    w.scaling = 2;
    w.weight = 0.7;
  }
  CombineOptions opt;
  opt.type = combination_type::dare_linear_svd;
  opt.density = 0.3;
  opt.space = combine_space::delta;
  opt.rank = 12;
  MatD mean = MatD::Zero(16, 12), want = MatD::Zero(16, 12);
  for (auto& w : in) want += w.weight * w.scaling * w.B * w.A;
  const int n = 1600;
  double kept = 0;
  for (int t = 0; t < n; ++t) {
    opt.seed = seed + static_cast<std::uint64_t>(t);
    const auto f = combine(in, opt);
    const MatD D = f.B * f.A;
    mean += D / n;
    kept += static_cast<double>((D.array().abs() > 1e-12).count()) / D.size();
  }
  // entries survive if either adapter kept them: 1 - 0.7² = 0.51
  CHECK(kept / n == Approx(0.51).margin(0.02));
  // E[mask/density] = 1; the mean's relative sd is ≈ sqrt((1-p)/(p·n)) ≈ 0.04
  CHECK(rel_error(mean, want) < 0.08);
}

TEST_CASE("combine_adapters refuses what add_weighted_adapter would drop", "[analysis][combine][peft]") {
  const std::string root = std::string(LORA_TEST_DATA_DIR) + "/peft/";
  for (auto [name, what] : {std::pair{"lora_bias", "lora_B.bias"}, std::pair{"modules_to_save_lm_head", "whole tensor"},
                            std::pair{"trainable_tokens", "trainable token rows"}}) {
    INFO(name);
    const auto a = io::load_peft_adapter(root + name + "/adapter");
    for (auto type : {combination_type::svd, combination_type::cat, combination_type::linear})
      CHECK_THROWS_WITH(combine_adapters({&a, &a}, {0.5, 0.5}, type), Catch::Matchers::ContainsSubstring(what));
  }
  // progress: one call per module, in order
  const auto a1 = io::load_peft_adapter(root + "weighted_combos/adapters/a1");
  CombineOptions opt;
  opt.type = combination_type::cat;
  std::size_t calls = 0;
  opt.on_module = [&](std::size_t done, std::size_t total, const std::string&) {
    CHECK(done == ++calls);
    CHECK(total == a1.modules.size());
  };
  const auto out = combine_adapters({&a1, &a1}, {1.0, -0.5}, opt);
  CHECK(calls == a1.modules.size());
  CHECK(out.modules.size() == a1.modules.size());
}
