// LoRA on parameters (LoraConfig.target_parameters, PEFT's ParamWrapper): MoE expert weights.
// Folders are built here with fresh random factors in PEFT's layout (lora_A [E·r × in], rows
// e·r … of expert e; lora_B [out × r·E], column k·E + e of expert e; one wrapper per parameter,
// nested as <m>.lora_A, <m>.base_layer.lora_A); every merged element is checked against
// W[e] + s·Σ_k B[o, k·E + e]·A[e·r + k, i] in float64, in both expert layouts.
#include <lora/analysis/combine.hpp>
#include <lora/analysis/compress.hpp>
#include <lora/analysis/inspect.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/merge.hpp>
#include <lora/io/peft.hpp>

#include <Eigen/SVD>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::TempDir;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {

struct Wrapper {
  std::string param;  // the parameter it adapts
  Matrix<double> A, B;
  int r;
  double alpha;
};

struct MoeCase {
  Index E, H, I;
  bool in_out;  // the base stores [E, in, out]
  std::vector<Wrapper> wrappers;  // depth 0 (outermost) first
  std::map<std::string, Matrix<double>> base;  // key → [E·d1 × d2]
  std::map<std::string, std::vector<std::int64_t>> shapes;
};

// gate_up_proj: out 2I, in H; down_proj: out H, in I. PEFT nests in registration order
// (gate_up_proj first), so down_proj's wrapper is the outer one.
MoeCase make_case(Generator& gen, Index E, Index H, Index I, bool in_out, int r_gate, int r_down, double a_gate,
                  double a_down) {
  MoeCase c{E, H, I, in_out, {}, {}, {}};
  auto wrapper = [&](const std::string& p, Index in, Index out, int r, double alpha) {
    Wrapper w{p, lora::test::random_matrix(E * r, in, gen, 0.5), lora::test::random_matrix(out, r * E, gen, 0.5), r,
              alpha};
    const std::string key = "model.layers.0.mlp.experts." + p;
    const Index d1 = in_out ? in : out, d2 = in_out ? out : in;
    c.base[key] = lora::test::random_matrix(E * d1, d2, gen);
    c.shapes[key] = {E, d1, d2};
    return w;
  };
  c.wrappers.push_back(wrapper("down_proj", I, H, r_down, a_down));
  c.wrappers.push_back(wrapper("gate_up_proj", H, 2 * I, r_gate, a_gate));
  return c;
}

void write_case(const MoeCase& c, const fs::path& dir, const nlohmann::ordered_json& cfg, io::dtype type = io::dtype::F32) {
  fs::create_directories(dir / "adapter");
  fs::create_directories(dir / "base");
  std::vector<io::TensorData> ad;
  std::string path = "base_model.model.model.layers.0.mlp.experts";
  for (const auto& w : c.wrappers) {
    ad.push_back(io::TensorData::from_matrix(path + ".lora_A.weight", w.A, type));
    ad.push_back(io::TensorData::from_matrix(path + ".lora_B.weight", w.B, type));
    path += ".base_layer";
  }
  io::write_bytes(dir / "adapter" / "adapter_model.safetensors", io::serialize_safetensors(ad, {{"format", "pt"}}));
  io::write_bytes(dir / "adapter" / "adapter_config.json", cfg.dump(2));
  std::vector<io::TensorData> base;
  for (const auto& [k, m] : c.base) {
    auto t = io::TensorData::from_matrix(k, m, io::dtype::F32);
    t.shape = c.shapes.at(k);
    base.push_back(std::move(t));
  }
  io::write_bytes(dir / "base" / "model.safetensors", io::serialize_safetensors(base, {{"format", "pt"}}));
}

nlohmann::ordered_json moe_config(const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) {
  nlohmann::ordered_json j = {{"peft_type", "LORA"},
                              {"r", 4},
                              {"lora_alpha", 8},
                              {"target_modules", nlohmann::ordered_json::array()},
                              {"target_parameters", {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}}};
  for (const auto& [k, v] : extra.items()) j[k] = v;
  return j;
}

// W[e] + scale·s·B_e·A_e in float64 from the stored factors' layout, for every element.
Matrix<double> expected(const MoeCase& c, const Wrapper& w, double s) {
  const std::string key = "model.layers.0.mlp.experts." + w.param;
  Matrix<double> W = c.base.at(key);
  const Index E = c.E, r = w.r, in = w.A.cols(), out = w.B.rows();
  for (Index e = 0; e < E; ++e)
    for (Index o = 0; o < out; ++o)
      for (Index i = 0; i < in; ++i) {
        double d = 0;
        for (Index k = 0; k < r; ++k) d += w.B(o, k * E + e) * w.A(e * r + k, i);
        if (c.in_out)
          W(e * in + i, o) += s * d;
        else
          W(e * out + o, i) += s * d;
      }
  return W;
}

