#pragma once
// Helpers the io tests share: checkpoint copies, byte comparisons, JSON files, folder copies.

#include <lora/io/checkpoint.hpp>
#include <lora/io/merge.hpp>  // detail::convert_floats

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

namespace lora::test {

/// The specs of a file's tensors, float ones retyped to `as` when given.
inline std::vector<io::TensorSpec> specs_of(const io::SafetensorsFile& f, std::optional<io::dtype> as = std::nullopt) {
  std::vector<io::TensorSpec> s;
  for (const auto& t : f.tensors()) s.push_back({t.name, as && io::is_float(t.type) ? *as : t.type, t.shape});
  return s;
}

/// Copies a single-file checkpoint into `out`, as shards of at most `max_bytes`, optionally converted.
inline void reshard(const std::filesystem::path& src, const std::filesystem::path& out, std::uint64_t max_bytes,
                    std::optional<io::dtype> as = {}) {
  const auto f = io::SafetensorsFile::open(src);
  auto layout = io::CheckpointLayout::split(specs_of(f, as), max_bytes);
  io::write_checkpoint(out, layout, [&](const io::TensorSpec& s) {
    const auto& v = f.tensor(s.name);
    if (s.type == v.type) return io::TensorBytes::borrow(v.bytes);
    return io::TensorBytes::own(io::detail::convert_floats(v, s.type));
  });
}

/// Same dtype, shape and bytes.
inline bool same_bytes(const io::TensorView& a, const io::TensorView& b) {
  return a.type == b.type && a.shape == b.shape && std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end());
}

/// A whole file's bytes.
inline std::string file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline nlohmann::ordered_json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  return nlohmann::ordered_json::parse(in);
}
inline void write_json(const std::filesystem::path& p, const nlohmann::ordered_json& j) {
  std::ofstream out(p);
  out << j.dump(2);
}

/// Copies a folder's files (fixtures may be read-only: the copies are made writable).
inline void copy_folder(const std::filesystem::path& from, const std::filesystem::path& to) {
  namespace fs = std::filesystem;
  fs::create_directories(to);
  for (auto& e : fs::directory_iterator(from)) fs::copy_file(e.path(), to / e.path().filename());
  for (auto& e : fs::directory_iterator(to)) fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
}

/// A copy of the checkpoint folder `ok` at `to` with its index replaced by `index` after
/// edit(index, to) (edit may change the copied files too): the malformed-index tests' variants.
template <class Edit>
std::filesystem::path edited_copy(const std::filesystem::path& ok, const std::filesystem::path& to,
                                  nlohmann::ordered_json index, Edit edit) {
  copy_folder(ok, to);
  edit(index, to);
  std::filesystem::remove(to / io::checkpoint_index_name);
  std::ofstream(to / io::checkpoint_index_name) << index.dump();
  return to;
}

}  // namespace lora::test
