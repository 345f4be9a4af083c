#pragma once
// GGUF v3 files (ggml's format, read by llama.cpp): memory-mapped reading with every
// header field checked, and atomic writing.
//
//   auto f = lora::io::GgufFile::open("adapter.gguf");
//   double alpha = f.value("adapter.lora.alpha").as_double();
//   Matrix<float> a = f.tensor("blk.0.attn_q.weight.lora_a").to_matrix<float>();   // [ne1 × ne0]
//   lora::io::write_gguf("out.gguf", {{"general.type", GgufValue::string("adapter")}},
//                        {GgufTensorData::from_matrix("x", a, ggml_type::Q8_0)});
//
// Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 key/value count; each
// key/value is a string (u64 length + bytes), a u32 value type and the value (an array is
// u32 element type, u64 count, elements); each tensor info is its name, u32 n_dims, n_dims
// u64 extents ne[0..] (ne[0] varies fastest: a PyTorch [rows × cols] tensor has ne = [cols,
// rows]), u32 ggml type and u64 offset; then padding to `general.alignment` (u32, default 32)
// and the data, each tensor at an aligned offset from the data start.
// Tensor types read: every type whose block size ggml defines for the plain and k-quant
// formats (sizes checked); dequantised: F32, F16, BF16, F64, Q8_0, Q4_0. Written: F32, F16,
// BF16, Q8_0 (ggml's quantize_row_q8_0_ref: d = max|x|/127 per 32 values, q = round(x/d)
// half away from zero, d stored as F16).

