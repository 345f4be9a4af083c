// Real PEFT adapter folders, whole (issue 19): every tensor kind PEFT 0.21 saves for LoRA
// (modules_to_save copies, embedding LoRA, lora_B.bias, trainable tokens, bf16 files) merges
// equal to PEFT's merge_and_unload() and runs forward equal to PEFT's layers; the config
// selects modules as PEFT does (key layouts, stacked merges, merged folders: tests/io/merge.cpp).
#include <lora/core/embedding.hpp>
#include <lora/core/lora_bias.hpp>
#include <lora/dora/module_adapter.hpp>
#include <lora/io/merge.hpp>
#include <lora/io/peft.hpp>

#include <Eigen/SVD>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "support/catch.hpp"
#include "support/checkpoints.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::peft;
using lora::test::rel_error;
using lora::test::TempDir;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using lora::test::copy_folder;
using lora::test::json_int;
using lora::test::read_json;
using lora::test::write_json;

namespace {

/// num_hidden_layers of a batch-2 case's base/config.json.
int folder_layers(const std::string& c) { return json_int(peft(c, "base/config.json"), "num_hidden_layers"); }

/// ulp of a bfloat16 value (spacing of bf16 numbers around |v|).
double bf16_ulp(double v) {
  if (v == 0) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(std::fabs(v)))) - 7);
}

/// Every tensor of `got` equals merged.safetensors of the case: float32 within 1e-6
/// relative (Frobenius, per tensor); bf16 element by element within one bf16 rounding: we
/// round W + ΔW once, PEFT's bf16 adapter rounded ΔW to bf16 first (reference .delta_weight
/// vs .delta_weight_f32), so the two differ by at most that rounding of ΔW plus half an ulp
/// of each result. Returns the number of tensors that differ from the base.
int check_merged(const std::string& c, const fs::path& got_file) {
  const auto got = io::SafetensorsFile::open(got_file);
  const auto want = io::SafetensorsFile::open(peft(c, "merged.safetensors"));
  const auto base = io::SafetensorsFile::open(peft(c, "base/model.safetensors"));
  const auto ref = io::SafetensorsFile::open(peft(c, "reference.safetensors"));
  REQUIRE(got.names() == base.names());
  int changed = 0;
  for (const auto& k : want.names()) {
    INFO(c << ": " << k);
    const auto& w = want.tensor(k);
    const auto& g = got.tensor(k);
    REQUIRE(g.type == w.type);
    REQUIRE(g.shape == w.shape);
    const auto wv = w.to_vector<double>(), gv = g.to_vector<double>(), bv = base.tensor(k).to_vector<double>();
    if (wv != bv) ++changed;
    if (w.type == io::dtype::F32) {
      Eigen::Map<const Vector<double>> a(gv.data(), static_cast<Index>(gv.size())), b(wv.data(), static_cast<Index>(wv.size()));
      CHECK(rel_error(a, b) <= 1e-6);
    } else {
      const std::string module = k.substr(0, k.rfind('.'));
      std::vector<double> delta_rounding(wv.size(), 0.0);
      if (ref.contains(module + ".delta_weight_f32")) {
        const auto d16 = ref.tensor(module + ".delta_weight").to_vector<double>();
        const auto d32 = ref.tensor(module + ".delta_weight_f32").to_vector<double>();
        for (std::size_t i = 0; i < wv.size(); ++i) delta_rounding[i] = std::fabs(d16[i] - d32[i]);
      }
      std::size_t bad = 0;
      for (std::size_t i = 0; i < wv.size(); ++i)
        if (std::fabs(gv[i] - wv[i]) > bf16_ulp(std::max(std::fabs(gv[i]), std::fabs(wv[i]))) + delta_rounding[i] * 1.0001)
          ++bad;
      CHECK(bad == 0);
    }
  }
  return changed;
}

