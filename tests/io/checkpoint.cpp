// lora/io/checkpoint.hpp: sharded checkpoints (model.safetensors.index.json) read and
// written, streaming writes are atomic; lora/io/merge.hpp: merging PEFT adapters gives
// PEFT's merge_and_unload() state dict.
#include <lora/io/checkpoint.hpp>
#include <lora/io/merge.hpp>

#include <filesystem>
#include <cstring>
#include <fstream>
#include <random>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::data;
using lora::test::TempDir;
using Catch::Matchers::ContainsSubstring;
using lora::test::rel_error;
namespace fs = std::filesystem;

namespace {

std::vector<io::TensorSpec> specs_of(const io::SafetensorsFile& f, std::optional<io::dtype> as = std::nullopt) {
  std::vector<io::TensorSpec> s;
  for (const auto& t : f.tensors()) s.push_back({t.name, as && io::is_float(t.type) ? *as : t.type, t.shape});
  return s;
}

/// Copies a single-file checkpoint into `out`, as shards of at most `max_bytes`, optionally converted.
void reshard(const fs::path& src, const fs::path& out, std::uint64_t max_bytes, std::optional<io::dtype> as = {}) {
  const auto f = io::SafetensorsFile::open(src);
  auto layout = io::CheckpointLayout::split(specs_of(f, as), max_bytes);
  io::write_checkpoint(out, layout, [&](const io::TensorSpec& s) {
    const auto& v = f.tensor(s.name);
    if (s.type == v.type) return io::TensorBytes::borrow(v.bytes);
    return io::TensorBytes::own(io::detail::convert_floats(v, s.type));
  });
}

bool same_bytes(const io::TensorView& a, const io::TensorView& b) {
  return a.type == b.type && a.shape == b.shape && std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end());
}

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
  reshard(data("peft/" + name + "/base/model.safetensors"), tmp.path / "base", 100'000);
  const auto base = io::Checkpoint::open(tmp.path / "base");
  CHECK(base.sharded());
  CHECK(base.shard_count() >= 3);
  CHECK(base.shard_name(0) == fmt::format("model-00001-of-{:05d}.safetensors", base.shard_count()));
  CHECK(base.index_metadata()["total_size"] == base.total_bytes());
  const auto single = io::SafetensorsFile::open(data("peft/" + name + "/base/model.safetensors"));
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
  // a base whose weight has the wrong shape
  for (auto& t : ts)
    if (t.name == "model.layers.0.self_attn.k_proj.weight")
      t = io::TensorData::from_matrix(t.name, Matrix<float>::Ones(64, 64), io::dtype::F32);
  ts.push_back(io::TensorData::copy_of(f.tensor("model.layers.1.mlp.up_proj.weight")));
  io::write_safetensors(tmp.path / "shape.safetensors", ts);
  CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(tmp.path / "shape.safetensors"), ad,
                                              tmp.path / "out.safetensors"),
                    ContainsSubstring("k_proj.weight") && ContainsSubstring("[64, 64]") &&
                        ContainsSubstring("needs [32, 64]"));
  io::MergeOptions bad;
  bad.out_dtype = io::dtype::I8;
  CHECK_THROWS_WITH(io::merge_peft_checkpoint(io::Checkpoint::open(data("peft/" + name + "/base/model.safetensors")),
                                              ad, tmp.path / "out", bad),
                    ContainsSubstring("I8"));
  CHECK_FALSE(fs::exists(tmp.path / "out.safetensors"));
  CHECK_FALSE(fs::exists(tmp.path / "out"));
}

