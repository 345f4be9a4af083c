// lora/io/safetensors.hpp: every malformed header is rejected with a message that names
// the file (and the tensor); every dtype converts; writes are atomic.
#include <lora/io/safetensors.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>

#include "support/catch.hpp"
#include "support/files.hpp"
#include "support/reference.hpp"

using namespace lora;
using lora::test::TempDir;
using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;

namespace {
/// Writes u64 header length + header + data; `claimed` overrides the length field.
fs::path raw_file(const fs::path& p, const std::string& header, std::size_t data_bytes,
                  std::optional<std::uint64_t> claimed = std::nullopt) {
  std::ofstream out(p, std::ios::binary);
  const std::uint64_t n = claimed.value_or(header.size());
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header;
  for (std::size_t i = 0; i < data_bytes; ++i) out.put(static_cast<char>(i * 7 + 1));
  return p;
}

/// "{" + body + "}" (fmt, not operator+: GCC 12 warns falsely on string insert).
std::string obj(const std::string& body) { return fmt::format("{{{}}}", body); }

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, std::int64_t b,
                  std::int64_t e) {
  return fmt::format(R"("{}": {{"dtype": "{}", "shape": {}, "data_offsets": [{}, {}]}})", name, dtype, shape, b, e);
}
}  // namespace

TEST_CASE("malformed safetensors files are rejected, naming file and tensor", "[io]") {
  TempDir tmp("st");
  const std::string f = (tmp.path / "bad.safetensors").string();
  auto open = [&] { return io::SafetensorsFile::open(f); };

  SECTION("a well-formed file opens (the helpers are right)") {
    raw_file(f, obj(entry("w", "F32", "[2, 3]", 0, 24)), 24);
    CHECK(open().tensor("w").numel() == 6);
  }
  SECTION("header length beyond the file") {
    raw_file(f, obj(entry("w", "F32", "[2]", 0, 8)), 8, 1u << 20);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("header length 1048576") &&
                                  ContainsSubstring("past the end"));
    raw_file(f, "", 0, ~std::uint64_t{0});  // no overflow in the check; above the 100 MB cap
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("more than the 100000000 bytes"));
  }
  SECTION("truncated: shorter than the length field, or data cut off") {
    { std::ofstream(f, std::ios::binary) << "abc"; }
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("too short"));
    raw_file(f, obj(entry("w", "F32", "[2, 3]", 0, 24)), 20);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'w'") && ContainsSubstring("past the end"));
    { std::ofstream(f, std::ios::binary | std::ios::trunc); }
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("0 bytes"));
  }
  SECTION("invalid JSON, and JSON of the wrong shape") {
    raw_file(f, "{\"w\": {\"dtype\": \"F32\",", 0);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("not valid JSON"));
    raw_file(f, "[1, 2]", 0);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("JSON object"));
    raw_file(f, R"({"w": {"dtype": "F32", "shape": [1]}})", 4);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'w'") && ContainsSubstring("data_offsets"));
    raw_file(f, R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4);
    CHECK_THROWS_WITH(open(), ContainsSubstring("'w'") && ContainsSubstring("integers"));
    raw_file(f, R"({"__metadata__": {"a": 1}})", 0);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("__metadata__"));
  }
  SECTION("unknown dtype") {
    raw_file(f, obj(entry("layer.w", "F8_E9M9", "[2]", 0, 2)), 2);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'layer.w'") &&
                                  ContainsSubstring("unknown dtype 'F8_E9M9'"));
  }
  SECTION("offsets out of range") {
    raw_file(f, obj(entry("a", "F32", "[2]", 0, 8) + ", " + entry("b", "F32", "[2]", 8, 16)), 12);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'b'") && ContainsSubstring("[8, 16]") &&
                                  ContainsSubstring("12 bytes"));
    raw_file(f, obj(entry("a", "F32", "[2]", -8, 0)), 8);
    CHECK_THROWS_WITH(open(), ContainsSubstring("'a'") && ContainsSubstring("non-negative"));
  }
  SECTION("reversed offsets") {
    raw_file(f, obj(entry("a", "U8", "[0]", 8, 0)), 8);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'a'") && ContainsSubstring("reversed"));
  }
  SECTION("overlapping tensors") {
    raw_file(f, obj(entry("a", "F32", "[3]", 0, 12) + ", " + entry("b", "F32", "[2]", 8, 16)), 16);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'a'") && ContainsSubstring("'b'") &&
                                  ContainsSubstring("overlap"));
    raw_file(f, obj(entry("a", "F32", "[2]", 0, 8) + ", " + entry("b", "F32", "[2]", 0, 8)), 8);
    CHECK_THROWS_WITH(open(), ContainsSubstring("overlap"));
  }
  SECTION("shape not matching the byte size") {
    raw_file(f, obj(entry("w", "BF16", "[2, 3]", 0, 24)), 24);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'w'") && ContainsSubstring("needs 12 bytes") &&
                                  ContainsSubstring("span 24"));
  }
  SECTION("negative dimensions, and absurd ones") {
    raw_file(f, obj(entry("w", "F32", "[-2, 3]", 0, 24)), 24);
    CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'w'") && ContainsSubstring("negative dimension -2"));
    raw_file(f, obj(entry("w", "F32", "[4294967296, 4294967296]", 0, 0)), 0);
    CHECK_THROWS_WITH(open(), ContainsSubstring("'w'") && ContainsSubstring("too large"));
    // 2^61 F64 elements: numel·8 wraps to 0 bytes, which must not pass for an empty span (fuzzer find)
    raw_file(f, obj(entry("w", "F64", "[2305843009213693952]", 0, 0)), 0);
    CHECK_THROWS_WITH(open(), ContainsSubstring("'w'") && ContainsSubstring("too large"));
    raw_file(f, obj(entry("w", "F32", "[1152921504606846976, 16]", 0, 0)), 0);
    CHECK_THROWS_WITH(open(), ContainsSubstring("'w'") && ContainsSubstring("too large"));
  }
  SECTION("not a file") {
    CHECK_THROWS_WITH(io::SafetensorsFile::open(tmp.path / "missing.safetensors"), ContainsSubstring("missing.safetensors"));
    CHECK_THROWS_WITH(io::SafetensorsFile::open(tmp.path), ContainsSubstring(tmp.path.string()) && ContainsSubstring("is a folder"));
  }
}

