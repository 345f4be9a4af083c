// lora/io/peft.hpp: PEFT adapter folders load as PEFT reads them (patterns, rsLoRA, DoRA),
// save → load is exact, 16-bit adapters load right, malformed folders are rejected by name.
#include <lora/io/peft.hpp>

#include <filesystem>
#include <fstream>

#include "support/catch.hpp"
#include "support/checkpoints.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::TempDir;
using Catch::Matchers::ContainsSubstring;
using lora::test::rel_error;
namespace fs = std::filesystem;
using lora::test::copy_folder;
using lora::test::read_json;
using lora::test::write_json;

namespace {

/// Every module of a fixture: apply (or the DoRA formula) reproduces PEFT's y, delta_weight
/// reproduces get_delta_weight; returns the number of modules checked.
int check_fixture(const std::string& name) {
  const auto ad = io::load_peft_adapter(data("peft/" + name + "/adapter"));
  const auto base = io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors"));
  const auto ref = io::SafetensorsFile::open(data("peft/" + name + "/reference.safetensors"));
  int n = 0;
  for (const auto& m : ad.modules) {
    INFO(name << ": " << m.name);
    REQUIRE(ref.contains(m.name + ".delta_weight"));
    CHECK(m.adapter.rank() == ad.config.rank_for(m.name));
    CHECK(m.adapter.scaling() == Approx(ad.config.scaling_for(m.name)));
    CHECK(ad.config.targets(m.name));
    CHECK(rel_error(m.adapter.delta_weight(), ref.tensor(m.name + ".delta_weight").to_matrix<float>()) < 1e-6);
    const auto W = base.tensor(m.name + ".weight").to_matrix<double>();
    const auto x = ref.tensor(m.name + ".x").to_matrix<double>();
    const auto y = ref.tensor(m.name + ".y").to_matrix<double>();
    Matrix<double> got;
    if (m.is_dora()) {  // float64 reference of DoRA's output: m/‖W+ΔW‖_row ⊙ (X·(W+ΔW)ᵀ)
      const Matrix<double> Wd = W + m.adapter.delta_weight().cast<double>();
      const Vector<double> scale = m.adapter.magnitude().cast<double>().cwiseQuotient(Wd.rowwise().norm());
      got = (x * Wd.transpose()) * scale.asDiagonal();
    } else {
      got = x * (W + m.adapter.delta_weight().cast<double>()).transpose();
    }
    CHECK(rel_error(got, y) < 1e-5);
    // the loaded module is the layer: its apply and merge are DoRA's for a DoRA module
    const Matrix<float> Wf = W.cast<float>(), xf = x.cast<float>();
    CHECK(rel_error(m.adapter.apply(Wf, xf), y) < 1e-5);
    Matrix<float> Wm = Wf;
    const Vector<float> norms = m.adapter.merge(Wm);
    CHECK(norms.size() == (m.is_dora() ? m.adapter.out_features() : 0));
    CHECK(rel_error(xf * Wm.transpose(), y) < 1e-5);
    m.adapter.unmerge(Wm, norms);
    CHECK(rel_error(Wm, Wf) < 1e-6);
    ++n;
  }
  // every module of the reference is in the adapter
  for (const auto& key : ref.names())
    if (key.size() > 13 && key.compare(key.size() - 13, 13, ".delta_weight") == 0)
      CHECK(ad.contains(key.substr(0, key.size() - 13)));
  return n;
}
}  // namespace

TEST_CASE("PEFT fixtures load with PEFT's r, alpha and outputs", "[peft]") {
  // each fixture adapts its target projections in every layer of its base
  for (const std::string name : {"lora_r8_a16_all", "rslora_r16_a8_attn", "dora_r4_a8_qv", "patterns_all"}) {
    INFO(name);
    CHECK(check_fixture(name) == lora::test::peft_case_modules(name));
  }
}