#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/safetensors.hpp>  // detail::MappedFile

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace lora::io {

/// GGUF metadata value types (the u32 written before each value).
enum class gguf_type : std::uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

inline std::string_view gguf_type_name(gguf_type t) {
  static constexpr std::string_view names[] = {"UINT8", "INT8",   "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
                                               "BOOL",  "STRING", "ARRAY",  "UINT64", "INT64", "FLOAT64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? names[i] : std::string_view("?");
}

/// ggml tensor types (ggml.h's enum ggml_type; gaps are types ggml removed).
enum class ggml_type : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
};

namespace detail {
struct GgmlTypeInfo {
  std::string_view name;
  std::int64_t block;  ///< elements per block (0: not a type this reader knows)
  std::int64_t bytes;  ///< bytes per block
};
inline GgmlTypeInfo ggml_type_info(std::uint32_t t) {
  switch (t) {
    case 0: return {"F32", 1, 4};
    case 1: return {"F16", 1, 2};
    case 2: return {"Q4_0", 32, 18};
    case 3: return {"Q4_1", 32, 20};
    case 6: return {"Q5_0", 32, 22};
    case 7: return {"Q5_1", 32, 24};
    case 8: return {"Q8_0", 32, 34};
    case 9: return {"Q8_1", 32, 36};
    case 10: return {"Q2_K", 256, 84};
    case 11: return {"Q3_K", 256, 110};
    case 12: return {"Q4_K", 256, 144};
    case 13: return {"Q5_K", 256, 176};
    case 14: return {"Q6_K", 256, 210};
    case 15: return {"Q8_K", 256, 292};
    case 24: return {"I8", 1, 1};
    case 25: return {"I16", 1, 2};
    case 26: return {"I32", 1, 4};
    case 27: return {"I64", 1, 8};
    case 28: return {"F64", 1, 8};
    case 30: return {"BF16", 1, 2};
    default: return {"?", 0, 0};
  }
}
}  // namespace detail

inline std::string_view ggml_type_name(ggml_type t) { return detail::ggml_type_info(static_cast<std::uint32_t>(t)).name; }

/// Parses "F32", "f16", "bf16", "q8_0", ... (any type this header knows).
inline ggml_type parse_ggml_type(std::string_view s, std::string_view where) {
  std::string up(s);
  for (char& c : up) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (std::uint32_t t = 0; t < 31; ++t)
    if (detail::ggml_type_info(t).block != 0 && detail::ggml_type_info(t).name == up) return static_cast<ggml_type>(t);
  lora::detail::fail("{}: unknown tensor type '{}' (expected e.g. f32, f16, bf16, q8_0)", where, s);
}

/// Bytes of a tensor of `type` with ne[0] elements per row and `n` elements in all
/// (ne[0] must be a whole number of blocks).
inline std::uint64_t ggml_nbytes(ggml_type type, std::int64_t n) {
  const auto info = detail::ggml_type_info(static_cast<std::uint32_t>(type));
  return static_cast<std::uint64_t>(n / info.block) * static_cast<std::uint64_t>(info.bytes);
}

struct GgufValue;
/// An array value: its element type and the elements (each a GgufValue of that type).
struct GgufArray {
  gguf_type type = gguf_type::UINT8;
  std::vector<GgufValue> items;
};

/// One metadata value of any GGUF type.
struct GgufValue {
  gguf_type type = gguf_type::UINT8;
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string, GgufArray> v;

  static GgufValue make(gguf_type t, std::uint64_t u) { return {t, u}; }
  static GgufValue u32(std::uint32_t x) { return {gguf_type::UINT32, std::uint64_t{x}}; }
  static GgufValue u64(std::uint64_t x) { return {gguf_type::UINT64, x}; }
  static GgufValue i32(std::int32_t x) { return {gguf_type::INT32, std::int64_t{x}}; }
  static GgufValue f32(float x) { return {gguf_type::FLOAT32, static_cast<double>(x)}; }
  static GgufValue f64(double x) { return {gguf_type::FLOAT64, x}; }
  static GgufValue boolean(bool x) { return {gguf_type::BOOL, x}; }
  static GgufValue string(std::string s) { return {gguf_type::STRING, std::move(s)}; }
  static GgufValue strings(const std::vector<std::string>& xs) {
    GgufArray a{gguf_type::STRING, {}};
    for (const auto& x : xs) a.items.push_back(string(x));
    return {gguf_type::ARRAY, std::move(a)};
  }
  static GgufValue array(GgufArray a) { return {gguf_type::ARRAY, std::move(a)}; }

  bool is_number() const { return type != gguf_type::STRING && type != gguf_type::ARRAY && type != gguf_type::BOOL; }
  /// Any numeric type as double; throws for strings, arrays and bools.
  double as_double(std::string_view key = "value") const {
    if (auto* d = std::get_if<double>(&v)) return *d;
    if (auto* u = std::get_if<std::uint64_t>(&v)) return static_cast<double>(*u);
    if (auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
    lora::detail::fail("GGUF key '{}' is {}, expected a number", key, gguf_type_name(type));
  }
  /// An integer type as int64 (a uint64 above INT64_MAX throws).
  std::int64_t as_int(std::string_view key = "value") const {
    if (auto* u = std::get_if<std::uint64_t>(&v)) {
      if (*u > static_cast<std::uint64_t>(INT64_MAX)) lora::detail::fail("GGUF key '{}': {} is too large", key, *u);
      return static_cast<std::int64_t>(*u);
    }
    if (auto* i = std::get_if<std::int64_t>(&v)) return *i;
    lora::detail::fail("GGUF key '{}' is {}, expected an integer", key, gguf_type_name(type));
  }
  const std::string& as_string(std::string_view key = "value") const {
    if (auto* s = std::get_if<std::string>(&v)) return *s;
    lora::detail::fail("GGUF key '{}' is {}, expected STRING", key, gguf_type_name(type));
  }
  const GgufArray& as_array(std::string_view key = "value") const {
    if (auto* a = std::get_if<GgufArray>(&v)) return *a;
    lora::detail::fail("GGUF key '{}' is {}, expected ARRAY", key, gguf_type_name(type));
  }
  bool operator==(const GgufValue& o) const;
};
inline bool operator==(const GgufArray& a, const GgufArray& b) { return a.type == b.type && a.items == b.items; }
inline bool GgufValue::operator==(const GgufValue& o) const { return type == o.type && v == o.v; }

using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

/// A tensor inside a mapped GGUF file (no copy until to_vector/to_matrix).
struct GgufTensorView {
  std::string name;
  std::string file;
  ggml_type type = ggml_type::F32;
  std::vector<std::int64_t> ne;  ///< extents, ne[0] fastest (GGUF order)
  std::uint64_t offset = 0;      ///< from the start of the data section
  std::span<const std::byte> bytes;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : ne) n *= d;
    return n;
  }
  /// The PyTorch/numpy shape: ne reversed.
  std::vector<std::int64_t> shape() const { return {ne.rbegin(), ne.rend()}; }

  /// All elements dequantised to S, in storage order (ne[0] fastest).
  template <class S>
  std::vector<S> to_vector() const;
  /// A 1- or 2-D tensor as a row-major [ne1 × ne0] matrix.
  template <class S>
  Matrix<S> to_matrix() const {
    if (ne.empty() || ne.size() > 2)
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected a matrix (1 or 2)", file, name, ne.size());
    const std::vector<S> v = to_vector<S>();
    const Index cols = static_cast<Index>(ne[0]);
    const Index rows = ne.size() == 2 ? static_cast<Index>(ne[1]) : 1;
    return Eigen::Map<const Matrix<S>>(v.data(), rows, cols);
  }
};