TEST_CASE("bad indexes are rejected naming the file; failed writes leave nothing", "[checkpoint]") {
  TempDir tmp("ck");
  reshard(data("peft/lora_r8_a16_all/base/model.safetensors"), tmp.path / "ok", 150'000);
  const fs::path idx = tmp.path / "ok" / io::checkpoint_index_name;
  nlohmann::ordered_json j;
  {
    std::ifstream in(idx);
    j = nlohmann::ordered_json::parse(in);
  }
  auto variant = [&](const std::string& name, auto edit) {
    const fs::path d = tmp.path / name;
    fs::create_directories(d);
    for (auto& e : fs::directory_iterator(tmp.path / "ok")) fs::copy_file(e.path(), d / e.path().filename());
    auto k = j;
    edit(k, d);
    std::ofstream(d / io::checkpoint_index_name) << k.dump();
    return d;
  };
  const std::string shard0 = j["weight_map"]["lm_head.weight"];
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("noshard", [&](auto&, const fs::path& d) { fs::remove(d / shard0); })),
                    ContainsSubstring(shard0) && ContainsSubstring("does not exist") &&
                        ContainsSubstring(io::checkpoint_index_name));
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("wrongshard", [&](auto& k, const fs::path&) {
                      k["weight_map"]["model.norm.weight"] = shard0 == k["weight_map"]["model.norm.weight"]
                                                                 ? k["weight_map"]["model.embed_tokens.weight"]
                                                                 : k["weight_map"]["lm_head.weight"];
                    })),
                    ContainsSubstring("model.norm.weight") && ContainsSubstring("no such tensor"));
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("escape", [&](auto& k, const fs::path&) {
                      k["weight_map"]["model.norm.weight"] = "../ok/" + shard0;
                    })),
                    ContainsSubstring("not a file name"));
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("nomap", [&](auto& k, const fs::path&) { k.erase("weight_map"); })),
                    ContainsSubstring("weight_map"));
  {
    const fs::path d = variant("badjson", [](auto&, const fs::path&) {});
    std::ofstream(d / io::checkpoint_index_name) << "{\"weight_map\": ";
    CHECK_THROWS_WITH(io::Checkpoint::open(d), ContainsSubstring("not valid JSON"));
  }
  CHECK_THROWS_WITH(io::Checkpoint::open(tmp.path / "none"), ContainsSubstring("does not exist"));
  fs::create_directories(tmp.path / "empty");
  CHECK_THROWS_WITH(io::Checkpoint::open(tmp.path / "empty"), ContainsSubstring("model.safetensors"));

  // a producer that fails half-way leaves no folder and no file
  const auto f = io::SafetensorsFile::open(data("peft/lora_r8_a16_all/base/model.safetensors"));
  auto layout = io::CheckpointLayout::split(specs_of(f), 100'000);
  int n = 0;
  auto failing = [&](const io::TensorSpec& s) {
    if (++n == 5) lora::detail::fail("producer failed on '{}'", s.name);
    return io::TensorBytes::borrow(f.tensor(s.name).bytes);
  };
  CHECK_THROWS_WITH(io::write_checkpoint(tmp.path / "partial", layout, failing), ContainsSubstring("producer failed"));
  CHECK_FALSE(fs::exists(tmp.path / "partial"));
  n = 0;
  auto one = io::CheckpointLayout::split(specs_of(f), 1u << 30);
  one.single_file = true;
  CHECK_THROWS(io::write_checkpoint(tmp.path / "partial.safetensors", one, failing));
  // a producer giving the wrong size is caught too
  auto short_bytes = [&](const io::TensorSpec&) { return io::TensorBytes::own(std::vector<std::byte>(3)); };
  CHECK_THROWS_WITH(io::write_checkpoint(tmp.path / "partial.safetensors", one, short_bytes),
                    ContainsSubstring("3 bytes"));
  CHECK_FALSE(fs::exists(tmp.path / "partial.safetensors"));
  int leftovers = 0;
  for ([[maybe_unused]] auto& e : fs::directory_iterator(tmp.path))
    if (e.path().filename().string().rfind(".partial", 0) == 0) ++leftovers;
  CHECK(leftovers == 0);
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
        io::PeftModule mod{"m", lora, std::nullopt, io::dtype::F32};
        Vector<double> m(out);
        for (Index i = 0; i < out; ++i) m(i) = static_cast<float>(0.5 + gen.uniform());  // float-exact
        if (dora) mod.magnitude = m.cast<float>();
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

TEST_CASE("large files go through the O_DIRECT staging path and read back bit for bit", "[checkpoint]") {
  // Over StreamingFile::kDirectMin (64 MiB), with tensors that straddle the 8 MiB staging
  // buffer and the 4 KiB alignment and an odd tail: the aligned part is written direct,
  // the tail buffered (or everything buffered where the file system refuses O_DIRECT).
  const auto seed = lora::test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  TempDir tmp("ck");
  const std::vector<io::TensorSpec> specs = {{"a", io::dtype::F32, {4099, 2049}},
                                             {"b", io::dtype::BF16, {7, 3, 1000003}},
                                             {"c", io::dtype::U8, {13}}};
  std::vector<std::vector<std::byte>> bytes;
  for (const auto& s : specs) {
    std::vector<std::byte> b(s.nbytes());
    for (auto& x : b) x = static_cast<std::byte>(rng() & 0xff);
    bytes.push_back(std::move(b));
  }
  std::uint64_t total = 0;
  for (const auto& s : specs) total += s.nbytes();
  REQUIRE(total > io::detail::StreamingFile::kDirectMin);
  {
    io::detail::StreamingFile probe(tmp.path / "probe.safetensors", specs, {});
    if (!probe.direct()) WARN("O_DIRECT not available under " << tmp.path << ": the buffered path is tested");
  }
  for (bool single : {true, false}) {
    auto layout = io::CheckpointLayout::split(specs, single ? (1ull << 40) : 80'000'000);
    layout.single_file = single;
    const fs::path out = tmp.path / (single ? "big.safetensors" : "big");
    std::size_t i = 0;
    io::write_checkpoint(out, layout, [&](const io::TensorSpec& s) {
      REQUIRE(s.name == specs[i].name);
      return io::TensorBytes::borrow(bytes[i++]);
    });
    const auto ck = io::Checkpoint::open(out);
    for (std::size_t k = 0; k < specs.size(); ++k) {
      const auto& t = ck.tensor(specs[k].name);
      REQUIRE(t.bytes.size() == bytes[k].size());
      CHECK(std::memcmp(t.bytes.data(), bytes[k].data(), bytes[k].size()) == 0);
    }
  }
}

// ---- hostile files (issue 21) ------------------------------------------------------------

#include <sys/stat.h>

#include <chrono>

TEST_CASE("hostile: an index must list every tensor of its shards; shard names are plain (class 5)",
          "[checkpoint][hostile]") {
  TempDir tmp("ck");
  reshard(data("peft/lora_r8_a16_all/base/model.safetensors"), tmp.path / "ok", 150'000);
  const fs::path idx = tmp.path / "ok" / io::checkpoint_index_name;
  nlohmann::ordered_json j;
  {
    std::ifstream in(idx);
    j = nlohmann::ordered_json::parse(in);
  }
  auto variant = [&](const std::string& name, auto edit) {
    const fs::path d = tmp.path / name;
    fs::create_directories(d);
    for (auto& e : fs::directory_iterator(tmp.path / "ok")) fs::copy_file(e.path(), d / e.path().filename());
    auto k = j;
    edit(k, d);
    fs::remove(d / io::checkpoint_index_name);
    std::ofstream(d / io::checkpoint_index_name) << k.dump();
    return d;
  };
  CHECK(io::Checkpoint::open(tmp.path / "ok").size() == j["weight_map"].size());
  // a tensor the weight_map forgets was silently dropped from every output
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("unlisted", [](auto& k, const fs::path&) {
                      k["weight_map"].erase("model.norm.weight");
                    })),
                    ContainsSubstring(io::checkpoint_index_name) && ContainsSubstring("'model.norm.weight'") &&
                        ContainsSubstring("does not list"));
  // a NUL byte (or another control character) in a shard name was copied into the output
  const std::string shard0 = j["weight_map"]["lm_head.weight"];
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("nul", [&](auto& k, const fs::path&) {
                      k["weight_map"]["lm_head.weight"] = shard0 + std::string(1, '\0') + "x";
                    })),
                    ContainsSubstring("'lm_head.weight'") && ContainsSubstring("not a file name"));
  // the same tensor twice in the weight_map
  {
    const fs::path d = variant("twice", [](auto&, const fs::path&) {});
    std::string text = j.dump();
    text.insert(text.find("\"weight_map\":{") + 14, "\"lm_head.weight\":\"" + shard0 + "\",");
    fs::remove(d / io::checkpoint_index_name);
    std::ofstream(d / io::checkpoint_index_name) << text;
    CHECK_THROWS_WITH(io::Checkpoint::open(d), ContainsSubstring("'lm_head.weight' appears twice"));
  }
  // deep metadata (class 1), a FIFO or a folder as the index (class 3)
  CHECK_THROWS_WITH(io::Checkpoint::open(variant("deep", [](auto& k, const fs::path&) {
                      nlohmann::ordered_json v = 1;
                      for (int i = 0; i < 100; ++i) v = nlohmann::ordered_json::array({v});
                      k["metadata"]["x"] = v;
                    })),
                    ContainsSubstring(io::checkpoint_index_name) && ContainsSubstring("nested deeper"));
  {
    const fs::path d = variant("fifo", [](auto&, const fs::path&) {});
    fs::remove(d / io::checkpoint_index_name);
    REQUIRE(::mkfifo((d / io::checkpoint_index_name).c_str(), 0600) == 0);
    CHECK_THROWS_WITH(io::Checkpoint::open(d), ContainsSubstring(io::checkpoint_index_name) && ContainsSubstring("FIFO"));
    fs::remove(d / io::checkpoint_index_name);
    fs::create_directory(d / io::checkpoint_index_name);
    CHECK_THROWS_WITH(io::Checkpoint::open(d), ContainsSubstring(io::checkpoint_index_name) && ContainsSubstring("folder"));
  }
  {
    const fs::path d = variant("fifoshard", [](auto&, const fs::path&) {});
    fs::remove(d / shard0);
    REQUIRE(::mkfifo((d / shard0).c_str(), 0600) == 0);
    CHECK_THROWS_WITH(io::Checkpoint::open(d), ContainsSubstring(shard0) && ContainsSubstring("FIFO"));
  }
}