Matrix<double> read_as_rows(const io::TensorView& t) {
  const Index cols = static_cast<Index>(t.shape.back());
  Matrix<double> m(static_cast<Index>(t.numel()) / cols, cols);
  t.convert_into(m.data());
  return m;
}

}  // namespace

TEST_CASE("parameter LoRA: PEFT's expert layout loads, splits into experts and merges in both layouts",
          "[peft][params]") {
  Generator gen(lora::test::fresh_seed());
  for (const bool in_out : {false, true}) {
    CAPTURE(in_out);
    const Index E = 2 + static_cast<Index>(gen.next() % 4), H = 8 + 2 * static_cast<Index>(gen.next() % 5);
    const Index I = H / 2 + 1 + static_cast<Index>(gen.next() % 4);
    const MoeCase c = make_case(gen, E, H, I, in_out, 4, 4, 8, 8);
    TempDir tmp("moe");
    write_case(c, tmp.path, moe_config());
    const auto ad = io::load_peft_adapter(tmp.path / "adapter");
    REQUIRE(ad.modules.empty());
    REQUIRE(ad.params.size() == 2);
    for (std::size_t d = 0; d < 2; ++d) {
      const auto& w = ad.params[d];
      CHECK(w.module == "model.layers.0.mlp.experts");
      CHECK(w.depth == static_cast<int>(d));
      CHECK(w.parameter.empty());  // two candidates: the base's shapes decide
      CHECK(w.rank == 4);
      CHECK(w.experts() == E);
      CHECK(w.scaling() == 2.0);
      // expert(e) is the e-th slice in PEFT's layout
      for (Index e = 0; e < E; ++e) {
        const auto x = w.expert(e);
        Matrix<double> delta = Matrix<double>::Zero(x.out_features(), x.in_features());
        const auto& src = c.wrappers[d];
        for (Index o = 0; o < delta.rows(); ++o)
          for (Index i = 0; i < delta.cols(); ++i)
            for (Index k = 0; k < 4; ++k) delta(o, i) += 2.0 * src.B(o, k * E + e) * src.A(e * 4 + k, i);
        CHECK(lora::test::rel_error(x.delta_weight(), delta) < 1e-6);
      }
    }
    const auto base = io::Checkpoint::open(tmp.path / "base" / "model.safetensors");
    const auto targets = io::resolve_parameter_targets(base, ad);
    REQUIRE(targets.size() == 2);
    CHECK(targets[0].parameter == "down_proj");
    CHECK(targets[1].parameter == "gate_up_proj");
    CHECK(targets[0].transposed == in_out);
    for (const double scale : {1.0, 0.5}) {
      io::MergeOptions o;
      o.scale = scale;
      io::merge_peft_checkpoint(base, ad, tmp.path / "merged.safetensors", o);
      const auto merged = io::SafetensorsFile::open(tmp.path / "merged.safetensors");
      for (const auto& w : c.wrappers) {
        const auto& t = merged.tensor("model.layers.0.mlp.experts." + w.param);
        CHECK(t.shape == c.shapes.at("model.layers.0.mlp.experts." + w.param));
        CHECK(lora::test::rel_error(read_as_rows(t), expected(c, w, scale * 2.0)) < 1e-6);
      }
    }
    // The wrong layout forced: the shapes refuse it, naming the module.
    io::MergeOptions wrong;
    wrong.experts_layout = in_out ? io::ExpertsLayout::out_in : io::ExpertsLayout::in_out;
    CHECK_THROWS_WITH(io::merge_peft_checkpoint(base, ad, tmp.path / "x.safetensors", wrong),
                      ContainsSubstring("model.layers.0.mlp.experts") && ContainsSubstring("fit none"));
    CHECK_FALSE(fs::exists(tmp.path / "x.safetensors"));
    // Saved and loaded again: the same tensors under the same keys.
    io::save_peft_adapter(tmp.path / "copy", ad);
    const auto again = io::load_peft_adapter(tmp.path / "copy");
    REQUIRE(again.params.size() == 2);
    for (std::size_t d = 0; d < 2; ++d) {
      CHECK(again.params[d].path == ad.params[d].path);
      CHECK(again.params[d].A == ad.params[d].A);
      CHECK(again.params[d].B == ad.params[d].B);
    }
    CHECK(again.config.target_parameters == ad.config.target_parameters);
  }
}

