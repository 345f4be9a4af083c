// include/lora/io/quantize.hpp: quantize_checkpoint / dequantize_checkpoint on files and
// sharded folders. Codes are the nearest NF4 code of W/absmax (float64), dequantised values
// equal a float64 code·absmax from the written tensors (bitsandbytes' roundings), the folder's
// index/config edits, progress, and failures that leave nothing behind.
#include <lora/io/quantize.hpp>

#include <nlohmann/json.hpp>

#include <csignal>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/nf4_reference.hpp"
#include "support/reference.hpp"

using namespace lora;
namespace fs = std::filesystem;

namespace {

struct Weight {
  std::string name;
  io::dtype type;
  std::int64_t rows, cols;
};

// A small model: quantisable weights in three float types (odd sizes and a partial block
// included), a skipped lm_head, a 1-D norm and an integer tensor.
std::vector<io::TensorData> model_tensors(Generator& gen, const std::vector<Weight>& ws) {
  std::vector<io::TensorData> out;
  for (const auto& w : ws) {
    const Matrix<float> m = test::random_matrix<float>(w.rows, w.cols, gen, 0.05);
    out.push_back(io::TensorData::from_matrix(w.name, m, w.type));
  }
  const Vector<float> norm = Vector<float>::Random(24);
  out.push_back(io::TensorData::from_matrix("model.norm.weight", norm, io::dtype::F32, true));
  const std::vector<std::int64_t> ids = {3, 1, 4, 1, 5};
  out.push_back(io::TensorData::from_values("model.position_ids", ids.data(), {5}, io::dtype::I64));
  return out;
}

const std::vector<Weight> shard1 = {{"model.layers.0.self_attn.q_proj.weight", io::dtype::BF16, 24, 40},
                                    {"model.layers.0.mlp.up_proj.weight", io::dtype::F32, 33, 17},
                                    {"lm_head.weight", io::dtype::F32, 10, 24}};
const std::vector<Weight> shard2 = {{"model.layers.1.self_attn.v_proj.weight", io::dtype::F16, 16, 24},
                                    {"model.layers.1.mlp.down_proj.weight", io::dtype::F64, 24, 33}};

std::vector<float> floats(const io::TensorView& v) { return v.to_vector<float>(); }

// The float64 dequantisation of weight `w` of a bnb-4bit file, rounded to float where
// bitsandbytes rounds: absmax = f(f(code8·nested_absmax) + offset) with double quantisation,
// value = f(nf4_code · absmax).
std::vector<float> reference_dequant(const io::SafetensorsFile& f, const std::string& w) {
  const auto blob_bytes = f.tensor(w + ".quant_state.bitsandbytes__nf4").to_vector<std::uint8_t>();
  const auto blob = nlohmann::json::parse(std::string(blob_bytes.begin(), blob_bytes.end()));
  const std::int64_t bs = blob["blocksize"].get<std::int64_t>();
  std::int64_t n = 1;
  for (auto d : blob["shape"]) n *= d.get<std::int64_t>();
  const auto packed = f.tensor(w).to_vector<std::uint8_t>();
  std::vector<double> absmax;
  if (blob.contains("nested_offset")) {
    const auto q = f.tensor(w + ".absmax").to_vector<std::uint8_t>();
    const auto na = f.tensor(w + ".nested_absmax").to_vector<double>();
    const auto map = f.tensor(w + ".nested_quant_map").to_vector<double>();
    const double offset = static_cast<float>(blob["nested_offset"].get<double>());
    for (std::size_t i = 0; i < q.size(); ++i)
      absmax.push_back(static_cast<float>(static_cast<double>(static_cast<float>(map[q[i]] * na[i / 256])) + offset));
  } else {
    absmax = f.tensor(w + ".absmax").to_vector<double>();
  }
  std::vector<float> out(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const int c = (i & 1) ? (packed[i >> 1] & 0x0F) : (packed[i >> 1] >> 4);
    out[static_cast<std::size_t>(i)] = static_cast<float>(quant::nf4_code[c] * absmax[static_cast<std::size_t>(i / bs)]);
  }
  return out;
}

// Every code of weight `w` is the nearest NF4 code of W/absmax (float64), but for values
// within 1e-6 of a threshold, where the float32 tree may round the other way.
void check_codes(const io::SafetensorsFile& q, const std::string& w, const std::vector<float>& W, std::int64_t bs) {
  const auto packed = q.tensor(w).to_vector<std::uint8_t>();
  const auto n = static_cast<std::int64_t>(W.size());
  for (std::int64_t b = 0; b * bs < n; ++b) {
    double am = 0;
    for (std::int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) am = std::max(am, std::abs(double(W[i])));
    for (std::int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      const double x = W[i] / am;
      bool near = false;
      for (float t : quant::nf4_thresholds) near |= std::abs(x - t) < 1e-6;
      if (near) continue;
      const int c = (i & 1) ? (packed[i >> 1] & 0x0F) : (packed[i >> 1] >> 4);
      INFO(w << " element " << i);
      REQUIRE(c == test::nearest_nf4_code(x));
    }
  }
}

}  // namespace