fs::path merge_case(const TempDir& tmp, const std::string& c, const io::MergeOptions& opts = {}) {
  const auto ad = io::load_peft_adapter(peft(c, "adapter"));
  const auto base = io::Checkpoint::open(peft(c, "base"));
  const fs::path out = tmp.path / c;
  io::merge_peft_checkpoint(base, ad, out, opts);
  return out;
}

}  // namespace

TEST_CASE("every batch-2 PEFT folder merges equal to merge_and_unload", "[peft][merge]") {
  TempDir tmp("peft-folders");
  // {case, tensors merge_and_unload changed (meta.json) in each layer, and outside the layers}: per
  // layer the targets (lora_bias: weight and bias of each); outside, the modules_to_save copies,
  // the embedding (embedding LoRA, trainable tokens) and lm_head when tied to it
  const std::vector<std::tuple<std::string, int, int>> cases = {
      {"modules_to_save_lm_head", 2, 1}, {"modules_to_save_lm_head_embed", 2, 2}, {"embedding_lora", 1, 1},
      {"lora_bias", 14, 0},              {"trainable_tokens", 2, 1},              {"trainable_tokens_tied", 2, 2},
      {"lora_r16_bf16_saved", 4, 0}};
  for (const auto& [c, per_layer, outside] : cases) {
    INFO(c);
    const fs::path out = merge_case(tmp, c);
    CHECK(check_merged(c, out / "model.safetensors") == per_layer * folder_layers(c) + outside);
    CHECK(fs::exists(out / "config.json"));
  }
}

TEST_CASE("modules_to_save copies are whole modules that replace the base's", "[peft]") {
  const auto ad = io::load_peft_adapter(peft("modules_to_save_lm_head_embed", "adapter"));
  CHECK(ad.modules.size() == 2u * folder_layers("modules_to_save_lm_head_embed"));  // q and v of each layer
  REQUIRE(ad.saved.size() == 2);
  CHECK(ad.saved[0].key == "lm_head.weight");
  CHECK(ad.saved[0].module == "lm_head");
  CHECK(ad.saved[0].role == io::PeftSavedTensor::Role::modules_to_save);
  CHECK(ad.saved[1].key == "model.embed_tokens.weight");
  CHECK(ad.skipped.empty());
  // lm_head's forward with the saved copy is PEFT's
  const auto one = io::load_peft_adapter(peft("modules_to_save_lm_head", "adapter"));
  const auto ref = io::SafetensorsFile::open(peft("modules_to_save_lm_head", "reference.safetensors"));
  const io::SafetensorsFile saved =
      io::SafetensorsFile::from_bytes(io::serialize_safetensors({one.saved.at(0).data}, {}));
  const Matrix<double> W = saved.tensor("base_model.model.lm_head.weight").to_matrix<double>();
  const Matrix<double> x = ref.tensor("lm_head.x").to_matrix<double>();
  CHECK(rel_error(Matrix<double>(x * W.transpose()), ref.tensor("lm_head.y").to_matrix<double>()) < 1e-6);
}