TEST_CASE("every dtype converts to the compute scalar", "[io]") {
  TempDir tmp("st");
  Generator gen(lora::test::fresh_seed());
  const Matrix<double> m = lora::test::random_matrix<double>(3, 4, gen, 20.0);
  const Matrix<double> ints = m.array().round();
  std::vector<io::TensorData> ts;
  for (auto t : {io::dtype::F64, io::dtype::F32, io::dtype::F16, io::dtype::BF16})
    ts.push_back(io::TensorData::from_matrix(std::string(io::dtype_name(t)), m, t));
  for (auto t : {io::dtype::I64, io::dtype::I32, io::dtype::I16, io::dtype::I8})
    ts.push_back(io::TensorData::from_matrix(std::string(io::dtype_name(t)), ints, t));
  const Matrix<double> u = ints.cwiseAbs();
  ts.push_back(io::TensorData::from_matrix("U8", u, io::dtype::U8));
  ts.push_back(io::TensorData::from_matrix("BOOL", ints, io::dtype::BOOL));
  io::write_safetensors(tmp.path / "all.safetensors", ts, {{"format", "pt"}, {"note", "x"}});
  const auto f = io::SafetensorsFile::open(tmp.path / "all.safetensors");
  CHECK(f.size() == 10);
  CHECK(f.metadata().at("note") == "x");
  CHECK(f.tensor("F64").to_matrix<double>() == m);
  CHECK(f.tensor("F32").to_matrix<double>() == m.cast<float>().cast<double>());
  CHECK(f.tensor("F16").to_matrix<float>() == m.cast<float>().cast<half>().cast<float>());
  CHECK(f.tensor("BF16").to_matrix<double>() == m.cast<float>().cast<bfloat16>().cast<float>().cast<double>());
  for (auto n : {"I64", "I32", "I16", "I8"}) {
    INFO(n);
    CHECK(f.tensor(n).to_matrix<double>() == ints);
    CHECK(f.tensor(n).to_matrix<float>() == ints.cast<float>());
  }
  CHECK(f.tensor("U8").to_matrix<double>() == u);
  CHECK(f.tensor("BOOL").to_matrix<int>() == (ints.array() != 0).cast<int>().matrix());
  CHECK(f.tensor("F32").at<double>(5) == static_cast<float>(m(1, 1)));
  // data sits at 8-byte alignment (header padded)
  std::uint64_t n = 0;
  std::ifstream in(tmp.path / "all.safetensors", std::ios::binary);
  in.read(reinterpret_cast<char*>(&n), 8);
  CHECK(n % 8 == 0);
}