TEST_CASE("parameter LoRA: rank/alpha patterns and rsLoRA per parameter; one parameter resolves at load",
          "[peft][params]") {
  Generator gen(lora::test::fresh_seed());
  const Index E = 3, H = 10, I = 6;
  const MoeCase c = make_case(gen, E, H, I, false, 4, 2, 16, 8);
  TempDir tmp("moe-pat");
  write_case(c, tmp.path, moe_config({{"rank_pattern", {{"down_proj", 2}}}, {"alpha_pattern", {{"gate_up_proj", 16}}},
                                      {"use_rslora", true}}));
  const auto ad = io::load_peft_adapter(tmp.path / "adapter");
  REQUIRE(ad.params.size() == 2);
  CHECK(ad.params[0].rank == 0);  // the candidates' ranks differ: unknown until resolved
  const auto base = io::Checkpoint::open(tmp.path / "base" / "model.safetensors");
  const auto targets = io::resolve_parameter_targets(base, ad);
  REQUIRE(targets.size() == 2);
  CHECK(targets[0].parameter == "down_proj");
  CHECK(targets[0].rank == 2);
  CHECK(targets[1].rank == 4);
  CHECK(targets[1].alpha == 16);
  io::merge_peft_checkpoint(base, ad, tmp.path / "m.safetensors");
  const auto merged = io::SafetensorsFile::open(tmp.path / "m.safetensors");
  CHECK(lora::test::rel_error(read_as_rows(merged.tensor("model.layers.0.mlp.experts.down_proj")),
                              expected(c, c.wrappers[0], 8 / std::sqrt(2.0))) < 1e-6);
  CHECK(lora::test::rel_error(read_as_rows(merged.tensor("model.layers.0.mlp.experts.gate_up_proj")),
                              expected(c, c.wrappers[1], 16 / 2.0)) < 1e-6);
  // inspect cannot split the experts without the base here, and says why
  CHECK_THROWS_WITH(analysis::inspect_adapter(ad), ContainsSubstring("different ranks"));

  // One targeted parameter: resolved when loading, inspect reports every expert's spectrum.
  MoeCase one = c;
  one.wrappers.erase(one.wrappers.begin() + 1);
  TempDir t2("moe-one");
  write_case(one, t2.path, moe_config({{"r", 2}, {"target_parameters", {"experts.down_proj"}}}), io::dtype::BF16);
  const auto a1 = io::load_peft_adapter(t2.path / "adapter");
  REQUIRE(a1.params.size() == 1);
  CHECK(a1.params[0].parameter == "down_proj");
  CHECK(a1.params[0].stored_dtype == io::dtype::BF16);
  const auto rep = analysis::inspect_adapter(t2.path / "adapter");
  REQUIRE(rep.modules.size() == static_cast<std::size_t>(E));
  for (Index e = 0; e < E; ++e) {
    const auto& m = rep.modules[static_cast<std::size_t>(e)];
    CHECK(m.name == fmt::format("model.layers.0.mlp.experts.{}.down_proj", e));
    CHECK(m.kind == "expert");
    const Matrix<double> D = a1.params[0].expert(e).delta_weight().cast<double>();
    const Eigen::VectorXd sv = Eigen::JacobiSVD<Eigen::MatrixXd>(D).singularValues();
    REQUIRE(m.singular_values.size() == 2);
    for (Index k = 0; k < 2; ++k)
      CHECK(std::abs(m.singular_values(k) - sv(k)) <= 1e-5 * sv(0));
  }
}