TEST_CASE("embedding LoRA: delta, forward by token ids, spectrum", "[peft][embedding]") {
  const int vocab = json_int(peft("embedding_lora", "base/config.json"), "vocab_size");
  const int dim = json_int(peft("embedding_lora", "base/config.json"), "hidden_size");
  for (const char* folder : {"adapter", "adapter_no_embedding_layers"}) {
    INFO(folder);
    const auto ad = io::load_peft_adapter(peft("embedding_lora", folder));
    const auto ref = io::SafetensorsFile::open(peft("embedding_lora", "reference.safetensors"));
    const auto base = io::SafetensorsFile::open(peft("embedding_lora", "base/model.safetensors"));
    const auto& m = ad.at("model.embed_tokens");
    CHECK(m.is_embedding());
    CHECK(m.adapter.in_features() == vocab);  // the layer reads token ids
    CHECK(m.adapter.out_features() == dim);
    CHECK(m.adapter.scaling() == Approx(ref.tensor("model.embed_tokens.scaling").at<double>(0)));
    const Matrix<float> delta = m.adapter.delta_weight();
    CHECK(rel_error(delta, ref.tensor("model.embed_tokens.delta_weight").to_matrix<float>()) < 1e-6);
    // forward: E[ids] + s·A[:, ids]ᵀ·Bᵀ
    const auto ids = ref.tensor("model.embed_tokens.ids").to_vector<std::int64_t>();
    const Matrix<float> E = base.tensor("model.embed_tokens.weight").to_matrix<float>();
    const Matrix<float> y = embedding_forward(m.adapter.lora(), MatrixRef<float>(E), ids);
    const auto& yt = ref.tensor("model.embed_tokens.y");
    const Matrix<float> want =
        Eigen::Map<const Matrix<float>>(yt.to_vector<float>().data(), static_cast<Index>(ids.size()), dim);
    CHECK(rel_error(y, want) < 1e-6);
    // the spectrum of ΔE is PEFT's (float64)
    Eigen::JacobiSVD<Matrix<double>> svd(delta.cast<double>());
    const auto sv = ref.tensor("model.embed_tokens.svdvals").to_vector<double>();
    for (Index i = 0; i < 4; ++i) CHECK(svd.singularValues()(i) == Approx(sv[static_cast<std::size_t>(i)]).epsilon(1e-5));
    CHECK(ad.saved.size() == (std::string(folder) == "adapter" ? 1u : 0u));
    // out-of-range token ids are refused by name
    const std::vector<std::int64_t> bad = {3, vocab};
    CHECK_THROWS_WITH(embedding_forward(m.adapter.lora(), MatrixRef<float>(E), bad),
                      ContainsSubstring(fmt::format("adapter 'model.embed_tokens': token id {0} at position 1 is "
                                                    "outside the vocabulary [0, {0})", vocab)));
    // the AdapterSpec prefix, what was expected and what was found
    const Matrix<float> Ebad = E.topRows(vocab - 1);
    CHECK_THROWS_WITH(embedding_forward(m.adapter.lora(), MatrixRef<float>(Ebad), ids),
                      ContainsSubstring(fmt::format("adapter 'model.embed_tokens': embedding weight E [vocab x dim] "
                                                    "has shape [{} x {}], expected [{} x {}]",
                                                    vocab - 1, dim, vocab, dim)));
    const auto linear = LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(m.adapter.A(), m.adapter.B(), 8.0);
    CHECK_THROWS_WITH(embedding_forward(linear, MatrixRef<float>(E), ids),
                      ContainsSubstring("expected an embedding adapter (fan_in_fan_out, A [r × vocab]), got a linear"));
  }
  // without save_embedding_layers the merge is the same
  TempDir tmp("peft-emb");
  const auto ad = io::load_peft_adapter(peft("embedding_lora", "adapter_no_embedding_layers"));
  io::merge_peft_checkpoint(io::Checkpoint::open(peft("embedding_lora", "base")), ad, tmp.path / "m");
  CHECK(check_merged("embedding_lora", tmp.path / "m" / "model.safetensors") ==
        folder_layers("embedding_lora") + 1);  // q_proj of each layer and the embedding
}