TEST_CASE("a failing write leaves no file behind", "[io]") {
  TempDir tmp("st");
  const auto p = tmp.path / "x.safetensors";
  io::TensorData bad;
  bad.name = "w";
  bad.shape = {3};
  bad.bytes.resize(5);  // not 12
  CHECK_THROWS_WITH(io::write_safetensors(p, {bad}), ContainsSubstring("'w'"));
  CHECK(fs::is_empty(tmp.path));
  CHECK_THROWS_WITH(io::write_safetensors(tmp.path / "no" / "x.safetensors", {}), ContainsSubstring("does not exist"));
  // an existing file is replaced only when the new one is complete
  io::write_safetensors(p, {io::TensorData::from_matrix("w", Matrix<float>::Ones(2, 2), io::dtype::F32)});
  CHECK_THROWS(io::write_safetensors(p, {bad}));
  CHECK(io::SafetensorsFile::open(p).tensor("w").numel() == 4);
}

// ---- hostile files (issue 21; docs/reliability.md has the table of classes) --------------

#include <lora/io/json.hpp>
#include <lora/io/pattern.hpp>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <thread>

namespace {
std::string deep(int levels, char open = '[', char close = ']') {
  return std::string(static_cast<std::size_t>(levels), open) + std::string(static_cast<std::size_t>(levels), close);
}
std::size_t count_temporaries(const fs::path& dir) {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos) ++n;
  return n;
}
}  // namespace

TEST_CASE("hostile: JSON nesting is bounded and named (class 1)", "[io][hostile]") {
  TempDir tmp("st");
  const std::string f = (tmp.path / "deep.safetensors").string();
  // 100,000 levels crashed the recursive copy/dump/destructor of the parsed value
  raw_file(f, obj(R"("__metadata__": {"a": )" + deep(100000) + "}"), 0);
  CHECK_THROWS_WITH(io::SafetensorsFile::open(f), ContainsSubstring(f) && ContainsSubstring("nested deeper than 64"));
  CHECK_THROWS_WITH(io::parse_json(deep(100000, '{', '}'), "cfg.json"), ContainsSubstring("cfg.json"));
  CHECK_THROWS_WITH(io::parse_json(R"({"a":)" + deep(65) + "}", "x.json"), ContainsSubstring("nested deeper"));
  CHECK(io::parse_json(R"({"a":)" + deep(60) + "}", "x.json").is_object());
  // a key given twice in one object (JSON readers disagree on which wins)
  CHECK_THROWS_WITH(io::parse_json(R"({"r": 8, "a": {"r": 1}, "r": 16})", "c.json"),
                    ContainsSubstring("c.json") && ContainsSubstring("'r' appears twice"));
}