TEST_CASE("parameter LoRA: square experts need the layout; bad tensors and unsupported operations are refused",
          "[peft][params]") {
  Generator gen(lora::test::fresh_seed());
  const Index E = 2, H = 8;
  MoeCase c = make_case(gen, E, H, H, false, 4, 4, 8, 8);  // down_proj [E, H, H]: square
  c.wrappers.erase(c.wrappers.begin() + 1);
  c.base.erase("model.layers.0.mlp.experts.gate_up_proj");
  c.shapes.erase("model.layers.0.mlp.experts.gate_up_proj");
  TempDir tmp("moe-sq");
  write_case(c, tmp.path, moe_config({{"target_parameters", {"mlp.experts.down_proj"}}}));
  const auto ad = io::load_peft_adapter(tmp.path / "adapter");
  {
    const auto base = io::Checkpoint::open(tmp.path / "base");
    CHECK_THROWS_WITH(io::merge_peft_checkpoint(base, ad, tmp.path / "m"), ContainsSubstring("layout of the experts"));
    CHECK_FALSE(fs::exists(tmp.path / "m"));
    io::MergeOptions o;
    o.experts_layout = io::ExpertsLayout::in_out;
    io::merge_peft_checkpoint(base, ad, tmp.path / "m.safetensors", o);
    MoeCase t = c;
    t.in_out = true;
    CHECK(lora::test::rel_error(
              read_as_rows(io::SafetensorsFile::open(tmp.path / "m.safetensors").tensor("model.layers.0.mlp.experts.down_proj")),
              expected(t, t.wrappers[0], 2.0)) < 1e-6);
  }
  // config.json's model_type decides: gpt_oss stores [E, in, out], qwen3_moe [E, out, in]
  for (const auto& [type, in_out] : std::vector<std::pair<std::string, bool>>{{"gpt_oss", true}, {"qwen3_moe", false}}) {
    io::write_bytes(tmp.path / "base" / "config.json", nlohmann::json{{"model_type", type}}.dump());
    const auto base = io::Checkpoint::open(tmp.path / "base");
    const auto targets = io::resolve_parameter_targets(base, ad);
    REQUIRE(targets.size() == 1);
    CHECK(targets[0].transposed == in_out);
  }

  // Tensors PEFT would never write.
  auto broken = [&](const std::function<void(std::vector<io::TensorData>&)>& edit) {
    TempDir b("moe-bad");
    fs::copy(tmp.path / "adapter", b.path / "adapter");
    const auto f = io::SafetensorsFile::open(tmp.path / "adapter" / "adapter_model.safetensors");
    std::vector<io::TensorData> ts;
    for (const auto& t : f.tensors()) ts.push_back(io::TensorData::copy_of(t));
    edit(ts);
    io::write_bytes(b.path / "adapter" / "adapter_model.safetensors", io::serialize_safetensors(ts, {}));
    std::string what;
    try {
      io::load_peft_adapter(b.path / "adapter");
    } catch (const lora::error& e) {
      what = e.what();
    }
    return what;
  };
  const std::string pre = "base_model.model.model.layers.0.mlp.experts";
  CHECK_THAT(broken([&](auto& ts) {  // rows no multiple of r
               ts.push_back(io::TensorData::from_matrix(pre + ".base_layer.lora_A.weight", Matrix<float>::Ones(7, H), io::dtype::F32));
               ts.push_back(io::TensorData::from_matrix(pre + ".base_layer.lora_B.weight", Matrix<float>::Ones(H, 7), io::dtype::F32));
             }),
             ContainsSubstring("no multiple of the rank") && ContainsSubstring(".base_layer.lora_A.weight"));
  CHECK_THAT(broken([&](auto& ts) {  // a wrapper deeper than there are parameters to wrap
               ts.push_back(io::TensorData::from_matrix(pre + ".base_layer.lora_A.weight", Matrix<float>::Ones(8, H), io::dtype::F32));
               ts.push_back(io::TensorData::from_matrix(pre + ".base_layer.lora_B.weight", Matrix<float>::Ones(H, 8), io::dtype::F32));
             }),
             ContainsSubstring("2 LoRA wrappers") && ContainsSubstring("selects 1"));
  CHECK_THAT(broken([&](auto& ts) {  // a gap in the nesting
               for (auto& t : ts) t.name.insert(pre.size(), ".base_layer");
             }),
             ContainsSubstring("but none at"));
  CHECK_THAT(broken([&](auto& ts) {  // B's columns must be A's rows
               ts[1] = io::TensorData::from_matrix(ts[1].name, Matrix<float>::Ones(H, 6), io::dtype::F32);
             }),
             ContainsSubstring("expected [out, 8]"));
  CHECK_THAT(broken([&](auto& ts) {
               ts.push_back(io::TensorData::from_matrix(pre + ".lora_magnitude_vector", Matrix<float>::Ones(1, H), io::dtype::F32));
             }),
             ContainsSubstring("DoRA on a parameter"));
  {  // a string is not a list (PEFT: TypeError)
    TempDir b("moe-cfg");
    fs::copy(tmp.path / "adapter", b.path / "adapter");
    io::write_bytes(b.path / "adapter" / "adapter_config.json", moe_config({{"target_parameters", "down_proj"}}).dump());
    CHECK_THROWS_WITH(io::load_peft_adapter(b.path / "adapter"), ContainsSubstring("'target_parameters' must be a list"));
  }

  // Operations on modules refuse an adapter with parameter LoRAs instead of dropping them.
  CHECK_THROWS_WITH(analysis::combine_adapters({&ad, &ad}, {0.5, 0.5}, analysis::combination_type::linear),
                    ContainsSubstring("combine") && ContainsSubstring("target_parameters"));
  CHECK_THROWS_WITH(analysis::compress_adapter(ad, analysis::CompressionTarget{2, 0.0}),
                    ContainsSubstring("compress") && ContainsSubstring("target_parameters"));
}

