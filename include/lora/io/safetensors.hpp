#pragma once
// Reading safetensors files: memory-mapped, zero-copy views, every header
// field checked. Layout: u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data; offsets are relative to the end of the header.

#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/io/dtype.hpp>
#include <lora/io/file.hpp>
#include <lora/io/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lora::io {

/// A tensor inside a mapped file: no copy until to_matrix/to_vector.
struct TensorView {
  std::string name;
  std::string file;
  dtype type = dtype::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::size_t ndim() const { return shape.size(); }

  /// Element i converted to S (any dtype to any arithmetic type; bool → 0/1).
  template <class S>
  S at(std::int64_t i) const {
    const std::byte* p = bytes.data() + static_cast<std::size_t>(i) * dtype_size(type);
    auto load = [p](auto tag) {
      decltype(tag) v;
      std::memcpy(&v, p, sizeof v);
      return v;
    };
    switch (type) {
      case dtype::F64: return static_cast<S>(load(double{}));
      case dtype::F32: return static_cast<S>(load(float{}));
      case dtype::F16: return static_cast<S>(f16_to_float(load(std::uint16_t{})));
      case dtype::BF16: return static_cast<S>(bf16_to_float(load(std::uint16_t{})));
      case dtype::I64: return static_cast<S>(load(std::int64_t{}));
      case dtype::I32: return static_cast<S>(load(std::int32_t{}));
      case dtype::I16: return static_cast<S>(load(std::int16_t{}));
      case dtype::I8: return static_cast<S>(load(std::int8_t{}));
      case dtype::U8: return static_cast<S>(load(std::uint8_t{}));
      case dtype::BOOL: return static_cast<S>(load(std::uint8_t{}) != 0);
      case dtype::U16: return static_cast<S>(load(std::uint16_t{}));
      case dtype::U32: return static_cast<S>(load(std::uint32_t{}));
      case dtype::U64: return static_cast<S>(load(std::uint64_t{}));
      case dtype::F8_E4M3: return static_cast<S>(f8_e4m3_to_float(load(std::uint8_t{})));
      case dtype::F8_E5M2: return static_cast<S>(f8_e5m2_to_float(load(std::uint8_t{})));
    }
    return S{};
  }

  /// All elements, converted, in row-major order.
  template <class S>
  std::vector<S> to_vector() const {
    std::vector<S> out(static_cast<std::size_t>(numel()));
    convert_into(out.data());
    return out;
  }

  /// A 2-D tensor as a matrix (a 1-D tensor of n elements becomes [n × 1]).
  template <class S>
  Matrix<S> to_matrix() const {
    if (shape.size() > 2 || shape.empty())
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected a matrix (1 or 2)", file, name, shape.size());
    const Index rows = static_cast<Index>(shape[0]);
    const Index cols = shape.size() == 2 ? static_cast<Index>(shape[1]) : 1;
    Matrix<S> m(rows, cols);
    convert_into(m.data());
    return m;
  }

  template <class S>
  void convert_into(S* out) const {
    const std::int64_t n = numel();
    if (n == 0) return;  // out may be null then, and memcpy(nullptr, ..., 0) is undefined
    if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
      if (is_float(type)) {
        decode_floats(type, bytes.data(), out, static_cast<std::size_t>(n));
        return;
      }
    }
    for (std::int64_t i = 0; i < n; ++i) out[i] = at<S>(i);
  }
};