TEST_CASE("PEFT config fields", "[peft]") {
  const auto lora = io::load_peft_adapter(data("peft/lora_r8_a16_all/adapter"));
  CHECK(lora.config.r == 8);
  CHECK(lora.config.lora_alpha == 16.0);
  CHECK_FALSE(lora.config.use_rslora);
  CHECK(lora.config.target_modules.size() == 7);
  CHECK(lora.at("model.layers.1.mlp.down_proj").adapter.scaling() == Approx(2.0));
  CHECK(lora.at("model.layers.0.self_attn.k_proj").stored_dtype == io::dtype::F32);
  CHECK_FALSE(lora.contains("model.layers.0.input_layernorm"));
  // a layer one past the base's last
  const auto past = fmt::format("model.layers.{}.self_attn.q_proj",
                                lora::test::layers_of(data("peft/lora_r8_a16_all/base/model.safetensors")));
  CHECK_THROWS_WITH(lora.at(past), ContainsSubstring(past));

  const auto rs = io::load_peft_adapter(data("peft/rslora_r16_a8_attn/adapter"));
  CHECK(rs.config.use_rslora);
  CHECK(rs.at("model.layers.0.self_attn.q_proj").adapter.scaling() == Approx(8.0 / 4.0));
  CHECK_FALSE(rs.contains("model.layers.0.mlp.up_proj"));

  const auto dora = io::load_peft_adapter(data("peft/dora_r4_a8_qv/adapter"));
  CHECK(dora.config.use_dora);
  // one magnitude per output row of the base's v_proj
  const auto dora_base = io::SafetensorsFile::open(data("peft/dora_r4_a8_qv/base/model.safetensors"));
  CHECK(dora.at("model.layers.0.self_attn.v_proj").adapter.magnitude().size() ==
        dora_base.tensor("model.layers.0.self_attn.v_proj.weight").shape.at(0));

  const auto pat = io::load_peft_adapter(data("peft/patterns_all/adapter"));
  CHECK(pat.at("model.layers.0.mlp.down_proj").adapter.rank() == 2);
  CHECK(pat.at("model.layers.1.self_attn.q_proj").adapter.rank() == 12);
  CHECK(pat.at("model.layers.0.self_attn.q_proj").adapter.rank() == 8);
  CHECK(pat.at("model.layers.0.self_attn.v_proj").adapter.alpha() == 32.0);
  CHECK(pat.at("model.layers.0.self_attn.k_proj").adapter.alpha() == 8.0);
}

TEST_CASE("PEFT pattern keys follow get_pattern_key", "[peft]") {
  io::PeftConfig c;
  c.r = 8;
  c.lora_alpha = 16;
  c.rank_pattern = {{"q_proj", 4}, {"layers\\.1\\..*", 2}, {"layers.0.self_attn.q_proj", 12}};
  c.alpha_pattern = {{"proj", 1}, {"v_proj", 32}};
  // the key must match a whole dotted suffix: "proj" does not match "v_proj"
  CHECK(c.alpha_for("model.layers.0.self_attn.v_proj") == 32);
  CHECK(c.alpha_for("model.layers.0.self_attn.proj") == 1);
  CHECK(c.alpha_for("model.layers.0.self_attn.k_proj") == 16);
  // the first key that matches wins (q_proj before the more specific key)
  CHECK(c.rank_for("model.layers.0.self_attn.q_proj") == 4);
  CHECK(c.rank_for("model.layers.1.mlp.up_proj") == 2);
  CHECK(c.rank_for("model.layers.0.mlp.up_proj") == 8);
  CHECK(c.rank_for("q_proj") == 4);  // no prefix
  CHECK(c.rank_for("model.layers.0.self_attn.xq_proj") == 8);

  c.target_modules = {"q_proj", "mlp.up_proj"};
  CHECK(c.targets("model.layers.0.self_attn.q_proj"));
  CHECK(c.targets("model.layers.3.mlp.up_proj"));
  CHECK_FALSE(c.targets("model.layers.0.self_attn.xq_proj"));
  CHECK_FALSE(c.targets("model.layers.0.other.up_proj"));
  c.target_modules_regex = ".*\\.(q|v)_proj";
  CHECK(c.targets("model.layers.0.self_attn.v_proj"));
  CHECK_FALSE(c.targets("model.layers.0.self_attn.k_proj"));
}

