// lora/io/merge.hpp: merging PEFT adapters into a checkpoint gives PEFT's merge_and_unload()
// state dict (fixtures), for single files, shards, folders and stacked adapters; the merge
// runs in parallel chunks (lora/io/parallel_write.hpp) and gives the same bytes for every
// thread count and chunk size; progress is ordered; a failed write leaves nothing.
#include <lora/io/checkpoint.hpp>
#include <lora/io/merge.hpp>
#include <lora/io/parallel_write.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "support/catch.hpp"
#include "support/checkpoints.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::peft;
using lora::test::TempDir;
using Catch::Matchers::ContainsSubstring;
using lora::test::rel_error;
namespace fs = std::filesystem;
using lora::test::file_bytes;
using lora::test::read_json;
using lora::test::reshard;
using lora::test::same_bytes;
using lora::test::specs_of;

namespace {


/// Merged output vs PEFT's merged.safetensors: same keys, shapes, dtypes; 1e-6 relative per tensor.
void check_against_peft(const io::Checkpoint& got, const std::string& name, double tol = 1e-6) {
  const auto want = io::SafetensorsFile::open(data("peft/" + name + "/merged.safetensors"));
  const auto base = io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors"));
  REQUIRE(got.size() == want.size());
  int changed = 0;
  for (const auto& t : want.tensors()) {
    INFO(name << ": " << t.name);
    REQUIRE(got.contains(t.name));
    const auto& g = got.tensor(t.name);
    CHECK(g.type == t.type);
    CHECK(g.shape == t.shape);
    CHECK(rel_error(g.to_matrix<double>(), t.to_matrix<double>()) <= tol);
    if (!same_bytes(base.tensor(t.name), t)) ++changed;
    else CHECK(same_bytes(g, t));  // untargeted: copied byte for byte
  }
  CHECK(changed > 0);
}
}  // namespace