namespace detail {

/// Round half away from zero in float, as gguf-py's np_roundf and C's roundf.
inline float round_away(float x) { return std::round(x); }

/// One Q8_0 block of 32 values: d = max|x|/127 (float), q = round(x·(1/d)), d as F16.
inline void quantize_q8_0_block(const float* x, std::byte* out) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const std::uint16_t dh = float_to_f16(d);
  std::memcpy(out, &dh, 2);
  for (int i = 0; i < 32; ++i) {
    const auto q = static_cast<std::int8_t>(round_away(x[i] * id));
    std::memcpy(out + 2 + i, &q, 1);
  }
}

}  // namespace detail

template <class S>
std::vector<S> GgufTensorView::to_vector() const {
  const std::int64_t n = numel();
  std::vector<S> out(static_cast<std::size_t>(n));
  const std::byte* p = bytes.data();
  auto load = [](const std::byte* q, auto tag) {
    decltype(tag) v;
    std::memcpy(&v, q, sizeof v);
    return v;
  };
  switch (type) {
    case ggml_type::F32:
      for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<S>(load(p + 4 * i, float{}));
      break;
    case ggml_type::F64:
      for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<S>(load(p + 8 * i, double{}));
      break;
    case ggml_type::F16:
      for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<S>(f16_to_float(load(p + 2 * i, std::uint16_t{})));
      break;
    case ggml_type::BF16:
      for (std::int64_t i = 0; i < n; ++i)
        out[i] = static_cast<S>(bf16_to_float(load(p + 2 * i, std::uint16_t{})));
      break;
    case ggml_type::Q8_0:
      for (std::int64_t b = 0; b < n / 32; ++b) {
        const std::byte* blk = p + 34 * b;
        const float d = f16_to_float(load(blk, std::uint16_t{}));
        for (int i = 0; i < 32; ++i) out[32 * b + i] = static_cast<S>(d * static_cast<float>(load(blk + 2 + i, std::int8_t{})));
      }
      break;
    case ggml_type::Q4_0:  // d (F16), 16 bytes: low nibbles are values 0..15, high nibbles 16..31; x = d·(q − 8)
      for (std::int64_t b = 0; b < n / 32; ++b) {
        const std::byte* blk = p + 18 * b;
        const float d = f16_to_float(load(blk, std::uint16_t{}));
        for (int i = 0; i < 16; ++i) {
          const auto q = static_cast<std::uint8_t>(blk[2 + i]);
          out[32 * b + i] = static_cast<S>(d * static_cast<float>((q & 0x0F) - 8));
          out[32 * b + i + 16] = static_cast<S>(d * static_cast<float>((q >> 4) - 8));
        }
      }
      break;
    default:
      lora::detail::fail("{}: tensor '{}' has type {}, which this reader does not dequantise (F32, F16, BF16, F64, "
                         "Q8_0 and Q4_0 are)",
                         file, name, ggml_type_name(type));
  }
  return out;
}