TEST_CASE("parameter LoRA: checkpoints that store experts one by one (qwen-MoE, Mixtral names) take each piece",
          "[peft][params]") {
  Generator gen(lora::test::fresh_seed());
  const Index E = 3, H = 10, I = 4 + static_cast<Index>(gen.next() % 3);
  const MoeCase c = make_case(gen, E, H, I, false, 4, 4, 8, 8);
  for (const bool mixtral : {false, true}) {
    CAPTURE(mixtral);
    TempDir tmp("moe-split");
    write_case(c, tmp.path, moe_config());
    // The base again, as transformers saves it: expert e's gate_up_proj rows [0, I) are
    // gate_proj (w1), rows [I, 2I) up_proj (w3); down_proj (w2) whole.
    const std::string m = mixtral ? "model.layers.0.block_sparse_moe.experts" : "model.layers.0.mlp.experts";
    const std::string gate = mixtral ? "w1" : "gate_proj", up = mixtral ? "w3" : "up_proj", down = mixtral ? "w2" : "down_proj";
    const auto& GU = c.base.at("model.layers.0.mlp.experts.gate_up_proj");
    const auto& D = c.base.at("model.layers.0.mlp.experts.down_proj");
    std::vector<io::TensorData> ts;
    for (Index e = 0; e < E; ++e) {
      ts.push_back(io::TensorData::from_matrix(fmt::format("{}.{}.{}.weight", m, e, gate), Matrix<double>(GU.middleRows(e * 2 * I, I)), io::dtype::F32));
      ts.push_back(io::TensorData::from_matrix(fmt::format("{}.{}.{}.weight", m, e, up), Matrix<double>(GU.middleRows(e * 2 * I + I, I)), io::dtype::F32));
      ts.push_back(io::TensorData::from_matrix(fmt::format("{}.{}.{}.weight", m, e, down), Matrix<double>(D.middleRows(e * H, H)), io::dtype::F32));
    }
    ts.push_back(io::TensorData::from_matrix("model.norm.weight", lora::test::random_matrix(1, H, gen), io::dtype::F32));
    io::write_bytes(tmp.path / "split.safetensors", io::serialize_safetensors(ts, {}));
    const auto ad = io::load_peft_adapter(tmp.path / "adapter");
    const auto base = io::Checkpoint::open(tmp.path / "split.safetensors");
    const auto targets = io::resolve_parameter_targets(base, ad);
    CHECK(targets.size() == static_cast<std::size_t>(3 * E));  // down: E pieces, gate_up: 2E
    io::merge_peft_checkpoint(base, ad, tmp.path / "m.safetensors");
    const auto merged = io::SafetensorsFile::open(tmp.path / "m.safetensors");
    const Matrix<double> wantGU = expected(c, c.wrappers[1], 2.0), wantD = expected(c, c.wrappers[0], 2.0);
    for (Index e = 0; e < E; ++e) {
      CHECK(lora::test::rel_error(merged.tensor(fmt::format("{}.{}.{}.weight", m, e, gate)).to_matrix<double>(),
                                  wantGU.middleRows(e * 2 * I, I)) < 1e-6);
      CHECK(lora::test::rel_error(merged.tensor(fmt::format("{}.{}.{}.weight", m, e, up)).to_matrix<double>(),
                                  wantGU.middleRows(e * 2 * I + I, I)) < 1e-6);
      CHECK(lora::test::rel_error(merged.tensor(fmt::format("{}.{}.{}.weight", m, e, down)).to_matrix<double>(),
                                  wantD.middleRows(e * H, H)) < 1e-6);
    }
    CHECK(merged.tensor("model.norm.weight").bytes.size() == static_cast<std::size_t>(H) * 4);
    // A missing expert piece is named.
    ts.erase(ts.begin() + 4);  // expert 1's up piece
    io::write_bytes(tmp.path / "gap.safetensors", io::serialize_safetensors(ts, {}));
    CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "gap.safetensors"), ad, tmp.path / "g.safetensors"),
                      ContainsSubstring(fmt::format("{}.1.{}.weight", m, up)));
  }
}