TEST_CASE("PEFT save -> load is identical (f32), and 16-bit adapters load right", "[peft]") {
  TempDir tmp("peft");
  for (const std::string name : {"lora_r8_a16_all", "rslora_r16_a8_attn", "dora_r4_a8_qv", "patterns_all"}) {
    INFO(name);
    const auto a = io::load_peft_adapter(data("peft/" + name + "/adapter"));
    io::save_peft_adapter(tmp.path / name, a);
    const auto b = io::load_peft_adapter(tmp.path / name);
    REQUIRE(b.modules.size() == a.modules.size());
    for (std::size_t i = 0; i < a.modules.size(); ++i) {
      const auto& ma = a.modules[i];
      const auto& mb = b.modules[i];
      CHECK(ma.name == mb.name);
      CHECK(ma.adapter.A() == mb.adapter.A());
      CHECK(ma.adapter.B() == mb.adapter.B());
      CHECK(ma.adapter.scaling() == mb.adapter.scaling());
      CHECK(ma.is_dora() == mb.is_dora());
      if (ma.is_dora()) CHECK(ma.adapter.magnitude() == mb.adapter.magnitude());
    }
    // the written config keeps PEFT's fields
    const auto j = read_json(tmp.path / name / "adapter_config.json");
    CHECK(j["peft_type"] == "LORA");
    CHECK(j["r"] == a.config.r);
    // and the file has the "format": "pt" metadata transformers checks for
    CHECK(io::SafetensorsFile::open(tmp.path / name / "adapter_model.safetensors").metadata().at("format") == "pt");

    for (auto t : {io::dtype::BF16, io::dtype::F16}) {
      const std::string sub = name + "_" + std::string(io::dtype_name(t));
      io::save_peft_adapter(tmp.path / sub, a, t);
      const auto h = io::load_peft_adapter(tmp.path / sub);
      const double eps = t == io::dtype::BF16 ? 1.0 / 256 : 1.0 / 2048;  // half an ulp, relative
      for (std::size_t i = 0; i < a.modules.size(); ++i) {
        const auto& ma = a.modules[i];
        const auto& mh = h.modules[i];
        CHECK(mh.stored_dtype == t);
        // elementwise: |x16 - x| <= eps·|x| (+ half the spacing of f16's subnormals, 2^-25)
        const float tiny = t == io::dtype::F16 ? std::ldexp(1.0f, -25) : 0.0f;
        CHECK(((mh.adapter.A() - ma.adapter.A()).cwiseAbs() - eps * ma.adapter.A().cwiseAbs()).maxCoeff() <= tiny);
        CHECK(((mh.adapter.B() - ma.adapter.B()).cwiseAbs() - eps * ma.adapter.B().cwiseAbs()).maxCoeff() <= tiny);
        CHECK(rel_error(mh.adapter.delta_weight(), ma.adapter.delta_weight()) < 4 * eps);
        CHECK(mh.adapter.A() != ma.adapter.A());  // it really was rounded
        // a 16-bit value converts exactly: the reloaded factors are the rounded ones
        const Matrix<float> A16 = ma.adapter.A().unaryExpr([t](float v) {
          return t == io::dtype::BF16 ? static_cast<float>(Eigen::bfloat16(v)) : static_cast<float>(Eigen::half(v));
        });
        CHECK(mh.adapter.A() == A16);
      }
    }
  }
}