/// A GGUF file opened for reading. Tensors are views into the mapping, valid while the
/// GgufFile (or a copy of it) lives.
class GgufFile {
 public:
  /// Maps and validates the file; every malformed field throws lora::error naming the file
  /// and the key or tensor.
  static GgufFile open(const std::filesystem::path& path) {
    GgufFile f;
    f.map_ = std::make_shared<detail::MappedFile>(path);
    f.parse();
    return f;
  }
  /// The same checks on bytes held in memory (copied); `name` stands for the file in messages.
  static GgufFile from_bytes(std::string_view bytes, std::string name = "<memory>") {
    GgufFile f;
    f.map_ = std::make_shared<detail::MappedFile>(bytes, std::move(name));
    f.parse();
    return f;
  }

  const std::string& path() const { return map_->path(); }
  std::uint32_t version() const { return version_; }
  std::uint32_t alignment() const { return alignment_; }
  /// Key/value pairs in file order.
  const GgufMetadata& metadata() const { return kv_; }
  const GgufValue* find_value(std::string_view key) const {
    for (const auto& [k, v] : kv_)
      if (k == key) return &v;
    return nullptr;
  }
  const GgufValue& value(std::string_view key) const {
    if (auto* v = find_value(key)) return *v;
    lora::detail::fail("{}: no metadata key '{}'", path(), key);
  }
  /// Tensors in the order of their infos in the file.
  const std::vector<GgufTensorView>& tensors() const { return tensors_; }
  const GgufTensorView* find(std::string_view name) const {
    auto it = index_.find(std::string(name));
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const GgufTensorView& tensor(std::string_view name) const {
    if (auto* t = find(name)) return *t;
    lora::detail::fail("{}: no tensor named '{}'", path(), name);
  }

 private:
  struct Cursor {
    const std::byte* p;
    std::uint64_t left;
    const std::string& file;
    std::uint64_t pos = 0;

    void need(std::uint64_t n, std::string_view what) {
      if (n > left)
        lora::detail::fail("{}: {} needs {} bytes at offset {}, but the file has {} left", file, what, n, pos, left);
    }
    template <class T>
    T get(std::string_view what) {
      need(sizeof(T), what);
      T v;
      std::memcpy(&v, p, sizeof v);
      p += sizeof v;
      left -= sizeof v;
      pos += sizeof v;
      return v;
    }
    std::string str(std::string_view what) {
      const auto n = get<std::uint64_t>(what);
      need(n, what);
      std::string s(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
      p += n;
      left -= n;
      pos += n;
      return s;
    }
  };

  static std::uint64_t min_size(gguf_type t) {
    switch (t) {
      case gguf_type::UINT8: case gguf_type::INT8: case gguf_type::BOOL: return 1;
      case gguf_type::UINT16: case gguf_type::INT16: return 2;
      case gguf_type::UINT32: case gguf_type::INT32: case gguf_type::FLOAT32: return 4;
      case gguf_type::UINT64: case gguf_type::INT64: case gguf_type::FLOAT64: case gguf_type::STRING: return 8;
      case gguf_type::ARRAY: return 12;
    }
    return 1;
  }

  GgufValue read_value(Cursor& c, std::uint32_t raw, const std::string& key, int depth) {
    const std::string what = fmt::format("value of key '{}'", key);
    if (raw > 12) lora::detail::fail("{}: key '{}' has unknown value type {} (GGUF defines 0-12)", c.file, key, raw);
    const auto t = static_cast<gguf_type>(raw);
    switch (t) {
      case gguf_type::UINT8: return {t, std::uint64_t{c.get<std::uint8_t>(what)}};
      case gguf_type::INT8: return {t, std::int64_t{c.get<std::int8_t>(what)}};
      case gguf_type::UINT16: return {t, std::uint64_t{c.get<std::uint16_t>(what)}};
      case gguf_type::INT16: return {t, std::int64_t{c.get<std::int16_t>(what)}};
      case gguf_type::UINT32: return {t, std::uint64_t{c.get<std::uint32_t>(what)}};
      case gguf_type::INT32: return {t, std::int64_t{c.get<std::int32_t>(what)}};
      case gguf_type::FLOAT32: return {t, static_cast<double>(c.get<float>(what))};
      case gguf_type::UINT64: return {t, c.get<std::uint64_t>(what)};
      case gguf_type::INT64: return {t, c.get<std::int64_t>(what)};
      case gguf_type::FLOAT64: return {t, c.get<double>(what)};
      case gguf_type::BOOL: {
        const auto b = c.get<std::uint8_t>(what);
        if (b > 1) lora::detail::fail("{}: key '{}': BOOL holds {}, expected 0 or 1", c.file, key, b);
        return {t, b == 1};
      }
      case gguf_type::STRING: return {t, c.str(what)};
      case gguf_type::ARRAY: {
        if (depth > 0) lora::detail::fail("{}: key '{}': arrays nested more than one level are not read", c.file, key);
        GgufArray a;
        const auto et = c.get<std::uint32_t>(what);
        const auto n = c.get<std::uint64_t>(what);
        if (et > 12) lora::detail::fail("{}: key '{}' is an array of unknown value type {}", c.file, key, et);
        a.type = static_cast<gguf_type>(et);
        if (n > c.left / min_size(a.type))
          lora::detail::fail("{}: key '{}': array of {} {} elements runs past the end of the file ({} bytes left)",
                             c.file, key, n, gguf_type_name(a.type), c.left);
        a.items.reserve(static_cast<std::size_t>(n));
        for (std::uint64_t i = 0; i < n; ++i) a.items.push_back(read_value(c, et, key, depth + 1));
        return {t, std::move(a)};
      }
    }
    return {};
  }

  void parse() {
    const std::string& file = map_->path();
    Cursor c{map_->data(), map_->size(), file};
    if (map_->size() < 24)
      lora::detail::fail("{}: file is {} bytes, too short for a GGUF header (24)", file, map_->size());
    if (std::memcmp(map_->data(), "GGUF", 4) != 0)
      lora::detail::fail("{}: not a GGUF file (magic is not 'GGUF')", file);
    c.get<std::uint32_t>("magic");
    version_ = c.get<std::uint32_t>("version");
    if ((version_ & 0xFFFFu) == 0 && version_ != 0)
      lora::detail::fail("{}: GGUF version {:#x} looks byte-swapped: big-endian files are not read", file, version_);
    if (version_ != 2 && version_ != 3)
      lora::detail::fail("{}: GGUF version {}, expected 3 (or 2, the same layout)", file, version_);
    const auto n_tensors = c.get<std::uint64_t>("tensor count");
    const auto n_kv = c.get<std::uint64_t>("key/value count");
    // Each key/value takes at least 8 + 4 + 1 bytes and each tensor info at least 8 + 4 + 4 + 8.
    if (n_kv > c.left / 13)
      lora::detail::fail("{}: header claims {} key/value pairs, more than the file can hold", file, n_kv);
    if (n_tensors > c.left / 24)
      lora::detail::fail("{}: header claims {} tensors, more than the file can hold", file, n_tensors);
    std::map<std::string, std::size_t> seen;
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = c.str(fmt::format("key {}", i));
      if (seen.count(key)) lora::detail::fail("{}: metadata key '{}' appears twice", file, key);
      seen[key] = i;
      const auto raw = c.get<std::uint32_t>(fmt::format("type of key '{}'", key));
      GgufValue v = read_value(c, raw, key, 0);
      kv_.emplace_back(std::move(key), std::move(v));
    }
    alignment_ = 32;
    if (const GgufValue* a = find_value("general.alignment")) {
      if (a->type != gguf_type::UINT32)
        lora::detail::fail("{}: general.alignment is {}, expected UINT32", file, gguf_type_name(a->type));
      const auto al = std::get<std::uint64_t>(a->v);
      if (al == 0 || (al & (al - 1)) != 0 || al > (1u << 20))
        lora::detail::fail("{}: general.alignment is {}, expected a power of two up to 1 MiB", file, al);
      alignment_ = static_cast<std::uint32_t>(al);
    }
    struct Info {
      std::string name;
      std::vector<std::int64_t> ne;
      std::uint32_t type;
      std::uint64_t offset;
      std::uint64_t nbytes;
    };
    std::vector<Info> infos;
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      Info t;
      t.name = c.str(fmt::format("name of tensor {}", i));
      const std::string where = fmt::format("{}: tensor '{}'", file, t.name);
      if (t.name.size() >= 64) lora::detail::fail("{}: name is {} bytes, ggml allows at most 63", where, t.name.size());
      if (index_.count(t.name)) lora::detail::fail("{}: appears twice", where);
      index_[t.name] = i;
      const auto nd = c.get<std::uint32_t>("n_dims");
      if (nd > 4) lora::detail::fail("{}: {} dimensions, ggml allows at most 4", where, nd);
      // bound: the product of the extents with zeros counted as 1, so that a zero extent does not
      // let a huge one through (a tensor of no elements still has every extent representable)
      std::uint64_t numel = 1, bound = 1;
      for (std::uint32_t d = 0; d < nd; ++d) {
        const auto e = c.get<std::int64_t>("extent");
        if (e < 0) lora::detail::fail("{}: extent ne[{}] = {} is negative", where, d, e);
        if (e > 1 && bound > static_cast<std::uint64_t>(INT64_MAX / 64) / static_cast<std::uint64_t>(e))
          lora::detail::fail("{}: shape is too large (element count overflows)", where);
        bound *= static_cast<std::uint64_t>(std::max<std::int64_t>(e, 1));
        numel *= static_cast<std::uint64_t>(e);
        t.ne.push_back(e);
      }
      t.type = c.get<std::uint32_t>("type");
      const auto info = detail::ggml_type_info(t.type);
      if (info.block == 0)
        lora::detail::fail("{}: unknown or unsupported ggml type {} (this reader knows F32, F16, BF16, F64, "
                           "I8-I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K-Q8_K)",
                           where, t.type);
      const std::int64_t row = t.ne.empty() ? 1 : t.ne[0];
      if (row % info.block != 0)
        lora::detail::fail("{}: type {} packs {} values per block, but ne[0] = {} is not a multiple", where, info.name,
                           info.block, row);
      t.nbytes = numel / static_cast<std::uint64_t>(info.block) * static_cast<std::uint64_t>(info.bytes);
      t.offset = c.get<std::uint64_t>("offset");
      if (t.offset % alignment_ != 0)
        lora::detail::fail("{}: data offset {} is not a multiple of the alignment {}", where, t.offset, alignment_);
      infos.push_back(std::move(t));
    }
    const std::uint64_t header_end = c.pos;
    const std::uint64_t data_start = (header_end + alignment_ - 1) / alignment_ * alignment_;
    const std::uint64_t size = map_->size();
    const std::uint64_t data_size = data_start <= size ? size - data_start : 0;
    if (!infos.empty() && data_start > size)
      lora::detail::fail("{}: the data section would start at {} (aligned to {}), past the end of the file ({} bytes)",
                         file, data_start, alignment_, size);
    for (auto& t : infos) {
      if (t.offset > data_size || t.nbytes > data_size - t.offset)
        lora::detail::fail("{}: tensor '{}': {} bytes at data offset {} run past the end of the data section ({} bytes)",
                           file, t.name, t.nbytes, t.offset, data_size);
      GgufTensorView v;
      v.name = t.name;
      v.file = file;
      v.type = static_cast<ggml_type>(t.type);
      v.ne = t.ne;
      v.offset = t.offset;
      v.bytes = std::span<const std::byte>(map_->data() + data_start + t.offset, static_cast<std::size_t>(t.nbytes));
      tensors_.push_back(std::move(v));
    }
    std::vector<const GgufTensorView*> by_off;
    for (const auto& t : tensors_) by_off.push_back(&t);
    std::sort(by_off.begin(), by_off.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
    for (std::size_t k = 1; k < by_off.size(); ++k)
      if (by_off[k]->offset < by_off[k - 1]->offset + by_off[k - 1]->bytes.size())
        lora::detail::fail("{}: tensors '{}' and '{}' overlap in the data section", file, by_off[k - 1]->name,
                           by_off[k]->name);
  }

  std::shared_ptr<detail::MappedFile> map_;
  std::uint32_t version_ = 3;
  std::uint32_t alignment_ = 32;
  GgufMetadata kv_;
  std::vector<GgufTensorView> tensors_;
  std::map<std::string, std::size_t> index_;
};

/// A tensor to write: name, ggml type, extents (ne[0] fastest) and its encoded bytes.
struct GgufTensorData {
  std::string name;
  ggml_type type = ggml_type::F32;
  std::vector<std::int64_t> ne;
  std::vector<std::byte> bytes;

