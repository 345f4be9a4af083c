// lora/io/checkpoint.hpp: sharded checkpoints (model.safetensors.index.json) read and
// written, streaming writes are atomic (merging: tests/io/merge.cpp).
#include <lora/io/checkpoint.hpp>
#include <lora/io/merge.hpp>  // detail::convert_floats

#include <filesystem>
#include <cstring>
#include <fstream>
#include <random>

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
using lora::test::reshard;
using lora::test::same_bytes;
using lora::test::specs_of;

TEST_CASE("bad indexes are rejected naming the file; failed writes leave nothing", "[checkpoint]") {
  TempDir tmp("ck");
  // three shards or more whatever the fixture's size: lm_head (first) and model.norm (last) apart
  const std::string src = data("peft/lora_r8_a16_all/base/model.safetensors");
  reshard(src, tmp.path / "ok", lora::test::shard_bytes_for(io::SafetensorsFile::open(src), 3));
  const auto j = lora::test::read_json(tmp.path / "ok" / io::checkpoint_index_name);
  auto variant = [&](const std::string& name, auto edit) {
    return lora::test::edited_copy(tmp.path / "ok", tmp.path / name, j, edit);
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
  // three shards or more whatever the fixture's size: lm_head (first) and model.norm (last) apart
  const std::string src = data("peft/lora_r8_a16_all/base/model.safetensors");
  reshard(src, tmp.path / "ok", lora::test::shard_bytes_for(io::SafetensorsFile::open(src), 3));
  const auto j = lora::test::read_json(tmp.path / "ok" / io::checkpoint_index_name);
  auto variant = [&](const std::string& name, auto edit) {
    return lora::test::edited_copy(tmp.path / "ok", tmp.path / name, j, edit);
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

TEST_CASE("write_checkpoint_by_shard: shards made when their turn comes, the same bytes as serialize_safetensors, "
          "an index of what was made, nothing left on failure",
          "[checkpoint]") {
  TempDir tmp("ck-by-shard");
  Generator gen(lora::test::fresh_seed());
  // tensors whose sizes the layout does not know in advance (a blob of data-dependent length)
  auto shard = [&](int s) {
    std::vector<io::TensorData> t;
    t.push_back(io::TensorData::from_matrix(fmt::format("s{}.w", s), lora::test::random_matrix<float>(5, 3, gen),
                                            io::dtype::BF16));
    const std::string blob(3 + static_cast<std::size_t>(gen.uniform() * 40), 'x');
    t.push_back(io::TensorData::from_values(fmt::format("s{}.blob", s), reinterpret_cast<const std::uint8_t*>(blob.data()),
                                            {static_cast<std::int64_t>(blob.size())}, io::dtype::U8));
    return t;
  };
  io::CheckpointLayout layout;
  layout.shards = {{"b.safetensors", {}, {{"format", "pt"}}}, {"a.safetensors", {}, {}}};
  layout.write_index = true;
  layout.index_metadata = {{"note", "kept"}};
  std::vector<std::vector<io::TensorData>> made;
  std::vector<std::size_t> order;
  io::write_checkpoint_by_shard(tmp.path / "out", layout, [&](std::size_t s) {
    order.push_back(s);
    made.push_back(shard(static_cast<int>(s)));
    return made.back();
  });
  CHECK(order == std::vector<std::size_t>{0, 1});
  CHECK(lora::test::file_bytes(tmp.path / "out" / "b.safetensors") ==
        io::serialize_safetensors(made[0], {{"format", "pt"}}));
  CHECK(lora::test::file_bytes(tmp.path / "out" / "a.safetensors") == io::serialize_safetensors(made[1]));
  const auto idx = lora::test::read_json(tmp.path / "out" / io::checkpoint_index_name);
  CHECK(idx["metadata"]["note"] == "kept");
  CHECK(idx["metadata"]["total_size"] ==
        made[0][0].bytes.size() + made[0][1].bytes.size() + made[1][0].bytes.size() + made[1][1].bytes.size());
  CHECK(idx["weight_map"]["s0.blob"] == "b.safetensors");
  CHECK(idx["weight_map"]["s1.w"] == "a.safetensors");
  const auto ck = io::Checkpoint::open(tmp.path / "out");
  CHECK(ck.names().size() == 4);

  // a failure while making the second shard: the first was written, nothing appears
  CHECK_THROWS_WITH(io::write_checkpoint_by_shard(tmp.path / "fail", layout,
                                                  [&](std::size_t s) {
                                                    if (s == 1) lora::fail("shard {} refused", s);
                                                    return shard(0);
                                                  }),
                    ContainsSubstring("shard 1 refused"));
  CHECK_FALSE(fs::exists(tmp.path / "fail"));
  // a single file; a layout that already lists tensors is refused
  io::CheckpointLayout one;
  one.single_file = true;
  one.shards = {{"x", {}, {}}};
  io::write_checkpoint_by_shard(tmp.path / "one.safetensors", one, [&](std::size_t) { return made[1]; });
  CHECK(lora::test::file_bytes(tmp.path / "one.safetensors") == io::serialize_safetensors(made[1]));
  one.shards[0].tensors.push_back({"t", io::dtype::F32, {1}});
  CHECK_THROWS_WITH(io::write_checkpoint_by_shard(tmp.path / "two.safetensors", one, [&](std::size_t) { return made[1]; }),
                    ContainsSubstring("takes them from make_shard"));
  CHECK_FALSE(fs::exists(tmp.path / "two.safetensors"));
  for (const auto& e : fs::directory_iterator(tmp.path))
    CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
}