TEST_CASE("DoRA on an embedding: forward and merge scale each dimension by m over its norm over the vocabulary",
          "[peft][embedding][dora]") {
  // PEFT's DoraEmbeddingVariant: n = ‖Eᵀ + s·B·A‖ along the vocabulary ([dim]), merge
  // E' = (m ⊘ n)[col] ⊙ (E + ΔE), forward (m ⊘ n) ⊙ (E(t, :) + s·A(:, t)ᵀ·Bᵀ); built here with
  // fresh random factors and checked in float64.
  Generator gen(lora::test::fresh_seed());
  const Index vocab = 40 + static_cast<Index>(gen.next() % 20), dim = 12 + static_cast<Index>(gen.next() % 8), r = 4;
  const Matrix<double> E = lora::test::random_matrix(vocab, dim, gen), A = lora::test::random_matrix(r, vocab, gen, 0.3),
                       B = lora::test::random_matrix(dim, r, gen, 0.3);
  Vector<double> m(dim);
  for (Index j = 0; j < dim; ++j) m(j) = 0.5 + gen.uniform();
  const double s = 8.0 / r;
  const Matrix<double> V = E + s * (B * A).transpose();  // [vocab × dim]
  const Vector<double> n = V.colwise().norm().transpose();
  const Matrix<double> merged = V * m.cwiseQuotient(n).asDiagonal();
  TempDir tmp("dora-emb");
  fs::create_directories(tmp.path / "adapter");
  write_json(tmp.path / "adapter" / "adapter_config.json",
             nlohmann::ordered_json{{"peft_type", "LORA"}, {"r", r}, {"lora_alpha", 8}, {"use_dora", true},
                                    {"target_modules", {"embed_tokens"}}});
  const std::string key = "base_model.model.model.embed_tokens";
  io::write_bytes(tmp.path / "adapter" / "adapter_model.safetensors",
                  io::serialize_safetensors({io::TensorData::from_matrix(key + ".lora_embedding_A", A, io::dtype::F32),
                                             io::TensorData::from_matrix(key + ".lora_embedding_B", B, io::dtype::F32),
                                             io::TensorData::from_values(key + ".lora_magnitude_vector", m.data(), {dim},
                                                                         io::dtype::F32)},
                                            {}));
  io::write_bytes(tmp.path / "base.safetensors",
                  io::serialize_safetensors({io::TensorData::from_matrix("model.embed_tokens.weight", E, io::dtype::F32)}, {}));
  const auto ad = io::load_peft_adapter(tmp.path / "adapter");
  const auto& mod = ad.at("model.embed_tokens");
  REQUIRE(mod.is_embedding());
  REQUIRE(mod.is_dora());
  const std::vector<std::int64_t> ids = {0, vocab - 1, 7, 7, static_cast<std::int64_t>(gen.next() % vocab)};
  const Matrix<float> Ef = E.cast<float>();
  const Matrix<float> y = embedding_forward(mod.adapter, MatrixRef<float>(Ef), ids);
  Matrix<double> want(static_cast<Index>(ids.size()), dim);
  for (std::size_t i = 0; i < ids.size(); ++i) want.row(static_cast<Index>(i)) = merged.row(static_cast<Index>(ids[i]));
  CHECK(rel_error(y, want) < 1e-5);
  io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "base.safetensors"), ad, tmp.path / "m.safetensors");
  CHECK(rel_error(io::SafetensorsFile::open(tmp.path / "m.safetensors").tensor("model.embed_tokens.weight").to_matrix<double>(),
                  merged) < 1e-5);
  // merge/unmerge on the table itself, and the saved folder loads back the same
  Matrix<float> W = Ef;
  const auto norms = mod.adapter.merge(W);
  CHECK(rel_error(W, merged) < 1e-5);
  mod.adapter.unmerge(W, norms);
  CHECK(rel_error(W, E) < 1e-5);
  io::save_peft_adapter(tmp.path / "copy", ad);
  const auto back = io::load_peft_adapter(tmp.path / "copy");
  CHECK(back.at("model.embed_tokens").is_dora());
  CHECK(back.at("model.embed_tokens").adapter.magnitude() == mod.adapter.magnitude());
}