TEST_CASE("hostile: JSON type errors name the file and the key (classes 7, 9)", "[io][hostile]") {
  const auto j = io::parse_json(R"({"s": 5, "n": "x", "i": 64.0, "h": 64.5, "big": 18446744073709551615,
                                    "huge": 1e300, "neg": -3, "b": 1})",
                                "config.json");
  CHECK_THROWS_WITH(io::json_string(j, "s", "config.json"),
                    ContainsSubstring("config.json") && ContainsSubstring("'s'") && ContainsSubstring("string"));
  CHECK_THROWS_WITH(io::json_int(j, "n", "config.json", 0, 100), ContainsSubstring("'n'") && ContainsSubstring("\"x\""));
  CHECK(io::json_int(j, "i", "config.json", 0, 100) == 64);  // 64.0 is an integer
  CHECK_THROWS_WITH(io::json_int(j, "h", "config.json", 0, 100), ContainsSubstring("'h'") && ContainsSubstring("64.5"));
  CHECK_THROWS_WITH(io::json_int(j, "big", "config.json", 0, std::int64_t{1} << 40),
                    ContainsSubstring("'big'") && ContainsSubstring("18446744073709551615"));
  CHECK_THROWS_WITH(io::json_int(j, "huge", "config.json", 0, std::int64_t{1} << 40), ContainsSubstring("'huge'"));
  CHECK_THROWS_WITH(io::json_int(j, "neg", "config.json", 1, 10), ContainsSubstring("[1, 10]"));
  CHECK_THROWS_WITH(io::json_int(j, "missing", "config.json", 1, 10), ContainsSubstring("missing integer 'missing'"));
  CHECK_THROWS_WITH(io::json_bool(j, "b", false, "config.json"), ContainsSubstring("'b'"));
  CHECK(!io::json_int_opt(j, "absent", "config.json", 0, 1));
}

TEST_CASE("hostile: special files are refused without blocking (class 3)", "[io][hostile]") {
  TempDir tmp("st");
  const fs::path fifo = tmp.path / "model.safetensors";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);  // a plain open() of a FIFO without a writer blocks forever
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(io::SafetensorsFile::open(fifo), ContainsSubstring(fifo.string()) && ContainsSubstring("FIFO"));
  CHECK_THROWS_WITH(io::read_json_file(fifo), ContainsSubstring(fifo.string()) && ContainsSubstring("FIFO"));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  CHECK_THROWS_WITH(io::read_json_file(tmp.path), ContainsSubstring(tmp.path.string()) && ContainsSubstring("folder"));
  CHECK_THROWS_WITH(io::read_regular_file("/dev/zero"), ContainsSubstring("/dev/zero") && ContainsSubstring("character device"));
}

TEST_CASE("hostile: strict layout as the safetensors library (class 5)", "[io][hostile]") {
  TempDir tmp("st");
  const std::string f = (tmp.path / "s.safetensors").string();
  auto open = [&] { return io::SafetensorsFile::open(f); };
  // the same name twice: the parsed JSON would keep one silently, with another shape
  raw_file(f, obj(entry("w", "F32", "[2]", 0, 8) + ", " + entry("w", "F32", "[1]", 8, 12)), 12);
  CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("'w' appears twice"));
  // a hole between two tensors, bytes before the first, bytes after the last
  raw_file(f, obj(entry("a", "F32", "[1]", 0, 4) + ", " + entry("b", "F32", "[1]", 8, 12)), 12);
  CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("4 unused bytes") && ContainsSubstring("'b'"));
  raw_file(f, obj(entry("a", "F32", "[1]", 4, 8)), 8);
  CHECK_THROWS_WITH(open(), ContainsSubstring("unused bytes") && ContainsSubstring("'a'"));
  raw_file(f, obj(entry("a", "F32", "[1]", 0, 4)), 7);
  CHECK_THROWS_WITH(open(), ContainsSubstring(f) && ContainsSubstring("3 bytes after the end of the last tensor"));
  raw_file(f, obj(""), 1);
  CHECK_THROWS_WITH(open(), ContainsSubstring("1 bytes after"));
  // zero-size tensors anywhere are fine, as in the Rust library
  raw_file(f, obj(entry("a", "F32", "[1]", 0, 4) + ", " + entry("e", "F32", "[0]", 4, 4) + ", " +
                  entry("b", "F32", "[1]", 4, 8)),
           8);
  CHECK(open().size() == 3);
}