/// The index of the first NaN or ±Inf element of `t`, or -1 when every element is finite
/// (always -1 for integer tensors). Reads the bits: no conversion, no copy.
inline std::int64_t first_non_finite(const TensorView& t) {
  const std::int64_t n = static_cast<std::int64_t>(t.bytes.size() / std::max<std::size_t>(1, dtype_size(t.type)));
  const std::byte* p = t.bytes.data();
  auto scan = [&](auto tag, auto exp_mask) -> std::int64_t {
    using U = decltype(tag);
    for (std::int64_t i = 0; i < n; ++i) {
      U u;
      std::memcpy(&u, p + static_cast<std::size_t>(i) * sizeof(U), sizeof(U));
      if ((u & exp_mask) == exp_mask) return i;
    }
    return -1;
  };
  switch (t.type) {
    case dtype::F64: return scan(std::uint64_t{}, std::uint64_t{0x7ff0000000000000});
    case dtype::F32: return scan(std::uint32_t{}, std::uint32_t{0x7f800000});
    case dtype::F16: return scan(std::uint16_t{}, std::uint16_t{0x7c00});
    case dtype::BF16: return scan(std::uint16_t{}, std::uint16_t{0x7f80});
    case dtype::F8_E5M2: return scan(std::uint8_t{}, std::uint8_t{0x7c});
    case dtype::F8_E4M3: return scan(std::uint8_t{}, std::uint8_t{0x7f});  // only S.1111.111 is NaN
    default: return -1;
  }
}

/// Throws lora::error naming the file, the tensor and the element when `t` holds a NaN or
/// ±Inf; `context` says what refuses it ("merge").
inline void require_finite(const TensorView& t, std::string_view context) {
  const std::int64_t i = first_non_finite(t);
  if (i < 0) return;
  lora::detail::fail("{}: tensor '{}' holds a non-finite value ({}) at element {}; {} refuses NaN and Inf", t.file,
                     t.name, t.at<double>(i), i, context);
}

namespace detail {
/// A read-only memory mapping that unmaps on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path) : path_(path.string()) {
    struct stat st {};
    const int fd = open_regular_file(path, st);  // never blocks on a FIFO; refuses folders and devices
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        lora::detail::fail("{}: mmap failed: {}", path_, std::strerror(errno));
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
  }
  /// Holds a copy of `bytes` in memory instead of a mapping; `name` stands for the path in messages.
  MappedFile(std::string_view bytes, std::string name)
      : path_(std::move(name)), owned_(std::make_unique<std::byte[]>(bytes.size() + 1)), size_(bytes.size()) {
    std::memcpy(owned_.get(), bytes.data(), bytes.size());
    data_ = owned_.get();
  }
  ~MappedFile() {
    if (data_ && !owned_) ::munmap(const_cast<std::byte*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<std::byte[]> owned_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};
}  // namespace detail

/// A safetensors file opened for reading. Tensors are views into the mapping,
/// valid while the SafetensorsFile lives.
///
///   auto f = lora::io::SafetensorsFile::open("adapter_model.safetensors");
///   auto A = f.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").to_matrix<float>();
class SafetensorsFile {
 public:
  /// Maps and validates the file. Throws lora::error naming the file (and the
  /// tensor) for every malformed header.
  static SafetensorsFile open(const std::filesystem::path& path) {
    SafetensorsFile f;
    f.map_ = std::make_shared<detail::MappedFile>(path);
    f.parse();
    return f;
  }

  /// Parses safetensors bytes held in memory (copied), with the same checks as open();
  /// `name` stands for the file in messages.
  static SafetensorsFile from_bytes(std::string_view bytes, std::string name = "<memory>") {
    SafetensorsFile f;
    f.map_ = std::make_shared<detail::MappedFile>(bytes, std::move(name));
    f.parse();
    return f;
  }

  const std::string& path() const { return map_->path(); }
  /// The "__metadata__" string map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(std::string_view name) const { return index_.find(std::string(name)) != index_.end(); }
  /// Tensor names in the order of their data in the file.
  const std::vector<std::string>& names() const { return order_; }
  std::size_t size() const { return tensors_.size(); }

  const TensorView& tensor(std::string_view name) const {
    auto it = index_.find(std::string(name));
    if (it == index_.end()) lora::detail::fail("{}: no tensor named '{}'", path(), name);
    return tensors_[it->second];
  }
  const std::vector<TensorView>& tensors() const { return tensors_; }

  /// The largest header accepted, as the safetensors library (100 MB).
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