TEST_CASE("lora_bias: forward adds s·b_B, merge adds it to the base bias, bias-less base refused", "[peft][bias]") {
  for (const char* c : {"lora_bias", "lora_bias_nobias"}) {
    INFO(c);
    const auto ad = io::load_peft_adapter(peft(c, "adapter"));
    const auto ref = io::SafetensorsFile::open(peft(c, "reference.safetensors"));
    const auto base = io::SafetensorsFile::open(peft(c, "base/model.safetensors"));
    CHECK(ad.modules.size() == 7u * folder_layers(c));  // all 7 projections of each layer
    for (const auto& m : ad.modules) {
      INFO(m.name);
      REQUIRE(m.lora_bias);
      const Vector<float> db = *m.lora_bias * static_cast<float>(m.adapter.scaling());
      const auto want_db = ref.tensor(m.name + ".delta_bias").to_vector<float>();
      CHECK(rel_error(db, Eigen::Map<const Vector<float>>(want_db.data(), db.size())) < 1e-6);
      const Matrix<float> W = base.tensor(m.name + ".weight").to_matrix<float>();
      const Matrix<float> x = ref.tensor(m.name + ".x").to_matrix<float>();
      std::optional<Vector<float>> b;
      if (base.contains(m.name + ".bias")) {
        const auto v = base.tensor(m.name + ".bias").to_vector<float>();
        b = Eigen::Map<const Vector<float>>(v.data(), static_cast<Index>(v.size()));
      }
      const Matrix<float> y = apply_with_bias(m.adapter.lora(), MatrixRef<float>(W), b ? &*b : nullptr, *m.lora_bias,
                                              MatrixRef<float>(x));
      CHECK(rel_error(y, ref.tensor(m.name + ".y").to_matrix<float>()) < 1e-5);
      if (!b) CHECK_THROWS_WITH(merge_bias(m.adapter.lora(), nullptr, *m.lora_bias), ContainsSubstring("no bias"));
    }
  }
  TempDir tmp("peft-nobias");
  const auto ad = io::load_peft_adapter(peft("lora_bias_nobias", "adapter"));
  CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(peft("lora_bias_nobias", "base")), ad, tmp.path / "m"),
                    ContainsSubstring("the base layer has no bias"));
  CHECK(!fs::exists(tmp.path / "m"));
  // lora_B.bias under lora_bias = false: PEFT ignores it; so do we, and say so
  const fs::path edited = tmp.path / "nobias-config";
  copy_folder(peft("lora_bias", "adapter"), edited);
  auto j = read_json(edited / "adapter_config.json");
  j["lora_bias"] = false;
  write_json(edited / "adapter_config.json", j);
  const auto plain = io::load_peft_adapter(edited);
  const auto edited_file = io::SafetensorsFile::open(edited / "adapter_model.safetensors");
  CHECK(plain.skipped.size() ==  // every lora_B.bias of the file
        static_cast<std::size_t>(lora::test::count_ending(edited_file, ".lora_B.bias")));
  CHECK(!plain.skipped.empty());
  CHECK_THAT(plain.skipped.front().reason, ContainsSubstring("lora_bias = false"));
  for (const auto& m : plain.modules) CHECK(!m.lora_bias);
}

TEST_CASE("trainable tokens replace the embedding's rows (and lm_head's when tied)", "[peft][tokens]") {
  for (const char* c : {"trainable_tokens", "trainable_tokens_tied"}) {
    INFO(c);
    const auto ad = io::load_peft_adapter(peft(c, "adapter"));
    const auto ref = io::SafetensorsFile::open(peft(c, "reference.safetensors"));
    REQUIRE(ad.trainable_tokens.size() == 1);
    const auto& t = ad.trainable_tokens[0];
    CHECK(t.module == "model.embed_tokens");
    CHECK(t.indices == ref.tensor("model.embed_tokens.token_indices").to_vector<std::int64_t>());
    CHECK(rel_error(t.rows, ref.tensor("model.embed_tokens.new_rows").to_matrix<float>()) == 0);
  }
  // tied detection without config.json: lm_head holds the embedding's bytes
  TempDir tmp("peft-tied");
  fs::create_directories(tmp.path / "base");
  fs::copy_file(peft("trainable_tokens_tied", "base/model.safetensors"), tmp.path / "base" / "model.safetensors");
  const auto ad = io::load_peft_adapter(peft("trainable_tokens_tied", "adapter"));
  io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "base"), ad, tmp.path / "m");
  CHECK(check_merged("trainable_tokens_tied", tmp.path / "m" / "model.safetensors") ==
        2 * folder_layers("trainable_tokens_tied") + 2);  // q and v of each layer, the embedding and lm_head
  // and forced untied: lm_head stays
  io::MergeOptions o;
  o.tie_word_embeddings = false;
  io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "base"), ad, tmp.path / "u", o);
  const auto u = io::SafetensorsFile::open(tmp.path / "u" / "model.safetensors");
  const auto b = io::SafetensorsFile::open(tmp.path / "base" / "model.safetensors");
  CHECK(u.tensor("lm_head.weight").to_vector<float>() == b.tensor("lm_head.weight").to_vector<float>());
}