TEST_CASE("hostile: index handling is n log n (class 4)", "[checkpoint][hostile]") {
  // ordered_json's linear lookups made a 200,000-name index quadratic (~2·10^10 key
  // comparisons, minutes); as a std::map it is a fraction of a second (seconds under ASan).
  std::string text = R"({"metadata": {"total_size": 200000}, "weight_map": {)";
  for (int i = 0; i < 200000; ++i)
    text += fmt::format(R"({}"model.layers.{}.mlp.down_proj.weight": "model-{:05d}-of-00004.safetensors")", i ? ", " : "",
                        i, 1 + i % 4);
  text += "}}";
  const auto t0 = std::chrono::steady_clock::now();
  const auto idx = io::parse_checkpoint_index(text, "index.json");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(idx.weight_map.size() == 200000);
  CHECK(idx.weight_map[123456].first == "model.layers.123456.mlp.down_proj.weight");  // the file's order
  CHECK(idx.weight_map[123456].second == "model-00001-of-00004.safetensors");
  CHECK(idx.metadata["total_size"] == 200000);
  INFO("200,000 names: " << secs << " s");
  CHECK(secs < 30);
  // and written back: the weight_map text is built without ordered_json (was quadratic too)
  TempDir tmp("ck");
  std::vector<io::TensorSpec> specs;
  for (int i = 0; i < 30000; ++i) specs.push_back({fmt::format("w.{}", i), io::dtype::U8, {1}});
  const std::vector<std::byte> one{std::byte{7}};
  const auto t1 = std::chrono::steady_clock::now();
  io::write_checkpoint(tmp.path / "ck", io::CheckpointLayout::split(specs, 10000),
                       [&](const io::TensorSpec&) { return io::TensorBytes::borrow(one); });
  const auto ck = io::Checkpoint::open(tmp.path / "ck");
  CHECK(ck.size() == specs.size());
  CHECK(ck.shard_count() == 3);
  CHECK(ck.tensor("w.29999").at<int>(0) == 7);
  CHECK(std::chrono::steady_clock::now() - t1 < std::chrono::seconds(60));
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
