#pragma once
// Facts about a fixture read from its own files (layer counts, key counts, JSON fields, sizes),
// so that the tests hold on held-out fixtures of the same kinds but other shapes: an expected
// count or dimension comes from the fixture, never from a constant that fits one fixture only.

#include <lora/error.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <string_view>

#include "support/files.hpp"

namespace lora::test {

/// A fixture's JSON file (config.json, meta.json, adapter_config.json, trace.json).
inline nlohmann::json json_of(const std::filesystem::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

/// Number of decoder layers a safetensors file holds tensors of: the distinct <i> of its
/// `layers.<i>.` keys (base checkpoints and adapter files alike; 0 when there is none).
inline int layer_count(const io::SafetensorsFile& f) {
  std::set<std::string> seen;
  for (const auto& k : f.names()) {
    const auto at = k.find("layers.");
    if (at == std::string::npos) continue;
    const auto b = at + 7;
    auto e = b;
    while (e < k.size() && std::isdigit(static_cast<unsigned char>(k[e]))) ++e;
    if (e > b && e < k.size() && k[e] == '.') seen.insert(k.substr(b, e - b));
  }
  return static_cast<int>(seen.size());
}

/// layer_count of a file, refused when 0: an expectation derived from it must never be trivial.
inline int layers_of(const std::filesystem::path& file) {
  const int n = layer_count(io::SafetensorsFile::open(file));
  if (n <= 0) lora::fail("{}: no layers.<i>. tensors", file.string());
  return n;
}

/// A positive integer field of a JSON file (config.json's num_hidden_layers, hidden_size, ...).
inline int json_int(const std::filesystem::path& file, const std::string& key) {
  const auto j = json_of(file);
  if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<long long>() <= 0)
    lora::fail("{}: no positive integer '{}'", file.string(), key);
  return j[key].get<int>();
}

/// Number of tensors of `f` whose name ends with `suffix`.
inline int count_ending(const io::SafetensorsFile& f, std::string_view suffix) {
  return static_cast<int>(std::count_if(f.names().begin(), f.names().end(),
                                        [&](const std::string& k) { return k.ends_with(suffix); }));
}

/// Modules a PEFT adapter folder adapts when each of its target_modules is a projection that
/// every layer of the base has once (q_proj, down_proj, ...): targets × layers of the base file.
inline int per_layer_modules(const std::filesystem::path& adapter, const std::filesystem::path& base_file) {
  const auto targets = json_of(adapter / "adapter_config.json")["target_modules"];
  if (!targets.is_array() || targets.empty()) lora::fail("{}: no target_modules list", adapter.string());
  return static_cast<int>(targets.size()) * layers_of(base_file);
}

/// per_layer_modules of the PEFT fixture tests/data/peft/<c>: `adapter` against base/model.safetensors.
inline int peft_case_modules(const std::string& c, const std::string& adapter = "adapter") {
  return per_layer_modules(peft(c, adapter), peft(c, "base/model.safetensors"));
}

/// A shard size that splits `f` into at least `n` shards whatever its shape (1/n of its tensor
/// bytes), and never less than its largest tensor (so that every shard respects the limit).
inline std::uint64_t shard_bytes_for(const io::SafetensorsFile& f, std::uint64_t n) {
  std::uint64_t total = 0, largest = 0;
  for (const auto& t : f.tensors()) {
    total += t.bytes.size();
    largest = std::max<std::uint64_t>(largest, t.bytes.size());
  }
  return std::max(largest, total / n);
}

}  // namespace lora::test