TEST_CASE("bf16 adapter files load and merge within one bf16 rounding", "[peft][bf16]") {
  const auto ad = io::load_peft_adapter(peft("lora_r16_bf16_saved", "adapter"));
  const auto ref = io::SafetensorsFile::open(peft("lora_r16_bf16_saved", "reference.safetensors"));
  CHECK(ad.modules.size() == 4u * folder_layers("lora_r16_bf16_saved"));  // q, k, v and o of each layer
  for (const auto& m : ad.modules) {
    CHECK(m.stored_dtype == io::dtype::BF16);
    CHECK(rel_error(m.adapter.delta_weight(), ref.tensor(m.name + ".delta_weight_f32").to_matrix<float>()) < 1e-6);
  }
}

TEST_CASE("the config selects modules as PEFT does", "[peft][select]") {
  TempDir tmp("peft-select");
  const fs::path folder = tmp.path / "a";
  copy_folder(peft("lora_r8_a16_all", "adapter"), folder);
  auto edit = [&](auto fn) {
    auto j = read_json(peft("lora_r8_a16_all", "adapter/adapter_config.json"));
    fn(j);
    write_json(folder / "adapter_config.json", j);
    return io::load_peft_adapter(folder);
  };
  auto names = [](const io::PeftAdapter& a) {
    std::vector<std::string> n;
    for (const auto& m : a.modules) n.push_back(m.name);
    return n;
  };
  // the adapter has the 7 projections of every layer: 14 tensors a layer
  const std::size_t layers = lora::test::layers_of(peft("lora_r8_a16_all", "base/model.safetensors"));
  REQUIRE(layers >= 2);  // the selections by layer below keep some layers and drop others
  const std::size_t last = layers - 1;
  // a list: suffix match; the other 5 modules' 10 tensors of each layer are skipped and reported
  auto qv = edit([](auto& j) { j["target_modules"] = {"q_proj", "v_proj"}; });
  CHECK(qv.modules.size() == 2 * layers);
  CHECK(qv.skipped.size() == 10 * layers);
  CHECK_THAT(qv.skipped.front().reason, ContainsSubstring("not adapted under this config"));
  // a string: full-match regex
  auto re = edit([&](auto& j) { j["target_modules"] = fmt::format(".*layers\\.{}\\.self_attn\\.(q|k)_proj", last); });
  CHECK(names(re) == std::vector<std::string>{fmt::format("model.layers.{}.self_attn.k_proj", last),
                                              fmt::format("model.layers.{}.self_attn.q_proj", last)});
  // a string matches the whole path: "q_proj" alone matches no module, every tensor is skipped
  CHECK_THROWS_WITH(edit([](auto& j) { j["target_modules"] = "q_proj"; }),
                    ContainsSubstring(fmt::format("({} skipped", 14 * layers)));
  // exclude_modules
  auto ex = edit([](auto& j) { j["exclude_modules"] = {"mlp.down_proj", "k_proj"}; });
  CHECK(ex.modules.size() == 5 * layers);
  auto exr = edit([](auto& j) { j["exclude_modules"] = ".*\\.0\\..*"; });
  CHECK(exr.modules.size() == 7 * (layers - 1));
  // layers_to_transform + layers_pattern
  auto l1 = edit([&](auto& j) {
    j["layers_to_transform"] = {last};
    j["layers_pattern"] = "layers";
  });
  CHECK(l1.modules.size() == 7);
  for (const auto& m : l1.modules) CHECK_THAT(m.name, ContainsSubstring(fmt::format("layers.{}.", last)));
  auto l0 = edit([](auto& j) { j["layers_to_transform"] = 0; });  // an int, any layers_pattern
  CHECK(l0.modules.size() == 7);
  auto nomatch = [&] {
    edit([](auto& j) {
      j["layers_to_transform"] = {0};
      j["layers_pattern"] = {"h"};
    });
  };
  CHECK_THROWS_WITH(nomatch(), ContainsSubstring("holds no LoRA tensors the config selects"));
  // modules_to_save never carry an adapter
  auto mts = edit([](auto& j) { j["modules_to_save"] = {"q_proj"}; });
  CHECK(mts.modules.size() == 6 * layers);
  // merging under the q/v config changes exactly q and v of each layer, and reports the rest
  write_json(folder / "adapter_config.json", [&] {
    auto j = read_json(peft("lora_r8_a16_all", "adapter/adapter_config.json"));
    j["target_modules"] = {"q_proj", "v_proj", "o_proj"};
    return j;
  }());
  // drop o_proj's tensors from the file: targeted without tensors
  {
    const auto f = io::SafetensorsFile::open(folder / "adapter_model.safetensors");
    std::vector<io::TensorData> keep;
    for (const auto& t : f.tensors())
      if (t.name.find("o_proj") == std::string::npos) keep.push_back(io::TensorData::copy_of(t));
    const std::string bytes = io::serialize_safetensors(keep, {{"format", "pt"}});
    fs::remove(folder / "adapter_model.safetensors");
    std::ofstream(folder / "adapter_model.safetensors", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const auto sel = io::load_peft_adapter(folder);
  const auto base = io::Checkpoint::open(peft("lora_r8_a16_all", "base/model.safetensors"));
  const auto missing = io::targeted_without_tensors(base, sel);
  std::vector<std::string> every_o;  // in the base file's order
  const auto base_file = io::SafetensorsFile::open(peft("lora_r8_a16_all", "base/model.safetensors"));
  for (const auto& k : base_file.names())
    if (k.ends_with(".self_attn.o_proj.weight")) every_o.push_back(k.substr(0, k.size() - 7));
  CHECK(every_o.size() == layers);
  CHECK(missing == every_o);
  const auto s = io::merge_peft_checkpoint(base, sel, tmp.path / "m.safetensors");
  CHECK(s.merged == 2 * layers);
}

TEST_CASE("save → load keeps every kind of tensor", "[peft][save]") {
  TempDir tmp("peft-save");
  for (const char* c : {"modules_to_save_lm_head_embed", "embedding_lora", "lora_bias", "trainable_tokens"}) {
    INFO(c);
    const auto ad = io::load_peft_adapter(peft(c, "adapter"));
    io::save_peft_adapter(tmp.path / c, ad);
    const auto back = io::load_peft_adapter(tmp.path / c);
    REQUIRE(back.modules.size() == ad.modules.size());
    for (std::size_t i = 0; i < ad.modules.size(); ++i) {
      CHECK(back.modules[i].kind == ad.modules[i].kind);
      CHECK(back.modules[i].adapter.delta_weight() == ad.modules[i].adapter.delta_weight());
      CHECK(back.modules[i].lora_bias.has_value() == ad.modules[i].lora_bias.has_value());
    }
    REQUIRE(back.saved.size() == ad.saved.size());
    for (std::size_t i = 0; i < ad.saved.size(); ++i) CHECK((back.saved[i].data.bytes == ad.saved[i].data.bytes));  // no decomposition: Catch v2 cannot print std::byte under clang
    REQUIRE(back.trainable_tokens.size() == ad.trainable_tokens.size());
    for (std::size_t i = 0; i < ad.trainable_tokens.size(); ++i) {
      CHECK(back.trainable_tokens[i].indices == ad.trainable_tokens[i].indices);
      CHECK(back.trainable_tokens[i].rows == ad.trainable_tokens[i].rows);
    }
    // and the saved folder merges as the original
    const fs::path out = tmp.path / (std::string(c) + "-merged");
    io::merge_peft_checkpoint(io::Checkpoint::open(peft(c, "base")), back, out);
    check_merged(c, out / "model.safetensors");
  }
}