TEST_CASE("quantize_checkpoint / dequantize_checkpoint on a file: nearest codes, float64 dequantisation",
          "[io][quantize]") {
  Generator gen(test::fresh_seed());
  test::TempDir dir("quantize-file");
  auto ws = shard1;
  ws.insert(ws.end(), shard2.begin(), shard2.end());
  io::write_safetensors(dir.path / "model.safetensors", model_tensors(gen, ws));
  const auto in = io::SafetensorsFile::open(dir.path / "model.safetensors");
  for (bool dq : {false, true}) {
    INFO("double quantisation " << dq);
    const fs::path q = dir.path / fmt::format("q{}.safetensors", dq), d = dir.path / fmt::format("d{}.safetensors", dq);
    const auto s = io::quantize_checkpoint(dir.path / "model.safetensors", q, {.nf4 = {32, dq}});
    CHECK(s.quantized == 4);  // lm_head skipped
    CHECK(s.kept == 3);
    CHECK(s.compute_dtype == source_dtype::bfloat16);
    CHECK(s.parameters == 24 * 40 + 33 * 17 + 16 * 24 + 24 * 33);
    const auto qf = io::SafetensorsFile::open(q);
    CHECK(qf.metadata().at("format") == "pt");
    CHECK(qf.tensor("lm_head.weight").type == io::dtype::F32);
    CHECK(floats(qf.tensor("lm_head.weight")) == floats(in.tensor("lm_head.weight")));
    CHECK(qf.tensor("model.position_ids").to_vector<std::int64_t>() == std::vector<std::int64_t>{3, 1, 4, 1, 5});
    for (const auto& w : ws) {
      if (w.name == "lm_head.weight") continue;
      check_codes(qf, w.name, floats(in.tensor(w.name)), 32);
      CHECK(qf.tensor(w.name + ".absmax").type == (dq ? io::dtype::U8 : io::dtype::F32));
    }
    for (auto to : {std::optional<io::dtype>{}, std::optional<io::dtype>{io::dtype::F32}}) {
      const auto ds = io::dequantize_checkpoint(q, d, {.to = to});
      CHECK(ds.dequantized == 4);
      CHECK(ds.kept == 3);
      const auto df = io::SafetensorsFile::open(d);
      CHECK(df.names() == in.names());  // companions gone, order kept
      for (const auto& w : ws) {
        if (w.name == "lm_head.weight") continue;
        INFO(w.name);
        const auto& t = df.tensor(w.name);
        // default: the source dtype bitsandbytes records (F64 sources record float32)
        const io::dtype want = to ? *to : w.type == io::dtype::F64 ? io::dtype::F32 : w.type;
        CHECK(t.type == want);
        CHECK(t.shape == std::vector<std::int64_t>{w.rows, w.cols});
        const auto ref = reference_dequant(qf, w.name);
        const auto got = floats(t);
        REQUIRE(got.size() == ref.size());
        for (std::size_t i = 0; i < ref.size(); ++i) {
          // rounded once from the float32 value to the output dtype
          const float r = want == io::dtype::BF16  ? static_cast<float>(bfloat16(ref[i]))
                          : want == io::dtype::F16 ? static_cast<float>(half(ref[i]))
                                                   : ref[i];
          REQUIRE(got[i] == r);
        }
      }
    }
  }
}

