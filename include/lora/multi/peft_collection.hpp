#pragma once
// Many PEFT adapters for one base model, as one AdapterSet per adapted module
// with one numbering of adapters across all modules: what an inference engine
// serving many fine-tunes needs.
//
//   lora::multi::AdapterCollection c;
//   int math = c.load("math", "adapters/math");       // a PEFT adapter folder
//   int code = c.load("code", "adapters/code");
//   auto ids = std::vector<int>{math, code, -1, math}; // one per token
//   const std::string q = "model.layers.0.self_attn.q_proj";
//   auto Y = lora::multi::batched_apply(c.layer(q), W_q, X, c.layer_ids(q, ids));
//   c.unload("code");                                   // the others stay in place

#include <lora/io/peft.hpp>
#include <lora/multi/adapter_set.hpp>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace lora::multi {

class AdapterCollection {
 public:
  /// Loads a PEFT adapter folder under `name`; returns its id (the same in every module).
  /// DoRA and fan_in_fan_out adapters are rejected (their output is not a sum of low-rank paths
  /// over an [out × in] weight). An adapter may target a subset of the modules.
  int load(const std::string& name, const std::filesystem::path& folder) {
    return add(name, io::load_peft_adapter(folder), folder.string());
  }

  /// Adds an already loaded adapter.
  int add(const std::string& name, const io::PeftAdapter& ad, const std::string& where = "adapter") {
    if (name.empty()) lora::detail::fail("{}: adapter name must not be empty", where);
    if (id_of(name) >= 0) lora::detail::fail("{}: an adapter named '{}' is already loaded", where, name);
    io::require_modules_only(ad, fmt::format("{}: mixed batches ('{}')", where, name));
    if (ad.config.use_dora)
      lora::detail::fail("{}: '{}' is a DoRA adapter; mixed batches support plain LoRA and rsLoRA adapters", where, name);
    if (ad.config.fan_in_fan_out)
      lora::detail::fail("{}: '{}' uses fan_in_fan_out; mixed batches expect base weights stored as [out x in]", where, name);
    // validate against existing layers before touching anything
    for (const auto& m : ad.modules) {
      auto it = layers_.find(m.name);
      if (it != layers_.end() && (it->second.in_features() != m.adapter.in_features() ||
                                  it->second.out_features() != m.adapter.out_features()))
        lora::detail::fail("{}: module '{}' of '{}' is [{} -> {}], but the loaded adapters have it as [{} -> {}]", where,
                     m.name, name, m.adapter.in_features(), m.adapter.out_features(), it->second.in_features(),
                     it->second.out_features());
    }
    int id = 0;
    while (id < static_cast<int>(names_.size()) && !names_[static_cast<std::size_t>(id)].empty()) ++id;
    for (const auto& m : ad.modules) {
      auto it = layers_.try_emplace(m.name, m.adapter.in_features(), m.adapter.out_features()).first;
      it->second.insert(id, name, m.adapter.A(), m.adapter.B(), m.adapter.scaling());
    }
    if (id == static_cast<int>(names_.size())) names_.emplace_back();
    names_[static_cast<std::size_t>(id)] = name;
    return id;
  }

  /// Unloads an adapter from every module; the other adapters keep their ids and storage.
  void unload(const std::string& name) {
    const int id = id_of(name);
    if (id < 0) lora::detail::fail("no adapter named '{}' is loaded", name);
    for (auto it = layers_.begin(); it != layers_.end();) {
      if (it->second.contains(id)) it->second.remove(id);
      it = it->second.size() == 0 ? layers_.erase(it) : std::next(it);
    }
    names_[static_cast<std::size_t>(id)].clear();
  }

  /// The id of `name`, or −1.
  int id_of(const std::string& name) const {
    for (std::size_t i = 0; i < names_.size(); ++i)
      if (names_[i] == name) return static_cast<int>(i);
    return -1;
  }
  /// Loaded adapter names by id (empty strings for free ids).
  const std::vector<std::string>& names() const { return names_; }

  bool has_layer(const std::string& module) const { return layers_.count(module) != 0; }
  /// The set of adapters on `module`.
  const AdapterSet<float>& layer(const std::string& module) const {
    auto it = layers_.find(module);
    if (it == layers_.end()) lora::detail::fail("no loaded adapter targets module '{}'", module);
    return it->second;
  }
  const std::map<std::string, AdapterSet<float>>& layers() const { return layers_; }

  /// Per-token ids for `module`: ids of adapters that do not target this module become −1
  /// (those tokens get the base layer only, as PEFT does).
  std::vector<int> layer_ids(const std::string& module, std::span<const int> ids) const {
    const auto& set = layer(module);
    std::vector<int> out(ids.begin(), ids.end());
    for (auto& id : out) {
      if (id < -1 || id >= static_cast<int>(names_.size()) || (id >= 0 && names_[static_cast<std::size_t>(id)].empty()))
        lora::detail::fail("adapter id {} is not loaded", id);
      if (id >= 0 && !set.contains(id)) id = -1;
    }
    return out;
  }

 private:
  std::map<std::string, AdapterSet<float>> layers_;
  std::vector<std::string> names_;
};

}  // namespace lora::multi