TEST_CASE("hostile: header size is capped and large headers round-trip (class 4)", "[io][hostile]") {
  TempDir tmp("st");
  const std::string f = (tmp.path / "h.safetensors").string();
  raw_file(f, "{}", 0, 100'000'001);
  CHECK_THROWS_WITH(io::SafetensorsFile::open(f), ContainsSubstring(f) && ContainsSubstring("100000000"));
  // A header of 60,000 tensors written and read back, every name found at its offset.
  // (ordered_json's linear key lookups once made this quadratic: 200,000 tensors took 311 s.
  // Its speed is not asserted here: a timed test flakes on a loaded machine.)
  const int n = 60'000;
  std::vector<io::TensorData> ts(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < ts.size(); ++i) {
    ts[i].name = fmt::format("model.layers.{}.mlp.w", i);
    ts[i].type = io::dtype::U8;
    ts[i].shape = {1};
    ts[i].bytes = {std::byte{static_cast<unsigned char>(i * 7 + 3)}};
  }
  const auto g = io::SafetensorsFile::from_bytes(io::serialize_safetensors(ts), "big");
  REQUIRE(g.size() == ts.size());
  int wrong = 0;
  for (std::size_t i = 0; i < ts.size(); i += 97)
    wrong += g.tensor(ts[i].name).at<int>(0) != static_cast<int>((i * 7 + 3) % 256);
  CHECK(wrong == 0);
  CHECK(g.tensor(ts.back().name).at<int>(0) == static_cast<int>(((n - 1) * 7 + 3) % 256));
}

TEST_CASE("hostile: integer extremes in shapes (class 7)", "[io][hostile]") {
  TempDir tmp("st");
  const std::string f = (tmp.path / "i.safetensors").string();
  raw_file(f, obj(entry("w", "F32", "[18446744073709551615]", 0, 4)), 4);  // read as -1 before
  CHECK_THROWS_WITH(io::SafetensorsFile::open(f), ContainsSubstring("'w'") && ContainsSubstring("too large"));
  raw_file(f, obj(R"("w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 18446744073709551615]})"), 4);
  CHECK_THROWS_WITH(io::SafetensorsFile::open(f), ContainsSubstring("'w'") && ContainsSubstring("past the end"));
}

