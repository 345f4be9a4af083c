// io/gguf.hpp, io/gguf_lora.hpp, io/normalize.hpp, io/engines.hpp: the GGUF reader and writer
// against float64 references of the encoders and malformed files, and the LoRA conversion
// against llama.cpp's convert_lora_to_gguf.py outputs and PEFT's ΔW (tests/data/gguf).
#include <lora/io/engines.hpp>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/normalize.hpp>

#include <cmath>
#include <fstream>
#include <iterator>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/fixtures.hpp"

using namespace lora;
using namespace lora::io;
using Catch::Matchers::ContainsSubstring;

namespace {

std::string gdata(const std::string& rel) { return test::data("gguf/" + rel); }

/// A field of the tiny HF base's config.json (num_hidden_layers, num_attention_heads, ...).
int hf_base_int(const std::string& key) { return test::json_int(gdata("hf_base/config.json"), key); }

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

/// Raw little-endian bytes for hand-made (and broken) headers.
struct Raw {
  std::string b;
  template <class T>
  Raw& put(T v) {
    b.append(reinterpret_cast<const char*>(&v), sizeof v);
    return *this;
  }
  Raw& str(std::string_view s) {
    put<std::uint64_t>(s.size());
    b.append(s);
    return *this;
  }
  Raw& header(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3) {
    b.append("GGUF");
    return put(version).put(n_tensors).put(n_kv);
  }
  Raw& tensor(std::string_view name, std::vector<std::int64_t> ne, std::uint32_t type, std::uint64_t offset) {
    str(name).put<std::uint32_t>(static_cast<std::uint32_t>(ne.size()));
    for (auto e : ne) put(e);
    return put(type).put(offset);
  }
  Raw& pad(std::size_t to = 32) {
    b.resize((b.size() + to - 1) / to * to, '\0');
    return *this;
  }
  Raw& zeros(std::size_t n) {
    b.append(n, '\0');
    return *this;
  }
};

void rejects(const std::string& bytes, const std::string& what) {
  INFO(what);
  REQUIRE_THROWS_WITH(GgufFile::from_bytes(bytes, "bad.gguf"), ContainsSubstring("bad.gguf") && ContainsSubstring(what));
}

double half_round(double x) { return static_cast<double>(static_cast<float>(Eigen::half(static_cast<float>(x)))); }

Matrix<double> delta_of(const PeftModule& m) {
  Matrix<double> d = m.adapter.scaling() * (m.adapter.B().cast<double>() * m.adapter.A().cast<double>());
  return m.is_embedding() ? Matrix<double>(d.transpose()) : d;
}

}  // namespace

TEST_CASE("gguf: every metadata value type and array round-trips; tensors keep name, extents and offsets", "[gguf]") {
  Generator gen(test::fresh_seed());
  GgufMetadata md;
  md.emplace_back("u8", GgufValue::make(gguf_type::UINT8, 200));
  md.emplace_back("i8", GgufValue{gguf_type::INT8, std::int64_t{-100}});
  md.emplace_back("u16", GgufValue::make(gguf_type::UINT16, 60000));
  md.emplace_back("i16", GgufValue{gguf_type::INT16, std::int64_t{-30000}});
  md.emplace_back("u32", GgufValue::u32(4000000000u));
  md.emplace_back("i32", GgufValue::i32(-2000000000));
  md.emplace_back("f32", GgufValue::f32(static_cast<float>(gen.normal(0, 1))));
  md.emplace_back("bool", GgufValue::boolean(true));
  md.emplace_back("str", GgufValue::string(std::string("héllo\0x", 8)));
  md.emplace_back("u64", GgufValue::u64(~std::uint64_t{0}));
  md.emplace_back("i64", GgufValue{gguf_type::INT64, std::int64_t{-(std::int64_t{1} << 62)}});
  md.emplace_back("f64", GgufValue::f64(gen.normal(0, 1)));
  md.emplace_back("general.alignment", GgufValue::u32(64));
  for (std::uint32_t t = 0; t <= 12; ++t) {
    if (t == 9) continue;
    GgufArray a{static_cast<gguf_type>(t), {}};
    for (int i = 0; i < 3; ++i) {
      const auto ty = static_cast<gguf_type>(t);
      if (ty == gguf_type::STRING) a.items.push_back(GgufValue::string(fmt::format("s{}", i)));
      else if (ty == gguf_type::BOOL) a.items.push_back(GgufValue::boolean(i % 2 == 0));
      else if (ty == gguf_type::FLOAT32) a.items.push_back(GgufValue::f32(static_cast<float>(gen.normal(0, 1))));
      else if (ty == gguf_type::FLOAT64) a.items.push_back(GgufValue::f64(gen.normal(0, 1)));
      else if (ty == gguf_type::INT8 || ty == gguf_type::INT16 || ty == gguf_type::INT32 || ty == gguf_type::INT64)
        a.items.push_back(GgufValue{ty, std::int64_t{-i - 1}});
      else a.items.push_back(GgufValue::make(ty, static_cast<std::uint64_t>(i + 7)));
    }
    md.emplace_back(fmt::format("arr.{}", gguf_type_name(static_cast<gguf_type>(t))), GgufValue::array(std::move(a)));
  }
  md.emplace_back("arr.empty", GgufValue::array({gguf_type::UINT32, {}}));
  std::vector<GgufTensorData> ts;
  const Matrix<float> m = test::random_matrix<float>(3, 5, gen);
  ts.push_back(GgufTensorData::from_matrix("m", m, ggml_type::F32));
  ts.push_back(GgufTensorData::from_values("v", m.data(), {15}, ggml_type::F32));
  ts.push_back(GgufTensorData::from_values("empty", m.data(), {0, 4}, ggml_type::F32));
  const std::string bytes = serialize_gguf(md, ts);
  const GgufFile f = GgufFile::from_bytes(bytes, "mem.gguf");
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 64);
  REQUIRE(f.metadata().size() == md.size());
  for (std::size_t i = 0; i < md.size(); ++i) {
    INFO(md[i].first);
    CHECK(f.metadata()[i].first == md[i].first);
    CHECK(f.metadata()[i].second == md[i].second);
  }
  CHECK(f.value("str").as_string().size() == 8);  // embedded NUL kept
  CHECK(f.value("u32").as_int() == 4000000000LL);
  REQUIRE(f.tensors().size() == 3);
  CHECK(f.tensor("m").ne == std::vector<std::int64_t>{5, 3});
  CHECK(f.tensor("m").shape() == std::vector<std::int64_t>{3, 5});
  CHECK(f.tensor("m").to_matrix<float>() == m);
  CHECK(f.tensor("v").offset % 64 == 0);
  CHECK(f.tensor("empty").numel() == 0);
  CHECK(serialize_gguf(f.metadata(), ts) == bytes);
}