TEST_CASE("merging each PEFT fixture gives merge_and_unload()'s tensors", "[merge]") {
  TempDir tmp("ck");
  for (const std::string name : {"lora_r8_a16_all", "rslora_r16_a8_attn", "dora_r4_a8_qv", "patterns_all"}) {
    INFO(name);
    const auto base = io::Checkpoint::open(data("peft/" + name + "/base/model.safetensors"));
    const auto ad = io::load_peft_adapter(data("peft/" + name + "/adapter"));
    const fs::path out = tmp.path / (name + ".safetensors");
    const auto sum = io::merge_peft_checkpoint(base, ad, out);
    CHECK(sum.merged == ad.modules.size());
    CHECK(sum.merged + sum.copied == base.size());
    check_against_peft(io::Checkpoint::open(out), name);
    // same tensor order as the base file
    CHECK(io::SafetensorsFile::open(out).names() == io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors")).names());
  }
}

TEST_CASE("sharded checkpoints: read through the index, merged shard by shard", "[merge][checkpoint]") {
  TempDir tmp("ck");
  const std::string name = "patterns_all";
  const auto single = io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors"));
  // shards of a quarter of the base's bytes: three or more whatever the fixture's size
  reshard(data("peft/" + name + "/base/model.safetensors"), tmp.path / "base", lora::test::shard_bytes_for(single, 4));
  const auto base = io::Checkpoint::open(tmp.path / "base");
  CHECK(base.sharded());
  CHECK(base.shard_count() >= 3);
  CHECK(base.shard_name(0) == fmt::format("model-00001-of-{:05d}.safetensors", base.shard_count()));
  CHECK(base.index_metadata()["total_size"] == base.total_bytes());
  CHECK(base.size() == single.size());
  for (const auto& t : single.tensors()) CHECK(same_bytes(base.tensor(t.name), t));

  const auto ad = io::load_peft_adapter(data("peft/" + name + "/adapter"));
  io::merge_peft_checkpoint(base, ad, tmp.path / "merged");
  const auto merged = io::Checkpoint::open(tmp.path / "merged");
  CHECK(merged.sharded());
  REQUIRE(merged.shard_count() == base.shard_count());
  for (std::size_t i = 0; i < base.shard_count(); ++i) CHECK(merged.shard_name(i) == base.shard_name(i));
  for (const auto& n : base.names()) CHECK(merged.shard_of(n) == base.shard_of(n));
  check_against_peft(merged, name);

  // and a sharded base into one file, a single-file base into a folder
  io::merge_peft_checkpoint(base, ad, tmp.path / "one.safetensors");
  check_against_peft(io::Checkpoint::open(tmp.path / "one.safetensors"), name);
  io::merge_peft_checkpoint(io::Checkpoint::open(data("peft/" + name + "/base/model.safetensors")), ad,
                            tmp.path / "folder");
  CHECK(fs::exists(tmp.path / "folder" / "model.safetensors"));
  CHECK_FALSE(fs::exists(tmp.path / "folder" / io::checkpoint_index_name));
  check_against_peft(io::Checkpoint::open(tmp.path / "folder"), name);
}

TEST_CASE("bf16 and f16 checkpoints merge with one rounding; --scale and --dtype", "[merge]") {
  TempDir tmp("ck");
  const std::string name = "lora_r8_a16_all";
  const auto ad = io::load_peft_adapter(data("peft/" + name + "/adapter"));
  const auto ref = io::SafetensorsFile::open(data("peft/" + name + "/reference.safetensors"));
  for (auto t : {io::dtype::BF16, io::dtype::F16}) {
    INFO(io::dtype_name(t));
    reshard(data("peft/" + name + "/base/model.safetensors"), tmp.path / "b16", 1u << 30, t);
    const auto base = io::Checkpoint::open(tmp.path / "b16");
    REQUIRE(base.tensor("model.layers.0.self_attn.q_proj.weight").type == t);
    io::merge_peft_checkpoint(base, ad, tmp.path / "m16.safetensors");
    const auto got = io::SafetensorsFile::open(tmp.path / "m16.safetensors");
    for (const auto& m : ad.modules) {
      INFO(m.name);
      const auto& g = got.tensor(m.name + ".weight");
      CHECK(g.type == t);
      // float64 reference: W16 + ΔW, rounded once to the 16-bit type
      const Matrix<double> exact =
          base.tensor(m.name + ".weight").to_matrix<double>() + m.adapter.delta_weight().cast<double>();
      const Matrix<float> rounded = exact.cast<float>().unaryExpr([t](float v) {
        return t == io::dtype::BF16 ? static_cast<float>(bfloat16(v)) : static_cast<float>(half(v));
      });
      const Matrix<float> gm = g.to_matrix<float>();
      const double ulp = t == io::dtype::BF16 ? 1.0 / 128 : 1.0 / 1024;
      // equal up to one unit in the last place where float rounding sits on a tie
      CHECK(((gm - rounded).cwiseAbs().array() <= ulp * rounded.cwiseAbs().array() + 1e-7f).all());
      CHECK((gm.array() == rounded.array()).count() >= static_cast<Eigen::Index>(0.99 * gm.size()));
    }
    // untargeted tensors copied byte for byte
    CHECK(same_bytes(got.tensor("model.embed_tokens.weight"), base.tensor("model.embed_tokens.weight")));
  }

  const auto base = io::Checkpoint::open(data("peft/" + name + "/base/model.safetensors"));
  io::MergeOptions half_scale;
  half_scale.scale = 0.5;
  io::merge_peft_checkpoint(base, ad, tmp.path / "half.safetensors", half_scale);
  const auto h = io::SafetensorsFile::open(tmp.path / "half.safetensors");
  for (const auto& m : ad.modules) {
    const Matrix<double> want = base.tensor(m.name + ".weight").to_matrix<double>() +
                                0.5 * ref.tensor(m.name + ".delta_weight").to_matrix<double>();
    CHECK(rel_error(h.tensor(m.name + ".weight").to_matrix<double>(), want) < 1e-6);
  }

  io::MergeOptions to_bf16;
  to_bf16.out_dtype = io::dtype::BF16;
  int calls = 0;
  to_bf16.progress = [&](const io::WriteProgress& p) {
    ++calls;
    CHECK(p.tensors_done <= p.tensors_total);
    CHECK(p.bytes_done <= p.bytes_total);
  };
  io::merge_peft_checkpoint(base, ad, tmp.path / "as_bf16.safetensors", to_bf16);
  CHECK(calls == static_cast<int>(base.size()));
  const auto c = io::SafetensorsFile::open(tmp.path / "as_bf16.safetensors");
  const auto want = io::SafetensorsFile::open(data("peft/" + name + "/merged.safetensors"));
  for (const auto& t : want.tensors()) {
    INFO(t.name);
    CHECK(c.tensor(t.name).type == io::dtype::BF16);
    CHECK(rel_error(c.tensor(t.name).to_matrix<double>(), t.to_matrix<double>()) < 4e-3);
  }
  CHECK(c.tensor("model.norm.weight").to_matrix<float>() ==
        want.tensor("model.norm.weight").to_matrix<float>().cast<bfloat16>().cast<float>());
}

TEST_CASE("merge refuses adapters that do not fit, leaving no output", "[merge]") {
  TempDir tmp("ck");
  const std::string name = "lora_r8_a16_all";
  const auto ad = io::load_peft_adapter(data("peft/" + name + "/adapter"));
  // a base without one of the targeted weights
  const auto f = io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors"));
  std::vector<io::TensorData> ts;
  for (const auto& t : f.tensors())
    if (t.name != "model.layers.1.mlp.up_proj.weight") ts.push_back(io::TensorData::copy_of(t));
  io::write_safetensors(tmp.path / "missing.safetensors", ts);
  CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "missing.safetensors"), ad,
                                              tmp.path / "out.safetensors"),
                    ContainsSubstring("model.layers.1.mlp.up_proj.weight") && ContainsSubstring("missing.safetensors"));
  // a base whose weight has the wrong shape: one row more than the adapter's k_proj needs
  const auto& k = f.tensor("model.layers.0.self_attn.k_proj.weight");
  const std::int64_t out = k.shape.at(0), in = k.shape.at(1);
  for (auto& t : ts)
    if (t.name == k.name) t = io::TensorData::from_matrix(t.name, Matrix<float>::Ones(out + 1, in), io::dtype::F32);
  ts.push_back(io::TensorData::copy_of(f.tensor("model.layers.1.mlp.up_proj.weight")));
  io::write_safetensors(tmp.path / "shape.safetensors", ts);
  CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "shape.safetensors"), ad,
                                              tmp.path / "out.safetensors"),
                    ContainsSubstring("k_proj.weight") && ContainsSubstring(fmt::format("[{}, {}]", out + 1, in)) &&
                        ContainsSubstring(fmt::format("needs [{}, {}]", out, in)));
  io::MergeOptions bad;
  bad.out_dtype = io::dtype::I8;
  CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(data("peft/" + name + "/base/model.safetensors")),
                                              ad, tmp.path / "out", bad),
                    ContainsSubstring("I8"));
  CHECK_FALSE(fs::exists(tmp.path / "out.safetensors"));
  CHECK_FALSE(fs::exists(tmp.path / "out"));
}

