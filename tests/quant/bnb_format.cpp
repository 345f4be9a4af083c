// The transformers bnb-4bit layout: write, read back, blob format, bad files.
#include <lora/quant/bnb_format.hpp>

#include <filesystem>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;

namespace {

std::filesystem::path temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() / fmt::format("lora_bnb_{}_{}", test::fresh_seed(), name);
}

std::string blob_text(const io::SafetensorsFile& f, const std::string& w) {
  const auto& t = f.tensor(w + ".quant_state.bitsandbytes__nf4");
  return std::string(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
}

}  // namespace

TEST_CASE("bnb format: round trip with and without double quantisation", "[quant][bnb]") {
  Generator gen(test::fresh_seed());
  const Matrix<bfloat16> W = test::random_matrix<float>(48, 75, gen, 0.03).cast<bfloat16>();  // odd count
  const std::string name = "model.layers.0.mlp.up_proj.weight";
  for (bool dq : {false, true}) {
    INFO("double_quant " << dq);
    const auto t = Nf4Tensor::quantize(W, {64, dq});
    const auto path = temp_path("rt.safetensors");
    io::write_safetensors(path, quant::bnb::to_tensors(name, t), {{"format", "pt"}});
    const auto f = io::SafetensorsFile::open(path);
    CHECK(quant::bnb::is_nf4_weight(f, name));
    CHECK(f.tensor(name).type == io::dtype::U8);
    CHECK(f.tensor(name).shape == std::vector<std::int64_t>{(48 * 75 + 1) / 2, 1});
    CHECK(f.tensor(name + ".absmax").type == (dq ? io::dtype::U8 : io::dtype::F32));
    CHECK(f.tensor(name + ".quant_map").to_vector<float>() ==
          std::vector<float>(quant::nf4_code.begin(), quant::nf4_code.end()));
    CHECK(f.contains(name + ".nested_absmax") == dq);
    CHECK(f.contains(name + ".nested_quant_map") == dq);
    const std::string blob = blob_text(f, name);
    // Python's json.dumps layout, keys in QuantState.as_dict order.
    if (dq) {
      CHECK_THAT(blob, Catch::Matchers::ContainsSubstring(
                           R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 75], )"
                           R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": )"));
    } else {
      CHECK(blob == R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 75]})");
    }
    for (const auto& n : f.names())
      if (n != name) CHECK(quant::bnb::is_companion(n));
    CHECK_FALSE(quant::bnb::is_companion(name));

    const auto back = quant::bnb::read(f, name);
    CHECK(back.shape() == t.shape());
    CHECK(back.blocksize() == 64);
    CHECK(back.double_quant() == dq);
    CHECK(back.dtype() == source_dtype::bfloat16);
    CHECK(back.packed() == t.packed());
    CHECK(back.absmax() == t.absmax());  // restored scales: offset survives the JSON text exactly
    CHECK(back.dequantize<float>() == t.dequantize<float>());
    std::filesystem::remove(path);
  }
}

TEST_CASE("bnb format: malformed checkpoints are rejected", "[quant][bnb]") {
  Generator gen(test::fresh_seed());
  const Matrix<float> W = test::random_matrix<float>(16, 64, gen);
  const std::string name = "q.weight";
  auto tensors = quant::bnb::to_tensors(name, Nf4Tensor::quantize(W));
  const auto path = temp_path("bad.safetensors");
  auto write_with = [&](const std::string& drop, const std::string& blob) {
    std::vector<io::TensorData> ts;
    for (const auto& t : tensors) {
      if (t.name == drop) continue;
      if (!blob.empty() && t.name == name + ".quant_state.bitsandbytes__nf4")
        ts.push_back(io::TensorData::from_values(t.name, reinterpret_cast<const std::uint8_t*>(blob.data()),
                                                 {static_cast<std::int64_t>(blob.size())}, io::dtype::U8));
      else
        ts.push_back(t);
    }
    io::write_safetensors(path, ts);
    return io::SafetensorsFile::open(path);
  };
  CHECK_THROWS_WITH(quant::bnb::read(write_with(name + ".quant_state.bitsandbytes__nf4", ""), name),
                    Catch::Matchers::ContainsSubstring("not a bitsandbytes NF4 weight"));
  CHECK_THROWS_WITH(quant::bnb::read(write_with("", R"({"quant_type": "fp4", "blocksize": 64, "shape": [16, 64]})"), name),
                    Catch::Matchers::ContainsSubstring("expected \"nf4\""));
  CHECK_THROWS_WITH(quant::bnb::read(write_with("", R"({"quant_type": "nf4", "blocksize": 48, "shape": [16, 64]})"), name),
                    Catch::Matchers::ContainsSubstring("blocksize must be a power of two"));
  CHECK_THROWS_WITH(quant::bnb::read(write_with("", R"({"quant_type": "nf4", "blocksize": 64, "shape": [32, 64]})"), name),
                    Catch::Matchers::ContainsSubstring("packed weight has 512 bytes"));
  CHECK_THROWS_WITH(quant::bnb::read(write_with("", R"({"quant_type": "nf4", "blocksize": 32, "shape": [16, 64]})"), name),
                    Catch::Matchers::ContainsSubstring("16 absmax values given, expected 32"));
  CHECK_THROWS_WITH(quant::bnb::read(write_with("", "{not json"), name), Catch::Matchers::ContainsSubstring("not valid JSON"));
  // the blob is JSON we did not write: bounded nesting, unique keys (io::parse_json)
  CHECK_THROWS_WITH(quant::bnb::read(write_with("", std::string(100, '[') + std::string(100, ']')), name),
                    Catch::Matchers::ContainsSubstring("nested deeper"));
  CHECK_THROWS_WITH(
      quant::bnb::read(write_with("", R"({"quant_type": "nf4", "blocksize": 64, "blocksize": 32, "shape": [16, 64]})"), name),
      Catch::Matchers::ContainsSubstring("'blocksize' appears twice"));
  CHECK_THROWS_WITH(quant::bnb::read(write_with(name + ".absmax", ""), name), Catch::Matchers::ContainsSubstring("absmax"));
  std::filesystem::remove(path);
}