TEST_CASE("PEFT save writes rank/alpha overrides PEFT can read back", "[peft]") {
  TempDir tmp("peft");
  lora::Generator gen(lora::test::fresh_seed());
  io::PeftAdapter a;
  a.config.r = 4;
  a.config.lora_alpha = 8;
  a.config.target_modules = {"q_proj"};
  auto mk = [&](std::string name, Index in, Index out, Index r, double alpha) {
    AdapterOptions o;
    o.name = name;
    return io::PeftModule{name,
                          LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                              lora::test::random_matrix<float>(r, in, gen), lora::test::random_matrix<float>(out, r, gen),
                              alpha, o),
                          io::dtype::F32};
  };
  a.modules.push_back(mk("model.layers.0.mlp.up_proj", 16, 24, 3, 5.0));
  a.modules.push_back(mk("model.layers.0.self_attn.q_proj", 16, 16, 4, 8.0));
  a.modules.push_back(mk("model.layers.1.self_attn.q_proj", 16, 16, 4, 8.0));
  a.modules.back().adapter.rescale(0.5);
  io::save_peft_adapter(tmp.path / "out", a);
  const auto b = io::load_peft_adapter(tmp.path / "out");
  REQUIRE(b.modules.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(b.modules[i].adapter.rank() == a.modules[i].adapter.rank());
    CHECK(b.modules[i].adapter.scaling() == Approx(a.modules[i].adapter.scaling()));
    CHECK(b.config.targets(b.modules[i].name));
    CHECK(b.modules[i].adapter.A() == a.modules[i].adapter.A());
  }
  CHECK_FALSE(b.config.targets("model.layers.1.mlp.up_proj"));  // exact paths, nothing more
}