TEST_CASE("merge_weight: LoRA and DoRA, fan_in_fan_out, odd shapes, every float dtype", "[merge]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  TempDir tmp("ck");
  for (bool fifo : {false, true})
    for (bool dora : {false, true})
      for (auto t : {io::dtype::F32, io::dtype::F64, io::dtype::BF16}) {
        INFO("fifo " << fifo << " dora " << dora << " " << io::dtype_name(t));
        const Index out = 21, in = 45, r = 5;  // rows not a multiple of 8, columns not of 32
        AdapterOptions o;
        o.fan_in_fan_out = fifo;
        o.name = "m";
        auto lora = LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
            lora::test::random_matrix<float>(r, in, gen), lora::test::random_matrix<float>(out, r, gen), 3.0, o,
            dynamic_scaling{true});
        Vector<double> m(out);
        for (Index i = 0; i < out; ++i) m(i) = static_cast<float>(0.5 + gen.uniform());  // float-exact
        io::PeftModule mod{"m", {lora, dora ? std::optional(Vector<float>(m.cast<float>())) : std::nullopt},
                           io::dtype::F32};
        const Matrix<double> Wo = lora::test::random_matrix(out, in, gen);  // [out × in]
        const Matrix<double> Wstored = fifo ? Matrix<double>(Wo.transpose()) : Wo;
        io::write_safetensors(tmp.path / "w.safetensors", {io::TensorData::from_matrix("w", Wstored, t)});
        const auto f = io::SafetensorsFile::open(tmp.path / "w.safetensors");
        const Matrix<double> W = f.tensor("w").to_matrix<double>();  // what the file holds
        const Matrix<double> Wd = fifo ? Matrix<double>(W.transpose()) : W;
        const double s = 0.7 * 3.0 / std::sqrt(5.0);
        Matrix<double> V = Wd + s * lora.B().cast<double>() * lora.A().cast<double>();
        if (dora) {
          const Vector<double> n = V.rowwise().norm();
          V = m.cwiseQuotient(n).asDiagonal() * V;
        }
        const Matrix<double> want = fifo ? Matrix<double>(V.transpose()) : V;
        const auto bytes = io::merge_weight(f.tensor("w"), mod, 0.7, t);
        io::TensorData got;
        got.name = "w";
        got.type = t;
        got.shape = f.tensor("w").shape;
        got.bytes.assign(bytes.begin(), bytes.end());
        io::write_safetensors(tmp.path / "m.safetensors", {got});
        const auto g = io::SafetensorsFile::open(tmp.path / "m.safetensors").tensor("w").to_matrix<double>();
        const double tol = t == io::dtype::BF16 ? 4e-3 : t == io::dtype::F32 ? 1e-6 : 1e-6;  // factors are float
        CHECK(rel_error(g, want) < tol);
        if (t == io::dtype::F64) CHECK(rel_error(g, want) < 1e-12);  // computed in double from float factors
      }
}