 private:
  void parse() {
    const std::string& file = map_->path();
    const std::size_t size = map_->size();
    if (size < 8) lora::detail::fail("{}: file is {} bytes, too short for a safetensors header (need at least 8)", file, size);
    std::uint64_t n = 0;
    std::memcpy(&n, map_->data(), 8);  // little-endian on every platform we build for
    if (n > max_header_bytes)
      lora::detail::fail("{}: header length {} is more than the {} bytes safetensors allows", file, n, max_header_bytes);
    if (n > size - 8)
      lora::detail::fail("{}: header length {} runs past the end of the file ({} bytes after the length field)", file, n,
                   size - 8);
    const char* hbeg = reinterpret_cast<const char*>(map_->data()) + 8;
    // nlohmann::json (a std::map per object): O(n log n) in the number of tensors, depth
    // bounded, a tensor name given twice is an error (the JSON would keep only one).
    const nlohmann::json header = parse_json(std::string_view(hbeg, n), file + ": header");
    if (!header.is_object()) lora::detail::fail("{}: header must be a JSON object", file);
    const std::byte* data = map_->data() + 8 + n;
    const std::uint64_t data_size = size - 8 - n;

    auto offset = [&](const nlohmann::json& v, const std::string& where) -> std::uint64_t {
      if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0))
        lora::detail::fail("{}: data_offsets must be non-negative integers, got {}", where, v.dump());
      return v.get<std::uint64_t>();
    };
    tensors_.reserve(header.size());
    for (auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) lora::detail::fail("{}: __metadata__ must be an object of strings", file);
        for (auto& [mk, mv] : value.items()) {
          if (!mv.is_string()) lora::detail::fail("{}: __metadata__['{}'] must be a string", file, mk);
          metadata_[mk] = mv.get<std::string>();
        }
        continue;
      }
      const std::string where = fmt::format("{}: tensor '{}'", file, key);
      if (!value.is_object()) lora::detail::fail("{}: entry must be an object with dtype, shape, data_offsets", where);
      if (!value.contains("dtype") || !value["dtype"].is_string()) lora::detail::fail("{}: missing string 'dtype'", where);
      if (!value.contains("shape") || !value["shape"].is_array()) lora::detail::fail("{}: missing array 'shape'", where);
      if (!value.contains("data_offsets") || !value["data_offsets"].is_array() || value["data_offsets"].size() != 2)
        lora::detail::fail("{}: 'data_offsets' must be an array [begin, end]", where);
      TensorView t;
      t.name = key;
      t.file = file;
      t.type = parse_dtype(value["dtype"].get<std::string>(), where);
      // numel · dtype_size stays below 2^62, so no product here wraps around.
      const std::uint64_t limit = (std::uint64_t{1} << 62) / dtype_size(t.type);
      std::uint64_t numel = 1;
      for (auto& d : value["shape"]) {
        if (d.is_number_integer() && !d.is_number_unsigned() && d.get<std::int64_t>() < 0)
          lora::detail::fail("{}: negative dimension {} in shape", where, d.get<std::int64_t>());
        if (!d.is_number_unsigned()) lora::detail::fail("{}: shape entries must be integers, got {}", where, d.dump());
        const auto v = d.get<std::uint64_t>();
        if (v > limit || (v > 0 && numel > limit / v))
          lora::detail::fail("{}: shape {} is too large", where, value["shape"].dump());
        numel *= v;
        t.shape.push_back(static_cast<std::int64_t>(v));
      }
      const auto& off = value["data_offsets"];
      const std::uint64_t b = offset(off[0], where), e = offset(off[1], where);
      if (e < b) lora::detail::fail("{}: data_offsets [{}, {}] are reversed", where, b, e);
      if (e > data_size)
        lora::detail::fail("{}: data_offsets [{}, {}] run past the end of the data section ({} bytes)", where, b, e,
                     data_size);
      const std::uint64_t want = numel * dtype_size(t.type);
      if (e - b != want)
        lora::detail::fail("{}: shape {} of {} needs {} bytes, but data_offsets [{}, {}] span {}", where,
                     fmt::format("[{}]", fmt::join(t.shape, ", ")), dtype_name(t.type), want, b, e, e - b);
      t.bytes = std::span<const std::byte>(data + b, static_cast<std::size_t>(e - b));
      tensors_.push_back(std::move(t));
    }
    // In file order, the tensors must tile the data section exactly, as the safetensors
    // library requires: no overlap, no hole between two tensors, nothing after the last.
    std::vector<std::size_t> idx(tensors_.size());
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) {
      const auto& x = tensors_[a].bytes;
      const auto& y = tensors_[b].bytes;
      return x.data() != y.data() ? x.data() < y.data() : x.size() < y.size();
    });
    const std::byte* expect = data;
    const TensorView* prev = nullptr;
    for (auto i : idx) {
      const auto& cur = tensors_[i];
      if (cur.bytes.data() < expect)
        lora::detail::fail("{}: tensors '{}' and '{}' overlap in the data section", file, prev->name, cur.name);
      if (cur.bytes.data() > expect)
        lora::detail::fail("{}: {} unused bytes in the data section before tensor '{}' (at offset {}); tensors must "
                           "cover the data section exactly",
                           file, cur.bytes.data() - expect, cur.name, expect - data);
      expect = cur.bytes.data() + cur.bytes.size();
      prev = &cur;
    }
    if (expect != data + data_size)
      lora::detail::fail("{}: {} bytes after the end of the last tensor{}; tensors must cover the data section exactly",
                         file, (data + data_size) - expect, prev ? fmt::format(" ('{}')", prev->name) : std::string());
    std::vector<TensorView> sorted;
    sorted.reserve(tensors_.size());
    for (auto i : idx) sorted.push_back(std::move(tensors_[i]));
    tensors_ = std::move(sorted);
    order_.reserve(tensors_.size());
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      index_.emplace(tensors_[i].name, i);
      order_.push_back(tensors_[i].name);
    }
  }

  std::shared_ptr<detail::MappedFile> map_;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::size_t> index_;
  std::vector<std::string> order_;
};

}  // namespace lora::io