TEST_CASE("PEFT folders that disagree with themselves are rejected by name", "[peft]") {
  TempDir tmp("peft");
  const fs::path src = data("peft/lora_r8_a16_all/adapter");
  auto fresh = [&](const std::string& name) {
    const fs::path p = tmp.path / name;
    copy_folder(src, p);
    return p;
  };
  auto edit_config = [&](const fs::path& p, auto fn) {
    auto j = read_json(p / "adapter_config.json");
    fn(j);
    write_json(p / "adapter_config.json", j);
  };

  SECTION("missing folder and files") {
    CHECK_THROWS_WITH(io::load_peft_adapter(tmp.path / "nope"), ContainsSubstring("does not exist"));
    auto p = fresh("nocfg");
    fs::remove(p / "adapter_config.json");
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("adapter_config.json"));
    auto q = fresh("noweights");
    fs::remove(q / "adapter_model.safetensors");
    CHECK_THROWS_WITH(io::load_peft_adapter(q), ContainsSubstring("adapter_model.safetensors"));
    CHECK_THROWS_WITH(io::load_peft_adapter(q / "adapter_config.json"), ContainsSubstring("not a folder"));
  }
  SECTION("config without r, r = 0, alpha not a number, bad JSON") {
    auto p = fresh("nor");
    edit_config(p, [](auto& j) { j.erase("r"); });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("missing 'r'") && ContainsSubstring("adapter_config.json"));
    edit_config(p, [](auto& j) { j["r"] = 0; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("'r' must be a positive integer"));
    edit_config(p, [](auto& j) { j["r"] = 8; j["lora_alpha"] = "sixteen"; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("'lora_alpha' must be a finite number"));
    edit_config(p, [](auto& j) { j["lora_alpha"] = 16; j["rank_pattern"] = {{"q_proj", -1}}; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("rank_pattern['q_proj']"));
    edit_config(p, [](auto& j) { j["rank_pattern"] = nlohmann::ordered_json::object(); j["peft_type"] = "IA3"; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("peft_type"));
    std::ofstream(p / "adapter_config.json") << "{ \"r\": 8, ";
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("not valid JSON") && ContainsSubstring("adapter_config.json"));
  }
  SECTION("r disagreeing with the tensors") {
    auto p = fresh("wrongr");
    edit_config(p, [](auto& j) { j["r"] = 4; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("lora_A.weight") && ContainsSubstring("r = 4") &&
                                                    ContainsSubstring("adapter_model.safetensors"));
    edit_config(p, [](auto& j) { j["r"] = 8; j["rank_pattern"] = {{"v_proj", 6}}; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("v_proj.lora_A.weight") && ContainsSubstring("r = 6"));
    edit_config(p, [](auto& j) { j["rank_pattern"] = nlohmann::ordered_json::object(); j["use_dora"] = true; });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("lora_magnitude_vector"));
  }
  // Tensor-level damage: rewrite the weights file with one change.
  const auto orig = io::SafetensorsFile::open(src / "adapter_model.safetensors");
  auto rewrite = [&](const std::string& name, auto fn) {
    auto p = fresh(name);
    std::vector<io::TensorData> ts;
    for (const auto& t : orig.tensors()) ts.push_back(io::TensorData::copy_of(t));
    fn(ts);
    io::write_safetensors(p / "adapter_model.safetensors", ts, {{"format", "pt"}});
    return p;
  };
  const std::string qA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
  const std::string qB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
  SECTION("missing lora_B, missing lora_A") {
    auto p = rewrite("noB", [&](auto& ts) { std::erase_if(ts, [&](auto& t) { return t.name == qB; }); });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring(qA) && ContainsSubstring("no matching lora_B"));
    auto q = rewrite("noA", [&](auto& ts) { std::erase_if(ts, [&](auto& t) { return t.name == qA; }); });
    CHECK_THROWS_WITH(io::load_peft_adapter(q), ContainsSubstring("model.layers.0.self_attn.q_proj") &&
                                                    ContainsSubstring("no lora_A"));
  }
  SECTION("A/B shape mismatch") {
    auto p = rewrite("shapeB", [&](auto& ts) {
      for (auto& t : ts)
        if (t.name == qB) t = io::TensorData::from_matrix(qB, Matrix<float>::Ones(64, 7), io::dtype::F32);
    });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring(qB) && ContainsSubstring("[64, 7]"));
  }
  SECTION("non-float dtype, stray tensors, magnitude without use_dora") {
    auto p = rewrite("intA", [&](auto& ts) {
      for (auto& t : ts)
        if (t.name == qA) {
          const auto v = orig.tensor(qA).to_vector<float>();
          t = io::TensorData::from_values(qA, v.data(), t.shape, io::dtype::I32);
        }
    });
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring(qA) && ContainsSubstring("I32"));
    auto q = rewrite("stray", [&](auto& ts) {
      ts.push_back(io::TensorData::from_matrix("base_model.model.lm_head.weight", Matrix<float>::Ones(2, 2), io::dtype::F32));
    });
    // a whole tensor of a module outside modules_to_save: PEFT does not load it; reported
    const auto stray = io::load_peft_adapter(q);
    REQUIRE(stray.skipped.size() == 1);
    CHECK(stray.skipped[0].key == "base_model.model.lm_head.weight");
    CHECK_THAT(stray.skipped[0].reason, ContainsSubstring("not in modules_to_save"));
    CHECK(stray.saved.empty());
    auto odd = rewrite("oddkey", [&](auto& ts) {
      ts.push_back(io::TensorData::from_matrix("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                                               Matrix<float>::Ones(2, 2), io::dtype::F32));
    });
    CHECK_THROWS_WITH(io::load_peft_adapter(odd), ContainsSubstring("lora_A.default.weight") &&
                                                      ContainsSubstring("not a tensor PEFT writes"));
    auto m = rewrite("mag", [&](auto& ts) {
      ts.push_back(io::TensorData::from_matrix("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                               Matrix<float>::Ones(64, 1), io::dtype::F32, true));
    });
    CHECK_THROWS_WITH(io::load_peft_adapter(m), ContainsSubstring("use_dora = false"));
  }
  SECTION("unknown dtype string in the weights file") {
    auto p = fresh("baddtype");
    std::string bytes;
    {
      std::ifstream in(p / "adapter_model.safetensors", std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), {});
    }
    const auto pos = bytes.find("\"F32\"");
    REQUIRE(pos != std::string::npos);
    bytes.replace(pos, 5, "\"Q32\"");
    std::ofstream(p / "adapter_model.safetensors", std::ios::binary) << bytes;
    CHECK_THROWS_WITH(io::load_peft_adapter(p), ContainsSubstring("unknown dtype 'Q32'") &&
                                                    ContainsSubstring("adapter_model.safetensors"));
  }
  SECTION("save refuses what PEFT cannot hold, and leaves nothing behind") {
    auto a = io::load_peft_adapter(src);
    CHECK_THROWS_WITH(io::save_peft_adapter(tmp.path / "i8", a, io::dtype::I8), ContainsSubstring("I8"));
    CHECK_FALSE(fs::exists(tmp.path / "i8"));
    a.modules[1].adapter = DoraAdapter<float, cpu, dynamic_scaling>(
        a.modules[1].adapter.lora(), Vector<float>::Ones(a.modules[1].adapter.out_features()));
    CHECK_THROWS_WITH(io::save_peft_adapter(tmp.path / "mixed", a), ContainsSubstring("DoRA"));
    CHECK_FALSE(fs::exists(tmp.path / "mixed"));
  }
}

TEST_CASE("check_peft_adapter and peft_module_tensors check what load_peft_adapter checks", "[peft]") {
  for (const std::string name : {"lora_r8_a16_all", "dora_r4_a8_qv", "patterns_all", "rslora_r16_a8_attn"}) {
    CAPTURE(name);
    const fs::path folder = data("peft/" + name + "/adapter");
    REQUIRE_NOTHROW(io::check_peft_adapter(folder));
    const auto loaded = io::load_peft_adapter(folder);
    const auto file = io::SafetensorsFile::open(folder / "adapter_model.safetensors");
    const auto views = io::peft_module_tensors(file, io::load_peft_config(folder));
    REQUIRE(views.size() == loaded.modules.size());
    for (std::size_t i = 0; i < views.size(); ++i) {
      const auto& v = views[i];
      const auto& m = loaded.modules[i];
      CHECK(v.name == m.name);
      CHECK(v.A->to_matrix<float>() == m.adapter.A());
      CHECK(v.B->to_matrix<float>() == m.adapter.B());
      CHECK((v.magnitude != nullptr) == m.is_dora());
      if (v.magnitude)
        CHECK(v.magnitude->to_vector<float>() ==
              std::vector<float>(m.adapter.magnitude().data(), m.adapter.magnitude().data() + m.adapter.magnitude().size()));
    }
  }
  TempDir tmp("peft");
  auto edited = [&](const std::string& src, const std::string& name, auto fn) {
    const fs::path p = tmp.path / name;
    copy_folder(data("peft/" + src + "/adapter"), p);
    auto j = read_json(p / "adapter_config.json");
    fn(j);
    write_json(p / "adapter_config.json", j);
    return p;
  };
  // PEFT would drop these magnitudes silently, or keep ‖W‖'s row norms for missing ones.
  const auto off = edited("dora_r4_a8_qv", "dora_off", [](auto& j) { j["use_dora"] = false; });
  CHECK_THROWS_WITH(io::check_peft_adapter(off), ContainsSubstring("dora_off/adapter_model.safetensors") &&
                                                     ContainsSubstring("lora_magnitude_vector' is a DoRA magnitude") &&
                                                     ContainsSubstring("use_dora = false"));
  const auto on = edited("lora_r8_a16_all", "dora_on", [](auto& j) { j["use_dora"] = true; });
  CHECK_THROWS_WITH(io::check_peft_adapter(on), ContainsSubstring("dora_on/adapter_model.safetensors") &&
                                                    ContainsSubstring("has no lora_magnitude_vector") &&
                                                    ContainsSubstring("use_dora = true"));
  CHECK_THROWS_WITH(io::check_peft_adapter(tmp.path / "nope"), ContainsSubstring("does not exist"));
  // a magnitude of the wrong length
  const fs::path src = data("peft/dora_r4_a8_qv/adapter");
  const auto orig = io::SafetensorsFile::open(src / "adapter_model.safetensors");
  std::vector<io::TensorData> ts;
  for (const auto& t : orig.tensors()) ts.push_back(io::TensorData::copy_of(t));
  std::string mag;
  for (auto& t : ts)
    if (t.name.ends_with(".lora_magnitude_vector") || t.name.ends_with(".lora_magnitude_vector.weight")) {
      mag = t.name;
      t = io::TensorData::from_matrix(t.name, Matrix<float>::Ones(5, 1), io::dtype::F32, true);
      break;
    }
  REQUIRE(!mag.empty());
  const fs::path shortm = tmp.path / "short_magnitude";
  copy_folder(src, shortm);
  io::write_safetensors(shortm / "adapter_model.safetensors", ts, {{"format", "pt"}});
  CHECK_THROWS_WITH(io::check_peft_adapter(shortm), ContainsSubstring(mag) && ContainsSubstring("has 5 elements"));
}