TEST_CASE("hostile: unsigned and FP8 base tensors pass through a merge unchanged (class 8)", "[merge][hostile]") {
  TempDir tmp("ck");
  const auto src = io::SafetensorsFile::open(data("peft/lora_r8_a16_all/base/model.safetensors"));
  std::vector<io::TensorData> ts;
  for (const auto& t : src.tensors()) ts.push_back(io::TensorData::copy_of(t));
  std::mt19937 rng(lora::test::fresh_seed() & 0xffffffffu);
  auto raw = [&](const std::string& name, io::dtype type, std::int64_t n) {
    io::TensorData t;
    t.name = name;
    t.type = type;
    t.shape = {n};
    t.bytes.resize(static_cast<std::size_t>(n) * io::dtype_size(type));
    for (auto& b : t.bytes) b = static_cast<std::byte>(rng() & 0x77);  // & 0x77: no FP8 NaN/Inf patterns
    ts.push_back(std::move(t));
  };
  raw("extra.u16", io::dtype::U16, 5);
  raw("extra.u32", io::dtype::U32, 6);
  raw("extra.u64", io::dtype::U64, 7);
  raw("extra.f8_e4m3", io::dtype::F8_E4M3, 9);
  raw("extra.f8_e5m2", io::dtype::F8_E5M2, 11);
  io::write_safetensors(tmp.path / "base.safetensors", ts, {{"format", "pt"}});
  const auto base = io::Checkpoint::open(tmp.path / "base.safetensors");
  const auto ad = io::load_peft_adapter(data("peft/lora_r8_a16_all/adapter"));
  for (auto to : {std::optional<io::dtype>{}, std::optional<io::dtype>{io::dtype::BF16}}) {
    io::MergeOptions opt;
    opt.out_dtype = to;
    const fs::path out = tmp.path / (to ? "bf16.safetensors" : "same.safetensors");
    io::merge_peft_checkpoint(base, ad, out, opt);
    const auto got = io::SafetensorsFile::open(out);
    for (const std::string n : {"extra.u16", "extra.u32", "extra.u64", "extra.f8_e4m3", "extra.f8_e5m2"}) {
      INFO(n);
      CHECK(same_bytes(got.tensor(n), base.tensor(n)));
    }
  }
}