TEST_CASE("gguf: F16, BF16 and Q8_0 encodings against float64 references", "[gguf]") {
  Generator gen(test::fresh_seed());
  const Index rows = 7, cols = 96;
  Matrix<float> x = test::random_matrix<float>(rows, cols, gen, 0.3);
  x(0, 0) = 0.0f;
  x.row(1).setZero();  // an all-zero Q8_0 block: d = 0, q = 0
  x(2, 5) = 70000.0f;  // past F16's range: inf, as torch's .half()
  for (ggml_type t : {ggml_type::F32, ggml_type::F16, ggml_type::BF16, ggml_type::Q8_0}) {
    INFO(ggml_type_name(t));
    const auto bytes = serialize_gguf({}, {GgufTensorData::from_matrix("x", x, t)});
    const GgufFile f = GgufFile::from_bytes(bytes);
    const GgufTensorView& v = f.tensor("x");
    CHECK(v.type == t);
    CHECK(v.bytes.size() == ggml_nbytes(t, rows * cols));
    const Matrix<float> y = v.to_matrix<float>();
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) {
        const double xv = x(i, j), yv = y(i, j);
        if (t == ggml_type::F32) {
          REQUIRE(yv == xv);
        } else if (t == ggml_type::F16) {
          if (std::abs(xv) > 65504.0) {
            REQUIRE(std::isinf(yv));
            continue;
          }
          // nearest: no F16 value is closer (the neighbours are one F16 ulp away)
          const double ulp = std::ldexp(1.0, std::max(std::ilogb(std::abs(yv == 0 ? xv : yv)), -14) - 10);
          REQUIRE(std::abs(yv - xv) <= 0.5 * ulp * (1 + 1e-12));
          REQUIRE(yv == half_round(xv));
        } else if (t == ggml_type::BF16) {
          const double ulp = xv == 0 ? 0 : std::ldexp(1.0, std::ilogb(std::abs(xv)) - 7);
          REQUIRE(std::abs(yv - xv) <= 0.5 * ulp * (1 + 1e-12));
        }
      }
    if (t == ggml_type::Q8_0) {
      for (Index i = 0; i < rows; ++i)
        for (Index b = 0; b < cols / 32; ++b) {
          if (i == 2 && b == 0) continue;  // the 70000 block: checked by the same rule below with its own d
          double amax = 0;
          for (Index j = 0; j < 32; ++j) amax = std::max(amax, std::abs(double(x(i, 32 * b + j))));
          const double d = amax / 127.0;  // float64 reference of ggml's quantize_row_q8_0_ref
          const std::byte* blk = v.bytes.data() + 34 * (i * (cols / 32) + b);
          std::uint16_t dh;
          std::memcpy(&dh, blk, 2);
          const double d_stored = static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(dh));
          REQUIRE(d_stored == half_round(d));
          for (Index j = 0; j < 32; ++j) {
            const double xv = x(i, 32 * b + j);
            const auto q = static_cast<std::int8_t>(blk[2 + j]);
            const double q_ref = d == 0 ? 0.0 : std::round(xv / d);
            // float32 arithmetic may round differently only within 1e-5 of a half-integer
            if (d != 0 && std::abs(std::abs(xv / d - std::trunc(xv / d)) - 0.5) > 1e-5) REQUIRE(double(q) == q_ref);
            REQUIRE(std::abs(q) <= 127);
            REQUIRE(double(y(i, 32 * b + j)) == static_cast<double>(static_cast<float>(d_stored) * q));
            REQUIRE(std::abs(y(i, 32 * b + j) - xv) <= 0.5 * d + 127 * std::abs(d_stored - d) + 1e-7);
          }
        }
    }
  }
  REQUIRE_THROWS_WITH(GgufTensorData::from_values("odd", x.data(), {33}, ggml_type::Q8_0),
                      ContainsSubstring("odd") && ContainsSubstring("multiple of 32"));
  REQUIRE_THROWS_WITH(GgufTensorData::from_values("k", x.data(), {256}, ggml_type::Q4_K), ContainsSubstring("Q4_K"));

  // Q4_0 (read only): d as F16, then 16 bytes whose low nibbles are values 0-15 and high nibbles
  // 16-31, x = d·(q − 8); random nibbles against that float64 formula.
  std::string blocks;
  std::vector<double> want;
  for (int b = 0; b < 2; ++b) {
    const float d = static_cast<float>(Eigen::half(static_cast<float>(gen.normal(0, 1))));
    const std::uint16_t dh = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(d));
    blocks.append(reinterpret_cast<const char*>(&dh), 2);
    std::vector<double> lo(16), hi(16);
    for (int i = 0; i < 16; ++i) {
      const int l = static_cast<int>(gen.uniform(0, 16)) & 15, h = static_cast<int>(gen.uniform(0, 16)) & 15;
      blocks.push_back(static_cast<char>(l | (h << 4)));
      lo[i] = double(d) * (l - 8);
      hi[i] = double(d) * (h - 8);
    }
    want.insert(want.end(), lo.begin(), lo.end());
    want.insert(want.end(), hi.begin(), hi.end());
  }
  Raw q4;
  q4.header(1, 0).tensor("q", {64}, 2, 0).pad();
  q4.b += blocks;
  const std::vector<double> got = GgufFile::from_bytes(q4.b).tensor("q").to_vector<double>();
  REQUIRE(got == want);
}