TEST_CASE("hostile: unsigned and FP8 tensors are read and copied (class 8)", "[io][hostile]") {
  // F8_E4M3 (float8_e4m3fn): 0x38 = 1, 0x7e = 448 (largest), 0x01 = 2^-9 (subnormal), 0xff NaN;
  // F8_E5M2: 0x3c = 1, 0x7b = 57344, 0x7c = inf.
  std::string hdr = obj(entry("a", "U16", "[2]", 0, 4) + ", " + entry("b", "U32", "[1]", 4, 8) + ", " +
                        entry("c", "U64", "[1]", 8, 16) + ", " + entry("d", "F8_E4M3", "[4]", 16, 20) + ", " +
                        entry("e", "F8_E5M2", "[3]", 20, 23));
  std::string bytes;
  auto put = [&](auto v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(std::uint16_t{65535});
  put(std::uint16_t{7});
  put(std::uint32_t{4000000000u});
  put(std::uint64_t{1} << 63);
  for (unsigned char c : {0x38, 0x7e, 0x01, 0xff}) bytes.push_back(static_cast<char>(c));
  for (unsigned char c : {0x3c, 0x7b, 0x7c}) bytes.push_back(static_cast<char>(c));
  std::string file(8, '\0');
  const std::uint64_t n = hdr.size();
  std::memcpy(file.data(), &n, 8);
  const auto f = io::SafetensorsFile::from_bytes(file + hdr + bytes, "u.safetensors");
  CHECK(f.tensor("a").at<double>(0) == 65535);
  CHECK(f.tensor("b").at<double>(0) == 4e9);
  CHECK(f.tensor("c").at<double>(0) == std::ldexp(1.0, 63));
  CHECK(f.tensor("d").at<float>(0) == 1.0f);
  CHECK(f.tensor("d").at<float>(1) == 448.0f);
  CHECK(f.tensor("d").at<float>(2) == std::ldexp(1.0f, -9));
  CHECK(std::isnan(f.tensor("d").at<float>(3)));
  CHECK(f.tensor("e").at<float>(0) == 1.0f);
  CHECK(f.tensor("e").at<float>(1) == 57344.0f);
  CHECK(std::isinf(f.tensor("e").at<float>(2)));
  CHECK(io::first_non_finite(f.tensor("d")) == 3);
  CHECK(io::first_non_finite(f.tensor("e")) == 2);
  CHECK(io::first_non_finite(f.tensor("c")) == -1);
  // copied through unchanged
  std::vector<io::TensorData> copy;
  for (const auto& t : f.tensors()) copy.push_back(io::TensorData::copy_of(t));
  const auto g = io::SafetensorsFile::from_bytes(io::serialize_safetensors(copy), "copy");
  for (const auto& t : f.tensors()) {
    CHECK(g.tensor(t.name).type == t.type);
    CHECK(std::equal(t.bytes.begin(), t.bytes.end(), g.tensor(t.name).bytes.begin(), g.tensor(t.name).bytes.end()));
  }
}

TEST_CASE("hostile: non-finite values are found and named (class 6)", "[io][hostile]") {
  Matrix<float> m = Matrix<float>::Ones(3, 3);
  for (auto t : {io::dtype::F32, io::dtype::F16, io::dtype::BF16, io::dtype::F64}) {
    INFO(io::dtype_name(t));
    m(2, 1) = std::numeric_limits<float>::quiet_NaN();
    auto f = io::SafetensorsFile::from_bytes(io::serialize_safetensors({io::TensorData::from_matrix("q.lora_A.weight", m, t)}),
                                             "adapter.safetensors");
    CHECK(io::first_non_finite(f.tensor("q.lora_A.weight")) == 7);
    CHECK_THROWS_WITH(io::require_finite(f.tensor("q.lora_A.weight"), "merge"),
                      ContainsSubstring("adapter.safetensors") && ContainsSubstring("'q.lora_A.weight'") &&
                          ContainsSubstring("element 7"));
    m(2, 1) = -std::numeric_limits<float>::infinity();
    f = io::SafetensorsFile::from_bytes(io::serialize_safetensors({io::TensorData::from_matrix("w", m, t)}), "x");
    CHECK(io::first_non_finite(f.tensor("w")) == 7);
    m(2, 1) = 65504.0f;  // F16's largest: finite
    f = io::SafetensorsFile::from_bytes(io::serialize_safetensors({io::TensorData::from_matrix("w", m, t)}), "x");
    CHECK(io::first_non_finite(f.tensor("w")) == -1);
  }
}

TEST_CASE("hostile: outputs never touch an input (class 10)", "[io][hostile]") {
  TempDir tmp("st");
  const fs::path base = tmp.path / "base", adapter = tmp.path / "adapter", other = tmp.path / "other";
  fs::create_directories(base);
  fs::create_directories(adapter);
  fs::create_directories(other);
  { std::ofstream(base / "model.safetensors") << "x"; }
  { std::ofstream(adapter / "adapter_model.safetensors") << "x"; }
  { std::ofstream(other / "notes.txt") << "mine"; }
  const std::vector<fs::path> in{base, adapter};
  using io::output_kind;
  // the input itself, also through another spelling and a hard link
  CHECK_THROWS_WITH(io::check_output(base, in, output_kind::folder), ContainsSubstring("is the input"));
  fs::create_directories(tmp.path / "x");
  CHECK_THROWS_WITH(io::check_output(tmp.path / "x" / ".." / "base", in, output_kind::folder),
                    ContainsSubstring("is the input"));
  fs::create_hard_link(base / "model.safetensors", tmp.path / "link.safetensors");
  CHECK_THROWS_WITH(io::check_output(tmp.path / "link.safetensors", {base / "model.safetensors"}, output_kind::file),
                    ContainsSubstring("is the input"));
  fs::create_directory_symlink(adapter, tmp.path / "alias");
  CHECK_THROWS_WITH(io::check_output(tmp.path / "alias", in, output_kind::folder), ContainsSubstring("is the input"));
  // inside an input folder (merge --base dir --out dir/model.safetensors; --plot adapter/x)
  CHECK_THROWS_WITH(io::check_output(base / "model.safetensors", in, output_kind::file),
                    ContainsSubstring("inside the input folder"));
  CHECK_THROWS_WITH(io::check_output(adapter / "new" / "deeper", in, output_kind::folder),
                    ContainsSubstring("inside the input folder"));
  CHECK_THROWS_WITH(io::check_output(tmp.path / "alias" / "plot.svg", in, output_kind::file),
                    ContainsSubstring("inside the input folder"));
  // a folder that holds an input would be deleted whole
  CHECK_THROWS_WITH(io::check_output(tmp.path, in, output_kind::folder), ContainsSubstring("holds the input"));
  // a folder of unrelated files: only with force
  CHECK_THROWS_WITH(io::check_output(other, in, output_kind::folder),
                    ContainsSubstring(other.string()) && ContainsSubstring("--force"));
  CHECK_NOTHROW(io::check_output(other, in, output_kind::folder, true));
  CHECK_THROWS_WITH(io::check_output(other / "notes.txt", in, output_kind::folder), ContainsSubstring("not a folder"));
  CHECK_THROWS_WITH(io::check_output(other, in, output_kind::file), ContainsSubstring("is a folder"));
  // fine: a new path, an empty folder, a previous output of ours
  CHECK_NOTHROW(io::check_output(tmp.path / "merged", in, output_kind::folder));
  fs::create_directories(tmp.path / "empty");
  CHECK_NOTHROW(io::check_output(tmp.path / "empty", in, output_kind::folder));
  fs::create_directories(tmp.path / "prev");
  { std::ofstream(tmp.path / "prev" / "model.safetensors") << "x"; }
  { std::ofstream(tmp.path / "prev" / "config.json") << "{}"; }
  CHECK_NOTHROW(io::check_output(tmp.path / "prev", in, output_kind::folder));
  CHECK_NOTHROW(io::check_output(tmp.path / "merged.safetensors", {base / "model.safetensors"}, output_kind::file));
}

TEST_CASE("hostile: temporaries go on SIGTERM and are cleaned after SIGKILL; errors name the target (class 11)",
          "[io][hostile]") {
  TempDir tmp("st");
  const fs::path target = tmp.path / "out.safetensors";
  // A child writes, and is terminated in the middle of its write.
  for (int sig : {SIGTERM, SIGINT}) {
    for (bool folder : {false, true}) {
      const pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        io::remove_temporaries_on_signal();
        auto body = [sig](const fs::path& t) {
          io::write_bytes(fs::is_directory(t) ? t / "model.safetensors" : t, std::string(4096, 'x'));
          ::raise(sig);
        };
        if (folder)
          io::write_folder_atomically(tmp.path / "outdir", body);
        else
          io::write_file_atomically(target, body);
        ::_exit(0);
      }
      int status = 0;
      ::waitpid(pid, &status, 0);
      CHECK(WIFSIGNALED(status));
      CHECK(WTERMSIG(status) == sig);
      CHECK(count_temporaries(tmp.path) == 0);
      CHECK(!fs::exists(target));
    }
  }
  // SIGKILL cannot be caught: the next write of the same target removes what it left,
  // but not the temporary of a writer that is still running (here: our parent's pid).
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ::waitpid(dead, nullptr, 0);
  const fs::path stale_file = tmp.path / fmt::format(".out.safetensors.tmp-{}-abc", dead);
  const fs::path stale_dir = tmp.path / fmt::format(".out.safetensors.tmp-{}-def", dead);
  const fs::path live = tmp.path / fmt::format(".out.safetensors.tmp-{}-123", ::getppid());
  { std::ofstream(stale_file) << std::string(1000, 'x'); }
  fs::create_directory(stale_dir);
  { std::ofstream(stale_dir / "model.safetensors") << "x"; }
  { std::ofstream(live) << "x"; }
  io::write_file_atomically(target, [](const fs::path& t) { io::write_bytes(t, "new"); });
  CHECK(!fs::exists(stale_file));
  CHECK(!fs::exists(stale_dir));
  CHECK(fs::exists(live));
  CHECK(count_temporaries(tmp.path) == 1);
  // A full disk (EFBIG from RLIMIT_FSIZE stands in for ENOSPC) is reported for the target.
  const fs::path big = tmp.path / "big.safetensors";
  const pid_t child = ::fork();
  if (child == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl {1000, 1000};
    ::setrlimit(RLIMIT_FSIZE, &rl);
    try {
      io::write_file_atomically(big, [](const fs::path& t) { io::write_bytes(t, std::string(100000, 'x')); });
    } catch (const lora::error& e) {
      const std::string msg = e.what();
      ::_exit(msg.find(big.string()) != std::string::npos && msg.find(".tmp-") == std::string::npos ? 3 : 4);
    }
    ::_exit(5);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 3);
  CHECK(!fs::exists(big));
}