TEST_CASE("base key layouts are mapped, or the candidates named", "[peft][keys]") {
  TempDir tmp("peft-keys");
  const std::string c = "lora_r8_a16_all";
  const auto ad = io::load_peft_adapter(peft(c, "adapter"));
  const auto base = io::SafetensorsFile::open(peft(c, "base/model.safetensors"));
  // the base without the "model." prefix (a bare LlamaModel checkpoint)
  auto write_renamed = [&](const fs::path& file, auto rename) {
    std::vector<io::TensorData> ts;
    for (const auto& t : base.tensors()) ts.push_back(io::TensorData::copy_of(t, rename(t.name)));
    io::write_safetensors(file, ts, {{"format", "pt"}});
  };
  auto strip = [](const std::string& n) { return n.rfind("model.", 0) == 0 ? n.substr(6) : n; };
  write_renamed(tmp.path / "bare.safetensors", strip);
  const auto bare = io::Checkpoint::open(tmp.path / "bare.safetensors");
  const auto map = io::resolve_base_keys(bare, {{&ad, 1.0}});
  CHECK(map.strip == "model.");
  CHECK(map.add == "");
  io::merge_peft_checkpoint(bare, ad, tmp.path / "bare-merged.safetensors");
  io::merge_peft_checkpoint(io::Checkpoint::open(peft(c, "base/model.safetensors")), ad, tmp.path / "ref.safetensors");
  const auto got = io::SafetensorsFile::open(tmp.path / "bare-merged.safetensors");
  const auto want = io::SafetensorsFile::open(tmp.path / "ref.safetensors");
  for (const auto& k : want.names())
    CHECK(got.tensor(strip(k)).to_vector<float>() == want.tensor(k).to_vector<float>());
  // a multimodal-style prefix
  write_renamed(tmp.path / "lm.safetensors", [](const std::string& n) { return "language_model." + n; });
  const auto lm = io::resolve_base_keys(io::Checkpoint::open(tmp.path / "lm.safetensors"), {{&ad, 1.0}});
  CHECK(lm(std::string("model.layers.0.self_attn.q_proj.weight")) == "language_model.model.layers.0.self_attn.q_proj.weight");
  // both layouts in one file: ambiguous, the candidates are listed; --base-prefix decides
  {
    std::vector<io::TensorData> ts;
    for (const auto& t : base.tensors()) {
      ts.push_back(io::TensorData::copy_of(t));
      ts.push_back(io::TensorData::copy_of(t, "language_model." + t.name));
    }
    io::write_safetensors(tmp.path / "both.safetensors", ts, {{"format", "pt"}});
  }
  const auto both = io::Checkpoint::open(tmp.path / "both.safetensors");
  CHECK_THROWS_WITH(io::resolve_base_keys(both, {{&ad, 1.0}}),
                    ContainsSubstring("several key mappings") && ContainsSubstring("'' -> 'language_model.'"));
  CHECK(io::resolve_base_keys(both, {{&ad, 1.0}}, io::parse_base_key_map("=language_model.")).add == "language_model.");
  // nothing fits: the closest candidates and a missing key are named
  write_renamed(tmp.path / "other.safetensors", [](const std::string& n) { return "encoder." + n; });
  CHECK_THROWS_WITH(io::resolve_base_keys(io::Checkpoint::open(tmp.path / "other.safetensors"), {{&ad, 1.0}}),
                    ContainsSubstring("no key mapping") &&
                        ContainsSubstring(fmt::format("finds 0 of {}", lora::test::peft_case_modules(c))));
}

TEST_CASE("stacked merges equal sequential merges", "[peft][stack]") {
  TempDir tmp("peft-stack");
  const std::string w = "weighted_combos";
  const auto a1 = io::load_peft_adapter(peft(w, "adapters/a1"));
  const auto a3 = io::load_peft_adapter(peft(w, "adapters/a3"));
  const auto base = io::Checkpoint::open(peft(w, "base/model.safetensors"));
  io::MergeOptions half;
  half.scale = 0.5;
  io::merge_peft_checkpoint(base, a1, tmp.path / "step1.safetensors");
  io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "step1.safetensors"), a3, tmp.path / "step2.safetensors", half);
  io::merge_peft_checkpoint(base, {{&a1, 1.0}, {&a3, 0.5}}, tmp.path / "stacked.safetensors");
  const auto seq = io::SafetensorsFile::open(tmp.path / "step2.safetensors");
  const auto st = io::SafetensorsFile::open(tmp.path / "stacked.safetensors");
  const auto b0 = io::SafetensorsFile::open(peft(w, "base/model.safetensors"));
  int changed = 0;
  for (const auto& k : seq.names()) {
    INFO(k);
    const Matrix<double> s = seq.tensor(k).ndim() == 2 ? seq.tensor(k).to_matrix<double>() : Matrix<double>();
    if (seq.tensor(k).ndim() != 2) continue;
    CHECK(rel_error(st.tensor(k).to_matrix<double>(), s) <= 1e-6);
    if (s != b0.tensor(k).to_matrix<double>()) ++changed;
  }
  CHECK(changed == lora::test::peft_case_modules(w, "adapters/a1"));  // a1 and a3: q, v and down of each layer
  // a float64 reference of one module: W + s1·B1·A1 + 0.5·s3·B3·A3
  const std::string q = "model.layers.0.self_attn.q_proj";
  const Matrix<double> want = b0.tensor(q + ".weight").to_matrix<double>() +
                              a1.at(q).adapter.delta_weight().cast<double>() +
                              0.5 * a3.at(q).adapter.delta_weight().cast<double>();
  CHECK(rel_error(st.tensor(q + ".weight").to_matrix<double>(), want) < 1e-6);
}