TEST_CASE("quantize_checkpoint on a sharded folder: index, config, other files, progress", "[io][quantize]") {
  Generator gen(test::fresh_seed());
  test::TempDir dir("quantize-folder");
  const fs::path model = dir.path / "model";
  fs::create_directories(model);
  io::write_safetensors(model / "model-00001-of-00002.safetensors", model_tensors(gen, shard1), {{"format", "pt"}});
  auto t2 = model_tensors(gen, shard2);
  t2.erase(t2.end() - 2, t2.end());  // norm and ids live in shard 1
  io::write_safetensors(model / "model-00002-of-00002.safetensors", t2, {{"format", "pt"}});
  nlohmann::ordered_json idx;
  idx["metadata"] = {{"total_size", 1}};
  for (const auto& w : shard1) idx["weight_map"][w.name] = "model-00001-of-00002.safetensors";
  idx["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors";
  idx["weight_map"]["model.position_ids"] = "model-00001-of-00002.safetensors";
  for (const auto& w : shard2) idx["weight_map"][w.name] = "model-00002-of-00002.safetensors";
  std::ofstream(model / "model.safetensors.index.json") << idx.dump(2);
  std::ofstream(model / "config.json") << R"({"model_type": "llama", "torch_dtype": "bfloat16"})";
  std::ofstream(model / "tokenizer.json") << "tok\n";

  std::vector<io::WriteProgress> seen;
  const fs::path q = dir.path / "q";
  const auto s = io::quantize_checkpoint(model, q,
                                         {.nf4 = {64, true},
                                          .skip = {"lm_head", "mlp.down_proj"},
                                          .progress = [&](const io::WriteProgress& p) { seen.push_back(p); }});
  CHECK(s.quantized == 3);
  // progress: once per input tensor, then the end with the files' whole size
  const std::uint64_t files = fs::file_size(model / "model-00001-of-00002.safetensors") +
                              fs::file_size(model / "model-00002-of-00002.safetensors");
  REQUIRE(seen.size() == 7 + 1);
  for (std::size_t i = 0; i + 1 < seen.size(); ++i) {
    CHECK(seen[i].tensors_done == i + 1);
    CHECK(seen[i].tensors_total == 7);
    CHECK(seen[i].bytes_total == files);
    if (i) CHECK(seen[i].bytes_done > seen[i - 1].bytes_done);
  }
  CHECK(seen.back().bytes_done == files);

  std::ifstream ic(q / "config.json");
  const auto cfg = nlohmann::json::parse(ic);
  CHECK(cfg["model_type"] == "llama");
  CHECK(cfg["quantization_config"]["bnb_4bit_use_double_quant"] == true);
  CHECK(cfg["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16");
  CHECK(cfg["quantization_config"]["llm_int8_skip_modules"] == nlohmann::json::array({"lm_head", "mlp.down_proj"}));
  std::ifstream it(q / "tokenizer.json");
  CHECK(std::string(std::istreambuf_iterator<char>(it), {}) == "tok\n");
  std::ifstream ii(q / "model.safetensors.index.json");
  const auto qidx = nlohmann::json::parse(ii);
  std::uint64_t data = 0;
  std::size_t listed = 0;
  for (const char* shard : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    const auto f = io::SafetensorsFile::open(q / shard);
    for (const auto& v : f.tensors()) {
      data += v.bytes.size();
      ++listed;
      INFO(v.name);
      CHECK(qidx["weight_map"][v.name] == shard);  // companions listed with their weight's shard
    }
  }
  CHECK(qidx["weight_map"].size() == listed);
  CHECK(qidx["metadata"]["total_size"] == data);
  const auto down = io::SafetensorsFile::open(q / "model-00002-of-00002.safetensors");
  CHECK(down.tensor("model.layers.1.mlp.down_proj.weight").type == io::dtype::F64);  // skipped by suffix
  CHECK(down.tensor("model.layers.1.self_attn.v_proj.weight").type == io::dtype::U8);

  const fs::path d = dir.path / "d";
  CHECK(io::dequantize_checkpoint(q, d).dequantized == 3);
  std::ifstream dc(d / "config.json");
  CHECK_FALSE(nlohmann::json::parse(dc).contains("quantization_config"));
  std::ifstream di(d / "model.safetensors.index.json");
  const auto didx = nlohmann::json::parse(di);
  CHECK(didx["weight_map"] == nlohmann::json::parse(idx.dump())["weight_map"]);
  const auto f1 = io::SafetensorsFile::open(model / "model-00001-of-00002.safetensors");
  const auto g1 = io::SafetensorsFile::open(d / "model-00001-of-00002.safetensors");
  CHECK(g1.names() == f1.names());
  const auto& norm_in = f1.tensor("model.norm.weight");
  const auto& norm_out = g1.tensor("model.norm.weight");
  CHECK(std::equal(norm_in.bytes.begin(), norm_in.bytes.end(), norm_out.bytes.begin(), norm_out.bytes.end()));
}

TEST_CASE("quantize_checkpoint / dequantize_checkpoint refuse bad input and leave nothing behind", "[io][quantize]") {
  Generator gen(test::fresh_seed());
  test::TempDir dir("quantize-bad");
  auto tensors = model_tensors(gen, shard1);
  io::write_safetensors(dir.path / "ok.safetensors", tensors);
  float* first = reinterpret_cast<float*>(tensors[1].bytes.data());  // up_proj, F32
  first[7] = std::numeric_limits<float>::quiet_NaN();
  io::write_safetensors(dir.path / "nan.safetensors", tensors);
  const fs::path out = dir.path / "out.safetensors";
  CHECK_THROWS_WITH(io::quantize_checkpoint(dir.path / "nan.safetensors", out),
                    Catch::Matchers::ContainsSubstring("model.layers.0.mlp.up_proj.weight"));
  CHECK_FALSE(fs::exists(out));
  CHECK_THROWS_WITH(io::quantize_checkpoint(dir.path / "ok.safetensors", out, {.skip = {"lm_head", "self_attn", "mlp"}}),
                    Catch::Matchers::ContainsSubstring("no 2-D floating-point .weight tensors"));
  CHECK_FALSE(fs::exists(out));
  CHECK_THROWS_WITH(io::quantize_checkpoint(dir.path / "ok.safetensors", out, {.nf4 = {48, false}}),
                    Catch::Matchers::ContainsSubstring("got 48"));
  CHECK_THROWS_WITH(io::dequantize_checkpoint(dir.path / "ok.safetensors", out),
                    Catch::Matchers::ContainsSubstring("no bitsandbytes NF4 weights"));
  CHECK_FALSE(fs::exists(out));
  io::quantize_checkpoint(dir.path / "ok.safetensors", dir.path / "q.safetensors");
  CHECK_THROWS_WITH(io::dequantize_checkpoint(dir.path / "q.safetensors", out, {.to = io::dtype::U8}),
                    Catch::Matchers::ContainsSubstring("got U8"));
  CHECK_THROWS_WITH(io::quantize_checkpoint(dir.path / "missing.safetensors", out),
                    Catch::Matchers::ContainsSubstring("no such file"));
  CHECK_FALSE(fs::exists(out));
  for (const auto& e : fs::directory_iterator(dir.path))  // no temporaries left
    CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
}

TEST_CASE("quantize_checkpoint writes through write_checkpoint_by_shard: a failure in a later shard or a killed run "
          "leaves nothing at the output",
          "[io][quantize]") {
  Generator gen(test::fresh_seed());
  test::TempDir dir("quantize-late");
  const fs::path model = dir.path / "model";
  fs::create_directories(model);
  io::write_safetensors(model / "model-00001-of-00002.safetensors", model_tensors(gen, shard1), {{"format", "pt"}});
  auto t2 = model_tensors(gen, shard2);
  t2.erase(t2.end() - 2, t2.end());
  std::ofstream(model / "config.json") << R"({"model_type": "llama"})";
  // Shard 1 is written (into the temporary folder) before shard 2's NaN is found.
  auto bad = t2;
  reinterpret_cast<double*>(bad[1].bytes.data())[5] = std::numeric_limits<double>::quiet_NaN();  // down_proj, F64
  io::write_safetensors(model / "model-00002-of-00002.safetensors", bad, {{"format", "pt"}});
  const fs::path out = dir.path / "q";
  std::vector<std::string> seen;
  CHECK_THROWS_WITH(io::quantize_checkpoint(model, out,
                                            {.skip = {"lm_head"},
                                             .progress = [&](const io::WriteProgress& p) { seen.emplace_back(p.last); }}),
                    Catch::Matchers::ContainsSubstring("model.layers.1.mlp.down_proj.weight"));
  CHECK(seen.size() >= 6);  // shard 1's tensors were converted first
  CHECK_FALSE(fs::exists(out));
  for (const auto& e : fs::directory_iterator(dir.path)) CHECK(e.path().filename().string().find(".tmp") == std::string::npos);

  // Killed (SIGKILL) while converting shard 2: nothing at the output, only a temporary beside it.
  io::write_safetensors(model / "model-00002-of-00002.safetensors", t2, {{"format", "pt"}});
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    try {
      io::quantize_checkpoint(model, out, {.progress = [&](const io::WriteProgress& p) {
                                if (std::string_view(p.last) == "model.layers.1.self_attn.v_proj.weight") ::raise(SIGKILL);
                              }});
    } catch (...) {
    }
    ::_exit(0);  // not reached when the kill happens
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status));
  CHECK_FALSE(fs::exists(out));
  // the same run, not killed, makes the folder
  CHECK(io::quantize_checkpoint(model, out).quantized == 4);
  CHECK(fs::exists(out / "model-00002-of-00002.safetensors"));
}