  /// Encodes `n` floats (storage order) as F32, F16, BF16 (both rounded to nearest even)
  /// or Q8_0 (ne[0] a multiple of 32).
  static GgufTensorData from_values(std::string name, const float* values, std::vector<std::int64_t> ne,
                                    ggml_type type) {
    GgufTensorData t{std::move(name), type, std::move(ne), {}};
    std::int64_t n = 1;
    for (auto d : t.ne) n *= d;
    switch (type) {
      case ggml_type::F32:
        t.bytes.resize(static_cast<std::size_t>(n) * 4);
        if (n) std::memcpy(t.bytes.data(), values, static_cast<std::size_t>(n) * 4);
        break;
      case ggml_type::F16:
      case ggml_type::BF16:
        t.bytes.resize(static_cast<std::size_t>(n) * 2);
        for (std::int64_t i = 0; i < n; ++i) {
          const std::uint16_t h = type == ggml_type::F16
                                      ? float_to_f16(values[i])
                                      : float_to_bf16(values[i]);  // ggml's rounding (NaN kept quiet)
          std::memcpy(t.bytes.data() + 2 * i, &h, 2);
        }
        break;
      case ggml_type::Q8_0:
        if (t.ne.empty() || t.ne[0] % 32 != 0)
          lora::detail::fail("tensor '{}': Q8_0 needs rows of a multiple of 32 values, ne[0] = {}", t.name,
                             t.ne.empty() ? 1 : t.ne[0]);
        t.bytes.resize(static_cast<std::size_t>(n / 32) * 34);
        for (std::int64_t b = 0; b < n / 32; ++b) detail::quantize_q8_0_block(values + 32 * b, t.bytes.data() + 34 * b);
        break;
      default:
        lora::detail::fail("tensor '{}': writing type {} is not supported (F32, F16, BF16, Q8_0 are)", t.name,
                           ggml_type_name(type));
    }
    return t;
  }
  /// A row-major [rows × cols] matrix as a tensor with ne = [cols, rows].
  static GgufTensorData from_matrix(std::string name, const Matrix<float>& m, ggml_type type) {
    return from_values(std::move(name), m.data(), {m.cols(), m.rows()}, type);
  }
};

namespace detail {
struct GgufSink {
  std::string out;
  template <class T>
  void put(T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void str(std::string_view s) {
    put<std::uint64_t>(s.size());
    out.append(s);
  }
  void value(const GgufValue& v, const std::string& key) {
    switch (v.type) {
      case gguf_type::UINT8: put(static_cast<std::uint8_t>(v.as_int(key))); break;
      case gguf_type::INT8: put(static_cast<std::int8_t>(v.as_int(key))); break;
      case gguf_type::UINT16: put(static_cast<std::uint16_t>(v.as_int(key))); break;
      case gguf_type::INT16: put(static_cast<std::int16_t>(v.as_int(key))); break;
      case gguf_type::UINT32: put(static_cast<std::uint32_t>(v.as_int(key))); break;
      case gguf_type::INT32: put(static_cast<std::int32_t>(v.as_int(key))); break;
      case gguf_type::UINT64: put(std::get<std::uint64_t>(v.v)); break;
      case gguf_type::INT64: put(static_cast<std::int64_t>(v.as_int(key))); break;
      case gguf_type::FLOAT32: put(static_cast<float>(v.as_double(key))); break;
      case gguf_type::FLOAT64: put(v.as_double(key)); break;
      case gguf_type::BOOL: put(static_cast<std::uint8_t>(std::get<bool>(v.v) ? 1 : 0)); break;
      case gguf_type::STRING: str(v.as_string(key)); break;
      case gguf_type::ARRAY: {
        const GgufArray& a = v.as_array(key);
        if (a.type == gguf_type::ARRAY) lora::detail::fail("GGUF key '{}': nested arrays are not written", key);
        put(static_cast<std::uint32_t>(a.type));
        put<std::uint64_t>(a.items.size());
        for (const auto& x : a.items) {
          if (x.type != a.type)
            lora::detail::fail("GGUF key '{}': array of {} holds a {}", key, gguf_type_name(a.type), gguf_type_name(x.type));
          value(x, key);
        }
        break;
      }
    }
  }
};
}  // namespace detail

/// The GGUF v3 bytes of `metadata` (in order) and `tensors` (in order, each at an offset
/// aligned to general.alignment if the metadata sets it as UINT32, else 32).
inline std::string serialize_gguf(const GgufMetadata& metadata, const std::vector<GgufTensorData>& tensors) {
  std::uint64_t alignment = 32;
  std::map<std::string, int> keys;
  for (const auto& [k, v] : metadata) {
    if (keys[k]++) lora::detail::fail("GGUF metadata key '{}' given twice", k);
    if (k == "general.alignment") {
      if (v.type != gguf_type::UINT32) lora::detail::fail("general.alignment must be UINT32");
      alignment = std::get<std::uint64_t>(v.v);
      if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > (1u << 20))
        lora::detail::fail("general.alignment is {}, expected a power of two up to 1 MiB", alignment);
    }
  }
  detail::GgufSink s;
  s.out.append("GGUF");
  s.put<std::uint32_t>(3);
  s.put<std::uint64_t>(tensors.size());
  s.put<std::uint64_t>(metadata.size());
  for (const auto& [k, v] : metadata) {
    s.str(k);
    s.put(static_cast<std::uint32_t>(v.type));
    s.value(v, k);
  }
  std::map<std::string, int> names;
  std::uint64_t offset = 0;
  std::vector<std::uint64_t> offsets;
  for (const auto& t : tensors) {
    if (names[t.name]++) lora::detail::fail("GGUF tensor '{}' given twice", t.name);
    if (t.name.size() >= 64) lora::detail::fail("GGUF tensor '{}': name longer than ggml's 63 bytes", t.name);
    if (t.ne.size() > 4) lora::detail::fail("GGUF tensor '{}': {} dimensions, ggml allows 4", t.name, t.ne.size());
    const auto info = detail::ggml_type_info(static_cast<std::uint32_t>(t.type));
    if (info.block == 0) lora::detail::fail("GGUF tensor '{}': unknown type", t.name);
    std::int64_t n = 1;
    for (auto d : t.ne) {
      if (d < 0) lora::detail::fail("GGUF tensor '{}': negative extent {}", t.name, d);
      n *= d;
    }
    if ((t.ne.empty() ? 1 : t.ne[0]) % info.block != 0 || ggml_nbytes(t.type, n) != t.bytes.size())
      lora::detail::fail("GGUF tensor '{}': {} bytes for {} values of {}", t.name, t.bytes.size(), n, info.name);
    s.str(t.name);
    s.put<std::uint32_t>(static_cast<std::uint32_t>(t.ne.size()));
    for (auto d : t.ne) s.put<std::int64_t>(d);
    s.put(static_cast<std::uint32_t>(t.type));
    s.put<std::uint64_t>(offset);
    offsets.push_back(offset);
    offset += (t.bytes.size() + alignment - 1) / alignment * alignment;
  }
  s.out.resize((s.out.size() + alignment - 1) / alignment * alignment, '\0');
  const std::size_t data_start = s.out.size();
  s.out.resize(data_start + offset, '\0');
  for (std::size_t i = 0; i < tensors.size(); ++i)
    if (!tensors[i].bytes.empty())
      std::memcpy(s.out.data() + data_start + offsets[i], tensors[i].bytes.data(), tensors[i].bytes.size());
  return std::move(s.out);
}

/// Writes a GGUF file atomically (temporary file + rename): it appears whole or not at all.
inline void write_gguf(const std::filesystem::path& path, const GgufMetadata& metadata,
                       const std::vector<GgufTensorData>& tensors) {
  const std::string bytes = serialize_gguf(metadata, tensors);
  write_file_atomically(path, [&](const std::filesystem::path& tmp) { write_bytes(tmp, bytes); });
}

}  // namespace lora::io