TEST_CASE("a merged folder carries the base folder's files and shard layout", "[peft][folder]") {
  TempDir tmp("peft-folder");
  const std::string c = "modules_to_save_lm_head";
  // a sharded base folder with config, tokenizer and generation files and another weight format
  const auto src = io::Checkpoint::open(peft(c, "base"));
  std::vector<io::TensorSpec> specs;
  for (const auto& n : src.names()) specs.push_back({n, src.tensor(n).type, src.tensor(n).shape});
  const auto src_file = io::SafetensorsFile::open(peft(c, "base/model.safetensors"));  // several shards at any size
  const auto layout = io::CheckpointLayout::split(specs, lora::test::shard_bytes_for(src_file, 3));
  REQUIRE(layout.shards.size() > 1);
  const fs::path base_dir = tmp.path / "base";
  io::write_checkpoint(base_dir, layout, [&](const io::TensorSpec& s) { return io::TensorBytes::borrow(src.tensor(s.name).bytes); });
  fs::copy_file(peft(c, "base/config.json"), base_dir / "config.json");
  std::ofstream(base_dir / "tokenizer.json") << "{\"version\": \"1.0\"}";
  std::ofstream(base_dir / "generation_config.json") << "{\"bos_token_id\": 1}";
  std::ofstream(base_dir / "pytorch_model.bin") << "stale weights";
  const auto base = io::Checkpoint::open(base_dir);
  const auto ad = io::load_peft_adapter(peft(c, "adapter"));
  io::MergeOptions o;
  o.out_dtype = io::dtype::BF16;
  const auto s = io::merge_peft_checkpoint(base, ad, tmp.path / "out", o);
  CHECK(s.files_copied == std::vector<std::string>{"config.json", "generation_config.json", "tokenizer.json"});
  CHECK(fs::exists(tmp.path / "out" / "tokenizer.json"));
  CHECK(!fs::exists(tmp.path / "out" / "pytorch_model.bin"));
  CHECK(s.files_skipped == std::vector<std::string>{"pytorch_model.bin"});
  CHECK(read_json(tmp.path / "out" / "config.json")["dtype"] == "bfloat16");
  CHECK(read_json(tmp.path / "out" / "config.json")["tie_word_embeddings"] == false);
  for (std::size_t i = 0; i < base.shard_count(); ++i) CHECK(fs::exists(tmp.path / "out" / base.shard_name(i)));
  const auto idx = read_json(tmp.path / "out" / "model.safetensors.index.json");
  const auto merged = io::Checkpoint::open(tmp.path / "out");
  CHECK(idx["metadata"]["total_size"].get<std::uint64_t>() == merged.total_bytes());
  CHECK(merged.total_bytes() * 2 == base.total_bytes());
}

namespace {

io::PeftModule random_module(const std::string& name, Index out, Index in, Index r, bool fifo, bool dora,
                             Generator& gen) {
  AdapterOptions o;
  o.fan_in_fan_out = fifo;
  o.name = name;
  auto ad = LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
      lora::test::random_matrix<float>(r, in, gen), lora::test::random_matrix<float>(out, r, gen),
      static_cast<double>(2 * r), o);
  if (!dora) return {name, ad, io::dtype::F32};
  Vector<float> mag(out);
  for (Index i = 0; i < out; ++i) mag(i) = static_cast<float>(0.5 + gen.uniform());
  return {name, DoraAdapter<float, cpu, dynamic_scaling>(ad, mag), io::dtype::F32};
}

/// A random checkpoint (odd shapes, every float dtype, an integer tensor) and two adapters
/// that touch it in every way a merge does: LoRA, DoRA, fan_in_fan_out DoRA, lora_bias,
/// F64 weights, stacked on the same tensor.
struct RandomCase {
  std::vector<io::TensorData> tensors;
  io::PeftAdapter a, b;
  explicit RandomCase(Generator& gen) {
    auto add = [&](const std::string& n, Index rows, Index cols, io::dtype t) {
      tensors.push_back(io::TensorData::from_matrix(n, lora::test::random_matrix<double>(rows, cols, gen), t));
      if (cols == 1) tensors.back().shape = {rows};
    };
    add("m.q.weight", 21, 45, io::dtype::F32);
    add("m.k.weight", 45, 21, io::dtype::BF16);  // fan_in_fan_out: [in × out]
    add("m.v.weight", 37, 19, io::dtype::F16);
    add("m.v.bias", 37, 1, io::dtype::F32);
    add("m.o.weight", 16, 64, io::dtype::F64);
    add("emb.weight", 50, 16, io::dtype::BF16);
    add("big.weight", 300, 40, io::dtype::BF16);
    add("norm.weight", 64, 1, io::dtype::F32);
    io::TensorData ids;
    ids.name = "ids";
    ids.type = io::dtype::I64;
    ids.shape = {7};
    ids.bytes.resize(56);
    for (auto& x : ids.bytes) x = static_cast<std::byte>(gen.uniform() * 255);
    tensors.push_back(ids);
    a.modules.push_back(random_module("m.q", 21, 45, 5, false, false, gen));
    a.modules.push_back(random_module("m.k", 21, 45, 4, true, true, gen));
    a.modules.push_back(random_module("m.v", 37, 19, 3, false, false, gen));
    Vector<float> bias(37);
    for (Index i = 0; i < 37; ++i) bias(i) = static_cast<float>(gen.normal(0.0, 1.0));
    a.modules.back().lora_bias = bias;
    a.modules.push_back(random_module("big", 300, 40, 8, false, false, gen));
    b.modules.push_back(random_module("m.q", 21, 45, 3, false, true, gen));
    b.modules.push_back(random_module("m.o", 16, 64, 6, false, true, gen));
    b.modules.push_back(random_module("m.k", 21, 45, 2, true, false, gen));
  }
};

}  // namespace