// ---- writing ---------------------------------------------------------------
#include <lora/io/atomic.hpp>

namespace lora::io {

/// A tensor to write: name, dtype, shape and its raw little-endian bytes.
struct TensorData {
  std::string name;
  dtype type = dtype::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;

  /// Converts a row-major matrix (or any contiguous float/double array) to `type`.
  template <class S>
  static TensorData from_values(std::string name, const S* values, std::vector<std::int64_t> shape, dtype type) {
    TensorData t;
    t.name = std::move(name);
    t.type = type;
    t.shape = std::move(shape);
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    t.bytes.resize(static_cast<std::size_t>(n) * dtype_size(type));
    std::byte* out = t.bytes.data();
    auto store = [&](std::int64_t i, auto v) { std::memcpy(out + i * sizeof v, &v, sizeof v); };
    for (std::int64_t i = 0; i < n; ++i) {
      const S v = values[i];
      switch (type) {
        case dtype::F64: store(i, static_cast<double>(v)); break;
        case dtype::F32: store(i, static_cast<float>(v)); break;
        case dtype::F16: store(i, float_to_f16(static_cast<float>(v))); break;
        case dtype::BF16: store(i, float_to_bf16(static_cast<float>(v))); break;
        case dtype::I64: store(i, static_cast<std::int64_t>(v)); break;
        case dtype::I32: store(i, static_cast<std::int32_t>(v)); break;
        case dtype::I16: store(i, static_cast<std::int16_t>(v)); break;
        case dtype::I8: store(i, static_cast<std::int8_t>(v)); break;
        case dtype::U8: store(i, static_cast<std::uint8_t>(v)); break;
        case dtype::BOOL: store(i, static_cast<std::uint8_t>(v != S{})); break;
        case dtype::U16: store(i, static_cast<std::uint16_t>(v)); break;
        case dtype::U32: store(i, static_cast<std::uint32_t>(v)); break;
        case dtype::U64: store(i, static_cast<std::uint64_t>(v)); break;
        case dtype::F8_E4M3:
        case dtype::F8_E5M2:
          lora::detail::fail("tensor '{}': converting values to {} is not supported", t.name, dtype_name(type));
      }
    }
    return t;
  }
  template <class Derived>
  static TensorData from_matrix(std::string name, const Eigen::MatrixBase<Derived>& m, dtype type,
                                bool as_vector = false) {
    using S = typename Derived::Scalar;
    const Matrix<S> rm = m;  // row-major copy
    std::vector<std::int64_t> shape = as_vector ? std::vector<std::int64_t>{rm.size()}
                                                : std::vector<std::int64_t>{rm.rows(), rm.cols()};
    return from_values(std::move(name), rm.data(), std::move(shape), type);
  }
  /// Copies a view as it is (same dtype and bytes), optionally renamed.
  static TensorData copy_of(const TensorView& v, std::string name = {}) {
    TensorData t;
    t.name = name.empty() ? v.name : std::move(name);
    t.type = v.type;
    t.shape = v.shape;
    t.bytes.assign(v.bytes.begin(), v.bytes.end());
    return t;
  }
};

namespace detail {

/// The 8-byte length + JSON header of a safetensors file holding `tensors` in order (each
/// with name, type and shape; bytes_of(t) gives its byte count, after any check of its
/// own), padded with spaces so that the data starts 8-byte aligned.
template <class Tensors, class BytesOf>
std::string safetensors_header(const Tensors& tensors, const std::map<std::string, std::string>& metadata,
                               BytesOf&& bytes_of) {
  // Written by hand, not through ordered_json, whose per-key lookups are linear (200,000
  // tensors took minutes); the text is what ordered_json::dump() gave.
  std::string header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + nlohmann::json(metadata).dump();
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") lora::detail::fail("tensor name '__metadata__' is reserved");
    if (!names.insert(t.name).second) lora::detail::fail("duplicate tensor name '{}'", t.name);
    for (auto d : t.shape)
      if (d < 0) lora::detail::fail("tensor '{}': negative dimension {}", t.name, d);
    const std::uint64_t nb = bytes_of(t);
    if (header.size() > 1) header += ',';
    header += nlohmann::json(t.name).dump();
    header += fmt::format(":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", dtype_name(t.type),
                          fmt::join(t.shape, ","), offset, offset + nb);
    offset += nb;
  }
  header += '}';
  std::string h = std::move(header);
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  const std::uint64_t hn = h.size();
  std::string out(reinterpret_cast<const char*>(&hn), 8);
  out += h;
  return out;
}

}  // namespace detail