TEST_CASE("gguf: malformed files are refused with the file, key or tensor named", "[gguf]") {
  rejects("GGU", "too short");
  rejects(Raw().put<std::uint32_t>(0x46554746).put<std::uint32_t>(3).zeros(16).b, "not a GGUF file");
  rejects(Raw().header(0, 0, 1).b, "version 1");
  rejects(Raw().header(0, 0, 4).b, "version 4");
  rejects(Raw().header(0, 0, 0x03000000).b, "byte-swapped");
  rejects(Raw().header(0, 1u << 30).b, "more than the file can hold");
  rejects(Raw().header(1u << 30, 0).b, "more than the file can hold");
  rejects(Raw().header(0, 1).str("kkkkk").b, "type of key 'kkkkk'");
  rejects(Raw().header(0, 1).put<std::uint64_t>(1000).zeros(8).b, "key 0");
  rejects(Raw().header(0, 1).str("k").put<std::uint32_t>(13).b, "unknown value type 13");
  rejects(Raw().header(0, 2).str("k").put<std::uint32_t>(4).put<std::uint32_t>(1).str("k").put<std::uint32_t>(4).put<std::uint32_t>(1).b,
          "'k' appears twice");
  rejects(Raw().header(0, 1).str("k").put<std::uint32_t>(8).put<std::uint64_t>(~0ull).b, "value of key 'k'");
  rejects(Raw().header(0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(10).put<std::uint64_t>(1ull << 40).zeros(16).b,
          "runs past the end");
  rejects(Raw().header(0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(9).put<std::uint64_t>(1).zeros(16).b,
          "nested");
  rejects(Raw().header(0, 1).str("k").put<std::uint32_t>(7).put<std::uint8_t>(2).b, "BOOL holds 2");
  rejects(Raw().header(0, 1).str("general.alignment").put<std::uint32_t>(10).put<std::uint64_t>(32).b,
          "general.alignment is UINT64");
  rejects(Raw().header(0, 1).str("general.alignment").put<std::uint32_t>(4).put<std::uint32_t>(48).b, "power of two");
  // tensors: one F32 [4] at offset 0 is valid
  auto one = [](std::string_view name, std::vector<std::int64_t> ne, std::uint32_t type, std::uint64_t off,
                std::size_t data) { return Raw().header(1, 0).tensor(name, std::move(ne), type, off).pad().zeros(data).b; };
  REQUIRE_NOTHROW(GgufFile::from_bytes(one("t", {4}, 0, 0, 16)));
  rejects(one("t", {4}, 0, 0, 15), "tensor 't'");
  rejects(one("t", {4}, 0, 32, 16), "run past the end of the data section");
  rejects(one("t", {4}, 0, 8, 64), "not a multiple of the alignment");
  rejects(one("t", {4}, 31, 0, 16), "unknown or unsupported ggml type 31");
  rejects(one("t", {4}, 4, 0, 16), "unknown or unsupported ggml type 4");
  rejects(one("t", {16}, 8, 0, 64), "not a multiple");
  rejects(one("t", {1, 1, 1, 1, 1}, 0, 0, 16), "5 dimensions");
  rejects(one("t", {-1}, 0, 0, 16), "negative");
  rejects(one("t", {1ll << 40, 1ll << 40}, 0, 0, 16), "overflows");
  rejects(one("t", {1ll << 40, 0, 1ll << 40}, 0, 0, 0), "overflows");  // a zero extent lets no huge one through
  REQUIRE_NOTHROW(GgufFile::from_bytes(one("t", {1ll << 47, 0}, 0, 0, 0)));  // no elements: a valid tensor
  rejects(one(std::string(64, 'n'), {4}, 0, 0, 16), "at most 63");
  rejects(Raw().header(2, 0).tensor("t", {4}, 0, 0).tensor("t", {4}, 0, 32).pad().zeros(64).b, "'t': appears twice");
  rejects(Raw().header(2, 0).tensor("a", {16}, 0, 0).tensor("b", {4}, 0, 32).pad().zeros(64).b, "overlap");
  rejects(Raw().header(1, 0).tensor("t", {4}, 0, 0).b, "past the end of the file");
  // every truncation of a real adapter file is refused (never read past the end)
  const std::string good = slurp(gdata("gguf/embed_q_r4.f16.gguf"));
  REQUIRE_NOTHROW(GgufFile::from_bytes(good));
  for (std::size_t cut = 0; cut < good.size(); cut += (cut < 800 ? 1 : 97))
    REQUIRE_THROWS_AS(GgufFile::from_bytes(good.substr(0, cut), "cut.gguf"), lora::error);
  // random byte changes in the header: a clean error or a file whose every tensor reads in bounds
  Generator gen(test::fresh_seed());
  const std::size_t header = 600;
  for (int trial = 0; trial < 400; ++trial) {
    std::string bad = good;
    for (int k = 0; k < 1 + trial % 3; ++k)
      bad[static_cast<std::size_t>(gen.uniform(0, header))] = static_cast<char>(static_cast<int>(gen.uniform(0, 256)));
    try {
      const GgufFile f = GgufFile::from_bytes(bad, "flip.gguf");
      for (const auto& t : f.tensors()) {
        REQUIRE(t.offset + t.bytes.size() <= bad.size());
        try {
          (void)t.to_vector<float>();
        } catch (const lora::error&) {
        }
      }
    } catch (const lora::error&) {
    }
  }
  // what the reader needs of a value: its declared type
  const GgufFile base = GgufFile::open(gdata("gguf/base.f16.gguf"));
  // the converter pads the tokenizer's pieces to the config's vocabulary
  CHECK(base.value("tokenizer.ggml.tokens").as_array().items.size() ==
        static_cast<std::size_t>(hf_base_int("vocab_size")));
  CHECK(base.value("llama.attention.head_count").as_int() == hf_base_int("num_attention_heads"));
  REQUIRE_THROWS_WITH(base.value("general.architecture").as_double("general.architecture"),
                      ContainsSubstring("general.architecture") && ContainsSubstring("STRING"));
}

TEST_CASE("gguf: re-serialising the converter's files gives their bytes", "[gguf][fixture]") {
  for (const char* f : {"gguf/base.f16.gguf", "gguf/lora_all_r8.f32.gguf", "gguf/embed_q_r4.f16.gguf"}) {
    INFO(f);
    const GgufFile g = GgufFile::open(gdata(f));
    std::vector<GgufTensorData> ts;
    for (const auto& t : g.tensors()) ts.push_back({t.name, t.type, t.ne, {t.bytes.begin(), t.bytes.end()}});
    CHECK(serialize_gguf(g.metadata(), ts) == slurp(gdata(f)));
  }
}

TEST_CASE("gguf lora: peft_to_gguf writes the converter's file; f32 exact, f16 bit-equal", "[gguf][fixture]") {
  for (const char* name : {"lora_all_r8", "embed_q_r4", "rslora_qv_r4", "patterns_all_r8"})
    for (ggml_type t : {ggml_type::F32, ggml_type::F16}) {
      const std::string ty = t == ggml_type::F32 ? "f32" : "f16";
      INFO(name << " " << ty);
      GgufExportOptions o;
      o.outtype = t;
      const GgufExport e = peft_to_gguf(gdata(std::string("adapters/") + name), gdata("hf_base"), o);
      const std::string ours_bytes = serialize_gguf(e.metadata, e.tensors);
      const std::string ref_path = gdata(fmt::format("gguf/{}.{}.gguf", name, ty));
      const GgufFile ref = GgufFile::open(ref_path), ours = GgufFile::from_bytes(ours_bytes);
      REQUIRE(ours.metadata().size() == ref.metadata().size());
      for (std::size_t i = 0; i < ref.metadata().size(); ++i) {
        CHECK(ours.metadata()[i].first == ref.metadata()[i].first);
        CHECK(ours.metadata()[i].second == ref.metadata()[i].second);
      }
      REQUIRE(ours.tensors().size() == ref.tensors().size());
      const bool scaled = std::string(name) == "rslora_qv_r4" || std::string(name) == "patterns_all_r8";
      for (std::size_t i = 0; i < ref.tensors().size(); ++i) {
        const auto &a = ours.tensors()[i], &b = ref.tensors()[i];
        INFO(b.name);
        CHECK(a.name == b.name);
        CHECK(a.ne == b.ne);
        CHECK(a.type == b.type);
        const bool folded = scaled && (b.name.find("lora_b") != std::string::npos) &&
                            (std::string(name) == "rslora_qv_r4" || b.name.find("attn_v") != std::string::npos);
        if (!folded) CHECK(std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end()));
      }
      if (!scaled) CHECK(ours_bytes == slurp(ref_path));
      // rsLoRA: q and v of each layer; alpha_pattern: v_proj of each layer
      const std::size_t layers = hf_base_int("num_hidden_layers");
      CHECK(e.folded.size() == (std::string(name) == "rslora_qv_r4"      ? 2 * layers
                                : std::string(name) == "patterns_all_r8" ? layers
                                                                         : 0));
    }
}

TEST_CASE("gguf lora: llama.cpp's alpha/r on our file gives PEFT's ΔW; on the converter's it does not", "[gguf][fixture]") {
  const GgufBaseModel base = load_gguf_base_model(gdata("hf_base"));
  {  // the same from a GGUF base: <arch>.attention.head_count past int, or 0
    lora::test::TempDir dir("gguf-base");
    for (const std::uint64_t n : {std::uint64_t{4294967300}, std::uint64_t{0}}) {
      const std::string bytes = Raw()
                                    .header(0, 2)
                                    .str("general.architecture")
                                    .put<std::uint32_t>(8)
                                    .str("llama")
                                    .str("llama.attention.head_count")
                                    .put<std::uint32_t>(10)
                                    .put<std::uint64_t>(n)
                                    .b;
      std::ofstream(dir.path / "base.gguf", std::ios::binary) << bytes;
      REQUIRE_THROWS_WITH(load_gguf_base_model(dir.path / "base.gguf"),
                          ContainsSubstring("base.gguf") && ContainsSubstring("llama.attention.head_count") &&
                              ContainsSubstring(std::to_string(n)));
    }
  }
  {  // a head count past int: refused, not narrowed (4294967300 once read as 4)
    lora::test::TempDir dir("gguf-base");
    std::ofstream(dir.path / "config.json")
        << R"({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4294967300})";
    REQUIRE_THROWS_WITH(load_gguf_base_model(dir.path),
                        ContainsSubstring("config.json") && ContainsSubstring("'num_attention_heads'"));
  }
  CHECK(base.architecture == "llama");
  CHECK(base.n_head == hf_base_int("num_attention_heads"));
  CHECK(base.n_head_kv == hf_base_int("num_key_value_heads"));
  for (const char* name : {"rslora_qv_r4", "patterns_all_r8", "embed_q_r4"}) {
    INFO(name);
    const SafetensorsFile ref = SafetensorsFile::open(gdata(std::string("reference/") + name + ".safetensors"));
    const GgufExport e = peft_to_gguf(gdata(std::string("adapters/") + name), gdata("hf_base"));
    const GgufFile ours = GgufFile::from_bytes(serialize_gguf(e.metadata, e.tensors));
    const GgufFile conv = GgufFile::open(gdata(std::string("gguf/") + name + ".f32.gguf"));
    const double alpha = ours.value("adapter.lora.alpha").as_double();
    int conv_off = 0;
    for (const auto& t : ours.tensors()) {
      if (t.name.find(".lora_a") == std::string::npos) continue;
      const std::string g = t.name.substr(0, t.name.size() - 7);
      const std::string module = *hf_module_name(g.substr(0, g.size() - 7), "llama");
      // what llama.cpp computes: (alpha / r) · lora_bᵀ... in HF row order: rows of q/k un-permuted
      auto delta = [&](const GgufFile& f) {
        Matrix<double> a = f.tensor(g + ".lora_a").to_matrix<float>().cast<double>();
        Matrix<float> bf = f.tensor(g + ".lora_b").to_matrix<float>();
        const bool q = g.find("attn_q") != std::string::npos, k = g.find("attn_k") != std::string::npos;
        if (q || k) bf = llama_permute_rows(bf, q ? base.n_head : base.n_head_kv, true);
        const Matrix<double> b = bf.cast<double>();
        const double s = alpha / double(b.cols());
        return Matrix<double>(g == "token_embd.weight" ? Matrix<double>(s * a * b.transpose()) : Matrix<double>(s * b * a));
      };
      const Matrix<double> want = ref.tensor(module + ".delta_weight").to_matrix<double>();
      INFO(module);
      CHECK(test::rel_error(delta(ours), want) < 1e-6);
      if (test::rel_error(delta(conv), want) > 1e-3) ++conv_off;
    }
    // where alpha/r is not PEFT's scaling: q and v of each layer (rsLoRA), v_proj of each layer (alpha_pattern)
    const int layers = hf_base_int("num_hidden_layers");
    CHECK(conv_off == (std::string(name) == "rslora_qv_r4"      ? 2 * layers
                       : std::string(name) == "patterns_all_r8" ? layers
                                                                : 0));
  }
}

TEST_CASE("gguf lora: GGUF -> PEFT -> GGUF is identical; load_gguf_adapter equals the PEFT loader", "[gguf][fixture]") {
  test::TempDir tmp("gguf-rt");
  for (const char* name : {"lora_all_r8", "embed_q_r4", "rslora_qv_r4", "patterns_all_r8"})
    for (ggml_type t : {ggml_type::F32, ggml_type::F16, ggml_type::Q8_0}) {
      INFO(name << " " << ggml_type_name(t));
      GgufExportOptions o;
      o.outtype = t;
      const auto g1 = tmp.path / fmt::format("{}.{}.gguf", name, ggml_type_name(t));
      convert_peft_to_gguf(gdata(std::string("adapters/") + name), gdata("hf_base"), g1, o);
      const auto back = tmp.path / ggml_type_name(t) / name;  // same folder name: same general.name
      std::filesystem::create_directories(back.parent_path());
      gguf_to_peft(g1, back, {gdata("hf_base")});
      const auto g2 = tmp.path / "again.gguf";
      const GgufExport e2 = convert_peft_to_gguf(back, gdata("hf_base"), g2, o);
      CHECK(e2.folded.empty());
      CHECK(slurp(g1) == slurp(g2));
      // GGUF metadata is the base's too
      const auto g3 = tmp.path / "via-base-gguf.gguf";
      convert_peft_to_gguf(back, gdata("gguf/base.f16.gguf"), g3, o);
      CHECK(slurp(g3) == slurp(g1));
    }
  // the converter's own f32 file reads back as the PEFT adapter (plain LoRA: same scaling)
  for (const char* name : {"lora_all_r8", "embed_q_r4"}) {
    INFO(name);
    const PeftAdapter p = load_peft_adapter(gdata(std::string("adapters/") + name));
    const PeftAdapter g = load_adapter(gdata(std::string("gguf/") + name + ".f32.gguf"), {gdata("hf_base")});
    REQUIRE(g.modules.size() == p.modules.size());
    for (std::size_t i = 0; i < p.modules.size(); ++i) {
      CHECK(g.modules[i].name == p.modules[i].name);
      CHECK(g.modules[i].is_embedding() == p.modules[i].is_embedding());
      CHECK(g.modules[i].adapter.A() == p.modules[i].adapter.A());
      CHECK(g.modules[i].adapter.B() == p.modules[i].adapter.B());
      CHECK(g.modules[i].adapter.scaling() == p.modules[i].adapter.scaling());
    }
  }
  // without the base, llama-family q/k rows cannot be put back
  REQUIRE_THROWS_WITH(load_gguf_adapter(gdata("gguf/lora_all_r8.f32.gguf")), ContainsSubstring("attn_k.weight.lora_b") &&
                                                                                  ContainsSubstring("base model"));
  GgufImportOptions keep;
  keep.keep_gguf_row_order = true;
  CHECK(load_gguf_adapter(gdata("gguf/lora_all_r8.f32.gguf"), keep).modules.size() ==
        7u * hf_base_int("num_hidden_layers"));  // the 7 projections of each layer
  REQUIRE_THROWS_WITH(load_gguf_adapter(gdata("gguf/base.f16.gguf")), ContainsSubstring("not a LoRA adapter"));
  // bytes held in memory read as the file does, errors naming the name given for them
  {
    const std::string bytes = slurp(gdata("gguf/embed_q_r4.f16.gguf"));
    const PeftAdapter m = load_gguf_adapter(GgufFile::from_bytes(bytes, "in-memory.gguf"), keep);
    const PeftAdapter f = load_gguf_adapter(gdata("gguf/embed_q_r4.f16.gguf"), keep);
    REQUIRE(m.modules.size() == f.modules.size());
    for (std::size_t i = 0; i < m.modules.size(); ++i) {
      CHECK(m.modules[i].name == f.modules[i].name);
      CHECK(m.modules[i].adapter.A() == f.modules[i].adapter.A());
      CHECK(m.modules[i].adapter.B() == f.modules[i].adapter.B());
      CHECK(m.modules[i].adapter.scaling() == f.modules[i].adapter.scaling());
    }
    REQUIRE_THROWS_WITH(load_gguf_adapter(GgufFile::from_bytes(slurp(gdata("gguf/base.f16.gguf")), "base-in-memory")),
                        ContainsSubstring("base-in-memory") && ContainsSubstring("not a LoRA adapter"));
  }
}

TEST_CASE("gguf lora: the model card gguf_to_peft writes", "[gguf][fixture]") {
  const GgufFile g = GgufFile::open(gdata("gguf/embed_q_r4.f16.gguf"));
  CHECK(gguf_model_card(g, "a.gguf") ==
        "---\nbase_model:\n- Hf_Base\nlibrary_name: peft\ntags:\n- base_model:adapter:hf_base\n- lora\n"
        "- transformers\n---\n\nConverted from a.gguf by `lora convert --to peft`.\n");
  // three base models, keys out of order, one without a name, one past the count
  GgufMetadata kv;
  for (const auto& [k, v] : g.metadata())
    if (k.rfind("general.base_model.", 0) != 0 && k != "general.tags") kv.emplace_back(k, v);
  kv.emplace_back("general.base_model.1.name", GgufValue::string("B"));
  kv.emplace_back("general.base_model.0.organization", GgufValue::string("org"));
  kv.emplace_back("general.base_model.0.name", GgufValue::string("A"));
  kv.emplace_back("general.base_model.2.organization", GgufValue::string("no-name"));
  kv.emplace_back("general.base_model.3.name", GgufValue::string("past the count"));
  kv.emplace_back("general.base_model.count", GgufValue::u32(3));
  const GgufFile m = GgufFile::from_bytes(serialize_gguf(kv, {}), "m.gguf");
  CHECK(gguf_model_card(m, "m.gguf") ==
        "---\nbase_model:\n- org/A\n- B\nlibrary_name: peft\n---\n\nConverted from m.gguf by `lora convert --to peft`.\n");
  // a name that is not a string: the key named
  kv.emplace_back("general.base_model.1.organization", GgufValue::u32(7));
  REQUIRE_THROWS_WITH(gguf_model_card(GgufFile::from_bytes(serialize_gguf(kv, {}), "m.gguf"), "m.gguf"),
                      ContainsSubstring("general.base_model.1.organization"));
}

TEST_CASE("gguf lora: a base-model count past the file's keys is refused, not walked", "[gguf][fixture]") {
  // gguf_to_peft lists general.base_model.<i>.name in the model card for i < general.base_model.count:
  // a count of 2^62 was a loop of 2^62 lookups (found reading the converter after the fuzz finding)
  const GgufFile g = GgufFile::open(gdata("gguf/embed_q_r4.f16.gguf"));
  GgufMetadata kv = g.metadata();
  bool set = false;
  for (auto& [k, v] : kv)
    if (k == "general.base_model.count") v = GgufValue::u64(std::uint64_t{1} << 62), set = true;
  REQUIRE(set);
  std::vector<GgufTensorData> ts;
  for (const auto& t : g.tensors()) ts.push_back({t.name, t.type, t.ne, {t.bytes.begin(), t.bytes.end()}});
  lora::test::TempDir dir("gguf-count");
  write_gguf(dir.path / "in.gguf", kv, ts);
  GgufImportOptions keep;
  keep.keep_gguf_row_order = true;
  REQUIRE_THROWS_WITH(gguf_to_peft(dir.path / "in.gguf", dir.path / "out", keep),
                      ContainsSubstring("in.gguf") && ContainsSubstring("general.base_model.count") &&
                          ContainsSubstring("4611686018427387904"));
  CHECK_FALSE(std::filesystem::exists(dir.path / "out"));
}

TEST_CASE("gguf lora: a factor of no elements is refused before any matrix is formed", "[gguf]") {
  // Found by fuzz_gguf (2026-12-05, a 10 s timeout): token_embd.weight.lora_a with ne = [2^47 + 4, 0]
  // became a 0 × 2^47 matrix whose transposition walked 2^47 empty rows. Now refused at once.
  GgufImportOptions keep;
  keep.keep_gguf_row_order = true;
  REQUIRE_THROWS_WITH(load_gguf_adapter(gdata("gguf/regression-empty-factor.gguf"), keep),
                      ContainsSubstring("token_embd.weight.lora_a") && ContainsSubstring("no elements") &&
                          ContainsSubstring("140737488355332"));
}

TEST_CASE("gguf lora: what a GGUF adapter cannot hold is refused with the reason", "[gguf][fixture]") {
  REQUIRE_THROWS_WITH(peft_to_gguf(gdata("adapters/x_lora_bias_qv_r4"), gdata("hf_base")),
                      ContainsSubstring("lora_B.bias") && ContainsSubstring("q_proj"));
  REQUIRE_THROWS_WITH(peft_to_gguf(gdata("adapters/x_mts_lm_head_qv_r4"), gdata("hf_base")),
                      ContainsSubstring("modules_to_save") && ContainsSubstring("lm_head"));
  // DoRA: a magnitude vector on one module
  Generator gen(test::fresh_seed());
  test::TempDir tmp("gguf-dora");
  PeftAdapter d = load_peft_adapter(gdata("adapters/rslora_qv_r4"));
  d.config.use_dora = true;
  for (auto& m : d.modules)
    m.adapter = DoraAdapter<float, cpu, dynamic_scaling>(m.adapter.lora(),
                                                         Vector<float>(test::random_matrix<float>(m.adapter.out_features(), 1, gen)));
  save_peft_adapter(tmp.path / "dora", d);
  REQUIRE_THROWS_WITH(peft_to_gguf(tmp.path / "dora", gdata("hf_base")), ContainsSubstring("DoRA"));
  REQUIRE_THROWS_WITH(convert_peft_to_gguf(gdata("adapters/lora_all_r8"), gdata("hf_base"), tmp.path / "no" / "x.gguf"),
                      ContainsSubstring("does not exist"));
  CHECK(!std::filesystem::exists(tmp.path / "no"));
}

TEST_CASE("gguf lora: name maps of the other families", "[gguf]") {
  CHECK(*gguf_tensor_name("model.layers.12.mlp.down_proj", "qwen2") == "blk.12.ffn_down");
  CHECK(*gguf_tensor_name("model.layers.0.self_attn.o_proj", "qwen3") == "blk.0.attn_output");
  CHECK(*gguf_tensor_name("model.layers.3.self_attn.qkv_proj", "phi3") == "blk.3.attn_qkv");
  CHECK(*gguf_tensor_name("model.layers.3.mlp.gate_up_proj", "phi3") == "blk.3.ffn_up");
  CHECK(!gguf_tensor_name("model.layers.3.mlp.gate_proj", "phi3"));
  CHECK(!gguf_tensor_name("lm_head", "gemma"));
  CHECK(*gguf_tensor_name("lm_head", "llama") == "output");
  for (const char* arch : {"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"})
    for (const auto& [hf, gg] : io::detail::gguf_layer_map(arch))
      CHECK(*hf_module_name(*gguf_tensor_name("model.layers.7." + hf, arch), arch) == "model.layers.7." + hf);
  // the permutation is a permutation, and its inverse undoes it
  Generator gen(test::fresh_seed());
  const Matrix<float> m = test::random_matrix<float>(48, 3, gen);
  const Matrix<float> p = llama_permute_rows(m, 3);
  CHECK(p != m);
  CHECK(llama_permute_rows(p, 3, true) == m);
  CHECK(p.row(1) == m.row(8));  // head 0, hd 16: row 2j+i <- i·8+j; (i, j) = (1, 0)
  CHECK(io::detail::id_to_title("embed_q_r4") == "Embed_Q_R4");
  CHECK(io::detail::id_to_title("Hf_Base") == "Hf_Base");
}

TEST_CASE("normalize: every module at s = 1, alpha = r, no patterns; PEFT's ΔW unchanged", "[gguf][normalize][fixture]") {
  test::TempDir tmp("normalize");
  for (const char* name : {"rslora_qv_r4", "patterns_all_r8", "embed_q_r4"}) {
    INFO(name);
    const SafetensorsFile ref = SafetensorsFile::open(gdata(std::string("reference/") + name + ".safetensors"));
    const auto out = tmp.path / name;
    const NormalizeReport rep = normalize_peft_folder(gdata(std::string("adapters/") + name), out);
    const PeftAdapter n = load_peft_adapter(out);
    CHECK(n.config.lora_alpha == n.config.r);
    CHECK(n.config.rank_pattern.empty());
    CHECK(n.config.alpha_pattern.empty());
    CHECK(!n.config.use_rslora);
    CHECK(rep.rank == n.config.r);
    for (const auto& m : n.modules) {
      INFO(m.name);
      CHECK(m.adapter.scaling() == 1.0);
      CHECK(test::rel_error(delta_of(m), ref.tensor(m.name + ".delta_weight").to_matrix<double>()) < 1e-6);
    }
    for (engine e : {engine::llama_cpp, engine::vllm, engine::tgi, engine::peft})
      for (const auto& f : check_engine(out, e)) CHECK(f.kind != "mis-scaled");  // TGI still drops embedding LoRA
  }
}

TEST_CASE("check: each engine's mis-scalings and refusals", "[gguf][engines][fixture]") {
  auto find = [](const std::vector<EngineFinding>& fs, const std::string& feature) -> const EngineFinding* {
    for (const auto& f : fs)
      if (f.feature == feature) return &f;
    return nullptr;
  };
  const auto rs_llama = check_engine(gdata("adapters/rslora_qv_r4"), engine::llama_cpp);
  REQUIRE(rs_llama.size() == 1);
  CHECK(rs_llama[0].kind == "mis-scaled");
  CHECK(rs_llama[0].feature == "rsLoRA");
  const std::size_t layers = hf_base_int("num_hidden_layers");
  CHECK(rs_llama[0].modules.size() == 2 * layers);  // q and v of each layer
  CHECK(rs_llama[0].factor == Approx(0.5));  // the ratio gguf_check.json measured
  CHECK_THAT(rs_llama[0].source, ContainsSubstring("llama-adapter.h"));
  CHECK(check_engine(gdata("adapters/rslora_qv_r4"), engine::vllm).empty());
  CHECK(check_engine(gdata("adapters/rslora_qv_r4"), engine::tgi).empty());
  const auto pat_llama = check_engine(gdata("adapters/patterns_all_r8"), engine::llama_cpp);
  REQUIRE(find(pat_llama, "alpha_pattern"));
  CHECK(find(pat_llama, "alpha_pattern")->factor == Approx(0.25));
  CHECK(find(pat_llama, "alpha_pattern")->modules.size() == layers);  // v_proj of each layer
  const auto pat_vllm = check_engine(gdata("adapters/patterns_all_r8"), engine::vllm);
  REQUIRE(find(pat_vllm, "alpha_pattern"));
  REQUIRE(find(pat_vllm, "rank_pattern"));
  CHECK(find(pat_vllm, "rank_pattern")->factor == Approx(0.25));  // alpha/8 where PEFT has alpha/2 (down_proj)
  CHECK(find(pat_vllm, "rank_pattern")->modules.size() == layers);  // down_proj of each layer
  CHECK(check_engine(gdata("adapters/lora_all_r8"), engine::llama_cpp).empty());
  const auto bias = check_engine(gdata("adapters/x_lora_bias_qv_r4"), engine::llama_cpp);
  REQUIRE(find(bias, "lora_bias"));
  CHECK(find(bias, "lora_bias")->kind == "rejected");
  CHECK(find(check_engine(gdata("adapters/x_lora_bias_qv_r4"), engine::tgi), "lora_bias")->kind == "ignored");
  CHECK(find(check_engine(gdata("adapters/x_mts_lm_head_qv_r4"), engine::vllm), "modules_to_save")->kind == "rejected");
  CHECK(find(check_engine(gdata("adapters/embed_q_r4"), engine::tgi), "embedding LoRA")->kind == "ignored");
  CHECK(check_engine(gdata("adapters/embed_q_r4"), engine::llama_cpp).empty());
  CHECK(check_engine(gdata("gguf/rslora_qv_r4.f32.gguf"), engine::vllm).at(0).kind == "rejected");
  CHECK(check_engine(gdata("gguf/rslora_qv_r4.f32.gguf"), engine::llama_cpp).empty());
  REQUIRE_THROWS_WITH(parse_engine("onnx"), ContainsSubstring("onnx"));
}