TEST_CASE("parallel merge: the same bytes for any thread count and chunk size, files or shards", "[merge][parallel]") {
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  Generator gen(seed);
  TempDir tmp("merge-par");
  RandomCase rc(gen);
  io::write_safetensors(tmp.path / "base.safetensors", rc.tensors, {{"format", "pt"}});
  reshard(tmp.path / "base.safetensors", tmp.path / "sharded", 3000);
  const auto single = io::Checkpoint::open(tmp.path / "base.safetensors");
  const auto sharded = io::Checkpoint::open(tmp.path / "sharded");
  REQUIRE(sharded.shard_count() >= 4);
  const std::vector<io::ScaledAdapter> stack{{&rc.a, 1.0}, {&rc.b, -0.7}};
  for (auto to : {std::optional<io::dtype>{}, std::optional<io::dtype>{io::dtype::BF16}, std::optional<io::dtype>{io::dtype::F64}}) {
    INFO("dtype " << (to ? io::dtype_name(*to) : "kept"));
    // each merged tensor: the whole-tensor merge of its steps
    const auto plan = io::merge_plan(single, stack, {}, 1.0, false);
    std::map<std::string, io::ByteBuffer> want;
    for (const auto& [name, steps] : plan) {
      const auto& v = single.tensor(name);
      want[name] = io::apply_merge_steps(v, steps, to ? *to : v.type);
    }
    CHECK(want.size() == 6);
    std::string first;
    for (const bool shards : {false, true})
      for (unsigned threads : {1u, 2u, 3u})
        for (std::size_t chunk : {std::size_t{4096}, std::size_t{8} << 20}) {
          INFO("shards " << shards << " threads " << threads << " chunk " << chunk);
          io::MergeOptions o;
          o.out_dtype = to;
          o.threads = threads;
          o.chunk_bytes = chunk;
          const fs::path out = tmp.path / (shards ? "out" : "out.safetensors");
          const auto sum = io::merge_peft_checkpoint(shards ? sharded : single, stack, out, o);
          CHECK(sum.merged == 6);
          CHECK(sum.copied == 3);
          const auto got = io::Checkpoint::open(out);
          REQUIRE(got.size() == single.size());
          std::string all;
          for (const auto& n : single.names()) {
            INFO(n);
            const auto& g = got.tensor(n);
            all.append(reinterpret_cast<const char*>(g.bytes.data()), g.bytes.size());
            if (auto it = want.find(n); it != want.end())
              CHECK(std::equal(g.bytes.begin(), g.bytes.end(), it->second.begin(), it->second.end()));
            else if (!to || !io::is_float(single.tensor(n).type))
              CHECK(same_bytes(g, single.tensor(n)));
            else {
              const auto conv = io::detail::convert_floats(single.tensor(n), *to);
              CHECK(std::equal(g.bytes.begin(), g.bytes.end(), conv.begin(), conv.end()));
            }
          }
          if (first.empty()) first = all;
          CHECK(all == first);
          if (shards) CHECK(got.shard_count() == sharded.shard_count());
        }
  }
  // a float64 reference of the stacked LoRA + DoRA tensor: V = W + s_a·B_a·A_a − 0.7·s_b·B_b·A_b,
  // rows scaled to b's magnitudes
  io::merge_peft_checkpoint(single, stack, tmp.path / "ref.safetensors");
  const auto& qa = rc.a.modules[0].adapter;
  const auto& qb = rc.b.modules[0];
  Matrix<double> V = single.tensor("m.q.weight").to_matrix<double>() + qa.delta_weight().cast<double>() -
                     0.7 * qb.adapter.delta_weight().cast<double>();
  for (Index i = 0; i < V.rows(); ++i) V.row(i) *= static_cast<double>(qb.adapter.magnitude()(i)) / V.row(i).norm();
  CHECK(rel_error(io::Checkpoint::open(tmp.path / "ref.safetensors").tensor("m.q.weight").to_matrix<double>(), V) < 1e-5);
}