/// Serialises tensors (in the given order, 8-byte aligned header) into the
/// safetensors byte layout.
inline std::string serialize_safetensors(const std::vector<TensorData>& tensors,
                                         const std::map<std::string, std::string>& metadata = {}) {
  std::uint64_t data = 0;
  std::string out = detail::safetensors_header(tensors, metadata, [&](const TensorData& t) {
    std::uint64_t n = 1;
    for (auto d : t.shape) n *= static_cast<std::uint64_t>(d);
    if (n * dtype_size(t.type) != t.bytes.size())
      lora::detail::fail("tensor '{}': {} bytes given, shape and dtype {} need {}", t.name, t.bytes.size(),
                         dtype_name(t.type), n * dtype_size(t.type));
    data += t.bytes.size();
    return static_cast<std::uint64_t>(t.bytes.size());
  });
  out.reserve(out.size() + data);
  for (const auto& t : tensors) out.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  return out;
}

/// Writes a safetensors file atomically (temporary file + rename).
///
///   lora::io::write_safetensors("out.safetensors",
///       {lora::io::TensorData::from_matrix("w", W, lora::io::dtype::BF16)}, {{"format", "pt"}});
inline void write_safetensors(const std::filesystem::path& path, const std::vector<TensorData>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  const std::string bytes = serialize_safetensors(tensors, metadata);
  write_file_atomically(path, [&](const std::filesystem::path& tmp) { write_bytes(tmp, bytes); });
}

}  // namespace lora::io