TEST_CASE("hostile: concurrent writers of one folder: the last wins, none fails (class 12)", "[io][hostile]") {
  TempDir tmp("st");
  const fs::path out = tmp.path / "outdir";
  std::vector<std::thread> th;
  std::atomic<int> failures{0};
  for (int w = 0; w < 6; ++w)
    th.emplace_back([&, w] {
      for (int k = 0; k < 15; ++k) {
        try {
          io::write_folder_atomically(out, [&](const fs::path& t) {
            io::write_bytes(t / "model.safetensors", fmt::format("{}-{}", w, k));
            io::write_bytes(t / "config.json", "{}");
          });
        } catch (const std::exception& e) {
          UNSCOPED_INFO(e.what());
          ++failures;
        }
      }
    });
  for (auto& t : th) t.join();
  CHECK(failures == 0);
  REQUIRE(fs::is_directory(out));
  CHECK(fs::exists(out / "model.safetensors"));
  CHECK(fs::exists(out / "config.json"));
  CHECK(count_temporaries(tmp.path) == 0);
}

TEST_CASE("hostile: PEFT patterns match as Python's re, in linear time (class 2)", "[io][hostile]") {
  // target_modules as a string: re.fullmatch(pattern, name)
  const std::string q = "model.layers.0.self_attn.q_proj";
  CHECK(io::regex_full_match(R"(.*\.(q_proj|v_proj))", q));
  CHECK(io::regex_full_match(R"(.*(q|v)_proj$)", q));
  CHECK(!io::regex_full_match(R"(.*\.(q_proj|v_proj))", "q_proj"));
  CHECK(!io::regex_full_match("q_proj", q));  // fullmatch, not search
  CHECK(io::regex_full_match(R"(model\.layers\.[0-3]\.self_attn\.(q|k)_proj)", q));
  CHECK(!io::regex_full_match(R"(model\.layers\.[1-3]\.self_attn\.(q|k)_proj)", q));
  // rank_pattern / alpha_pattern keys: re.match(rf"(.*\.)?({key})$", name)
  CHECK(io::pattern_key_matches("q_proj", q));
  CHECK(io::pattern_key_matches("self_attn.q_proj", q));
  CHECK(io::pattern_key_matches(R"(layers\.0\.self_attn\.q_proj)", q));
  CHECK(io::pattern_key_matches("model.layers.0.self_attn.q_proj", q));
  CHECK(!io::pattern_key_matches("proj", q));  // the key must start after a dot
  CHECK(!io::pattern_key_matches("q", q));
  CHECK(io::pattern_key_matches("^model.*q_proj", q));
  CHECK(io::pattern_key_matches(".*_proj", q));
  CHECK(io::pattern_key_matches("q_proj", q + "\n"));  // Python's $ before a final newline
#if defined(LORA_WITH_RE2)
  // A catastrophic pattern and a 60,000-character name: linear time, no stack overflow.
  const std::string longname(60000, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(!io::pattern_key_matches("([a-z_.0-9]|[a-z_.0-9])*Z", longname));
  CHECK(!io::regex_full_match("(a*)*b", longname));
  CHECK(io::regex_full_match("(a|aa)*", longname));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
  // look-around and back-references need backtracking: refused, naming the pattern
  CHECK_THROWS_WITH(io::regex_full_match("(?=q)q_proj", q, "cfg.json: target_modules"),
                    ContainsSubstring("cfg.json: target_modules") && ContainsSubstring("(?=q)q_proj"));
  CHECK_THROWS_WITH(io::pattern_key_matches(R"((a)\1)", q), ContainsSubstring("rank_pattern"));
#endif
}