TEST_CASE("parallel merge: progress comes once per tensor, in checkpoint order", "[merge][parallel]") {
  Generator gen(lora::test::fresh_seed());
  TempDir tmp("merge-prog");
  RandomCase rc(gen);
  io::write_safetensors(tmp.path / "base.safetensors", rc.tensors, {{"format", "pt"}});
  const auto base = io::Checkpoint::open(tmp.path / "base.safetensors");
  std::vector<std::string> names;
  std::vector<io::WriteProgress> seen;
  io::MergeOptions o;
  o.threads = 3;
  o.chunk_bytes = 4096;
  o.progress = [&](const io::WriteProgress& p) {
    seen.push_back(p);
    names.emplace_back(p.last);
  };
  io::merge_peft_checkpoint(base, {{&rc.a, 1.0}}, tmp.path / "out.safetensors", o);
  CHECK(names == io::SafetensorsFile::open(tmp.path / "base.safetensors").names());
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < seen.size(); ++i) {
    CHECK(seen[i].tensors_done == i + 1);
    CHECK(seen[i].tensors_total == seen.size());
    bytes += base.tensor(names[i]).bytes.size();
    CHECK(seen[i].bytes_done == bytes);
  }
  CHECK(bytes == seen.back().bytes_total);
}

TEST_CASE("write_checkpoint_parallel: O_DIRECT chunks, the same file as write_checkpoint; a failure leaves nothing",
          "[merge][parallel]") {
  Generator gen(lora::test::fresh_seed());
  TempDir tmp("pwrite");
  RandomCase rc(gen);
  io::write_safetensors(tmp.path / "base.safetensors", rc.tensors, {{"format", "pt"}});
  const auto f = io::SafetensorsFile::open(tmp.path / "base.safetensors");
  auto layout = io::CheckpointLayout::split(specs_of(f), ~std::uint64_t{0});
  layout.single_file = true;
  auto copy = [&](const io::TensorSpec& s, std::uint64_t b, std::uint64_t e, std::byte* dst) {
    std::memcpy(dst, f.tensor(s.name).bytes.data() + b, static_cast<std::size_t>(e - b));
  };
  for (std::uint64_t direct_min : {std::uint64_t{0}, ~std::uint64_t{0}})
    for (unsigned threads : {1u, 4u}) {
      INFO("direct_min " << direct_min << " threads " << threads);
      io::ParallelWriteOptions o;
      o.threads = threads;
      o.chunk_bytes = 4096;
      o.direct_min = direct_min;
      io::write_checkpoint_parallel(tmp.path / "p.safetensors", layout, copy, {}, {}, o);
      CHECK(file_bytes(tmp.path / "p.safetensors") == file_bytes(tmp.path / "base.safetensors"));
    }
  // a fill that throws half way: the exception arrives, no output and no temporary are left,
  // an existing output stays as it was
  const std::string before = file_bytes(tmp.path / "p.safetensors");
  std::size_t entries = 0;
  for ([[maybe_unused]] auto& e : fs::directory_iterator(tmp.path)) ++entries;
  io::ParallelWriteOptions o;
  o.threads = 3;
  o.chunk_bytes = 4096;
  auto failing = [&](const io::TensorSpec& s, std::uint64_t b, std::uint64_t e, std::byte* dst) {
    if (s.name == "m.o.weight") lora::detail::fail("fill failed on '{}'", s.name);
    copy(s, b, e, dst);
  };
  CHECK_THROWS_WITH(io::write_checkpoint_parallel(tmp.path / "p.safetensors", layout, failing, {}, {}, o),
                    ContainsSubstring("fill failed on 'm.o.weight'"));
  CHECK(file_bytes(tmp.path / "p.safetensors") == before);
  auto folder = layout;
  folder.single_file = false;
  folder.shards[0].file = "model.safetensors";
  CHECK_THROWS(io::write_checkpoint_parallel(tmp.path / "new", folder, failing, {}, {}, o));
  CHECK_FALSE(fs::exists(tmp.path / "new"));
  std::size_t after = 0;
  for ([[maybe_unused]] auto& e : fs::directory_iterator(tmp.path)) ++after;
  CHECK(after == entries);
}
