#pragma once
// PEFT adapter folders in and out: `adapter_config.json` + `adapter_model.safetensors`,
// as PEFT's `save_pretrained` writes them and `PeftModel.from_pretrained` reads them.
//
//   auto ad = lora::io::load_peft_adapter("my-adapter/");
//   const auto& q = ad.at("model.layers.0.self_attn.q_proj");   // module path, no "base_model.model."
//   auto y = q.adapter.apply(W, X);                               // X·Wᵀ + s·(X·Aᵀ)·Bᵀ (plain LoRA)
//   if (q.magnitude) { /* DoRA: see lora/dora/dora.hpp */ }
//   lora::io::save_peft_adapter("copy/", ad, lora::io::dtype::BF16);
//
// API (host only):
//   struct PeftConfig       r, lora_alpha, use_rslora, use_dora, fan_in_fan_out, target_modules
//                           (list, or a regex string in target_modules_regex), rank_pattern and
//                           alpha_pattern (ordered like the JSON: PEFT takes the first key that matches),
//                           raw (the whole JSON); rank_for / alpha_for / scaling_for / targets(module);
//                           from_json(json, where), to_json().
//   PeftConfig load_peft_config(path to adapter_config.json or to the folder)
//   struct PeftModule       name, adapter (LowRankAdapter<float, cpu, dynamic_scaling>),
//                           magnitude (DoRA's m [out], std::nullopt for LoRA), stored_dtype, is_dora().
//   struct PeftAdapter      config, modules (sorted by name); at(name), find(name), contains(name).
//   PeftAdapter load_peft_adapter(folder)
//   void check_peft_adapter(folder)          the same checks, nothing converted
//   peft_module_tensors(file, config)         lora_A / lora_B / magnitude views per module, checked
//   void save_peft_adapter(folder, adapter, dtype = F32)   atomic (temporary folder + rename)
//
// Tensor keys in adapter_model.safetensors: `base_model.model.<module>.lora_A.weight` [r × in],
// `...lora_B.weight` [out × r], DoRA's `...lora_magnitude_vector` [out]. The adapter's scaling
// is s = alpha/r (alpha/√r with use_rslora), with r and alpha per module from the patterns.
// Every inconsistency (missing file or tensor, r disagreeing with the tensors, shapes, dtypes,
// bad config values) throws lora::error naming the file and the tensor or key.

#include <lora/core/adapter.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lora::io {

/// The LoRA fields of a PEFT `adapter_config.json`.
struct PeftConfig {
  int r = 8;                  ///< default rank
  double lora_alpha = 8.0;    ///< default alpha (PEFT's default is 8)
  bool use_rslora = false;    ///< s = alpha/√r instead of alpha/r
  bool use_dora = false;      ///< weight-decomposed LoRA: a magnitude vector per module
  bool fan_in_fan_out = false;  ///< base weights stored [in × out] (GPT-2 Conv1D)
  /// target_modules as a list of names (a module matches if its path equals one or ends
  /// with "." + it); empty when the config gives a regex string instead.
  std::vector<std::string> target_modules;
  /// target_modules given as a regex string (matched against the whole module path).
  std::optional<std::string> target_modules_regex;
  /// Per-module rank and alpha overrides, in the order of the JSON object.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  /// The whole JSON as read (unknown fields are kept and written back by save).
  nlohmann::ordered_json raw = nlohmann::ordered_json::object();

  /// The rank of `module` (a path like "model.layers.0.self_attn.q_proj"): the first
  /// rank_pattern key k for which the path matches the regex `(.*\.)?(k)` in full, else r
  /// (PEFT's get_pattern_key).
  int rank_for(std::string_view module) const {
    for (const auto& [k, v] : rank_pattern)
      if (pattern_matches(k, module)) return v;
    return r;
  }
  /// The alpha of `module`, by the same rule over alpha_pattern.
  double alpha_for(std::string_view module) const {
    for (const auto& [k, v] : alpha_pattern)
      if (pattern_matches(k, module)) return v;
    return lora_alpha;
  }
  /// s = alpha_for(m) / rank_for(m), or alpha/√r with use_rslora.
  double scaling_for(std::string_view module) const {
    return dynamic_scaling{use_rslora}.factor(alpha_for(module), rank_for(module));
  }
  /// Whether PEFT would put an adapter on `module`: a regex string must match the whole
  /// path; a list entry t matches if the path is t or ends with "." + t; "all-linear"
  /// matches every module (the layer type is not known here).
  bool targets(std::string_view module) const {
    if (target_modules_regex) return regex_full(*target_modules_regex, module, "target_modules");
    for (const auto& t : target_modules) {
      if (t == "all-linear" || module == t) return true;
      if (module.size() > t.size() && module.substr(module.size() - t.size()) == t &&
          module[module.size() - t.size() - 1] == '.')
        return true;
    }
    return false;
  }

  /// Reads the fields from a parsed adapter_config.json; `where` names the file in messages.
  static PeftConfig from_json(const nlohmann::ordered_json& j, const std::string& where);
  /// The config as JSON that PEFT 0.21 accepts: `raw` (or a default LoRA config) with
  /// this struct's fields written over it.
  nlohmann::ordered_json to_json() const;

 private:
  static bool regex_full(const std::string& pattern, std::string_view s, const char* field) {
    // libstdc++'s regex compiler accumulates back-reference numbers and {m,n} counts in a
    // signed int without an overflow check (undefined behaviour, found by fuzzing): refuse
    // such numbers beyond 5 digits before they reach it.
    for (std::size_t i = 0, run = 0; i < pattern.size(); ++i) {
      run = (pattern[i] >= '0' && pattern[i] <= '9') ? run + 1 : 0;
      if (run == 6 && i >= 6 && (pattern[i - 6] == '\\' || pattern[i - 6] == '{' || pattern[i - 6] == ','))
        lora::detail::fail("adapter_config.json: {} pattern '{}' has a repetition count or back-reference with "
                           "more than 5 digits", field, pattern);
    }
    try {
      return std::regex_match(s.begin(), s.end(), std::regex(pattern, std::regex::ECMAScript));
    } catch (const std::regex_error& e) {
      lora::detail::fail("adapter_config.json: {} pattern '{}' is not a valid regular expression: {}", field, pattern,
                         e.what());
    }
  }
  static bool pattern_matches(const std::string& key, std::string_view module) {
    return regex_full("(.*\\.)?(" + key + ")", module, "rank_pattern/alpha_pattern");
  }
};

/// One adapted module of a PEFT adapter.
struct PeftModule {
  std::string name;  ///< module path without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"
  LowRankAdapter<float, cpu, dynamic_scaling> adapter;  ///< A [r × in], B [out × r], alpha, rsLoRA, fan_in_fan_out
  std::optional<Vector<float>> magnitude;               ///< DoRA's m [out]; nullopt for plain LoRA
  dtype stored_dtype = dtype::F32;                      ///< dtype of lora_A in the file

  bool is_dora() const { return magnitude.has_value(); }
};

/// A loaded adapter folder: its config and its modules, sorted by name.
struct PeftAdapter {
  PeftConfig config;
  std::vector<PeftModule> modules;

  /// The module with this path, or nullptr.
  const PeftModule* find(std::string_view name) const {
    auto it = std::lower_bound(modules.begin(), modules.end(), name,
                               [](const PeftModule& m, std::string_view n) { return m.name < n; });
    return it != modules.end() && it->name == name ? &*it : nullptr;
  }
  bool contains(std::string_view name) const { return find(name) != nullptr; }
  /// The module with this path; throws lora::error if there is none.
  const PeftModule& at(std::string_view name) const {
    if (auto* m = find(name)) return *m;
    lora::detail::fail("PEFT adapter has no module '{}' ({} modules{}{})", name, modules.size(),
                       modules.empty() ? "" : ", e.g. ", modules.empty() ? "" : modules.front().name);
  }
};

namespace detail {

inline const std::string& peft_prefix() {
  static const std::string p = "base_model.model.";
  return p;
}

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

inline nlohmann::ordered_json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) lora::detail::fail("{}: cannot open for reading", path.string());
  try {
    return nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    lora::detail::fail("{}: not valid JSON: {}", path.string(), e.what());
  }
}

inline bool json_bool(const nlohmann::ordered_json& j, const char* key, bool fallback, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) lora::detail::fail("{}: '{}' must be true or false, got {}", where, key, j[key].dump());
  return j[key].get<bool>();
}

inline int json_rank(const nlohmann::json& v, const std::string& where, const std::string& what) {
  if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
    lora::detail::fail("{}: {} must be a positive integer, got {}", where, what, v.dump());
  const double d = v.get<double>();
  if (d < 1 || d > 1e9) lora::detail::fail("{}: {} must be a positive integer, got {}", where, what, v.dump());
  return static_cast<int>(d);
}

inline double json_alpha(const nlohmann::json& v, const std::string& where, const std::string& what) {
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    lora::detail::fail("{}: {} must be a finite number, got {}", where, what, v.dump());
  return v.get<double>();
}

/// A default LoRA adapter_config.json as PEFT 0.21 writes it.
inline nlohmann::ordered_json default_peft_config() {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  j["alpha_pattern"] = nlohmann::ordered_json::object();
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = nullptr;
  j["bias"] = "none";
  j["exclude_modules"] = nullptr;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["layer_replication"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["loftq_config"] = nlohmann::ordered_json::object();
  j["lora_alpha"] = 8;
  j["lora_bias"] = false;
  j["lora_dropout"] = 0.0;
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = 8;
  j["rank_pattern"] = nlohmann::ordered_json::object();
  j["revision"] = nullptr;
  j["target_modules"] = nlohmann::ordered_json::array();
  j["task_type"] = nullptr;
  j["use_dora"] = false;
  j["use_rslora"] = false;
  return j;
}

/// alpha as JSON: an integer when it is one (PEFT writes ints for int alphas).
inline nlohmann::ordered_json alpha_json(double a) {
  if (std::floor(a) == a && std::fabs(a) < 1e15) return static_cast<std::int64_t>(a);
  return a;
}

}  // namespace detail

inline PeftConfig PeftConfig::from_json(const nlohmann::ordered_json& j, const std::string& where) {
  if (!j.is_object()) lora::detail::fail("{}: expected a JSON object", where);
  PeftConfig c;
  c.raw = j;
  if (j.contains("peft_type") && !j["peft_type"].is_null()) {
    if (!j["peft_type"].is_string() || j["peft_type"].get<std::string>() != "LORA")
      lora::detail::fail("{}: peft_type is {}, expected \"LORA\"", where, j["peft_type"].dump());
  }
  if (!j.contains("r") || j["r"].is_null()) lora::detail::fail("{}: missing 'r' (the LoRA rank)", where);
  c.r = detail::json_rank(j["r"], where, "'r'");
  if (j.contains("lora_alpha") && !j["lora_alpha"].is_null())
    c.lora_alpha = detail::json_alpha(j["lora_alpha"], where, "'lora_alpha'");
  c.use_rslora = detail::json_bool(j, "use_rslora", false, where);
  c.use_dora = detail::json_bool(j, "use_dora", false, where);
  c.fan_in_fan_out = detail::json_bool(j, "fan_in_fan_out", false, where);
  if (j.contains("target_modules") && !j["target_modules"].is_null()) {
    const auto& t = j["target_modules"];
    if (t.is_string()) {
      c.target_modules_regex = t.get<std::string>();
    } else if (t.is_array()) {
      for (const auto& e : t) {
        if (!e.is_string()) lora::detail::fail("{}: target_modules entries must be strings, got {}", where, e.dump());
        c.target_modules.push_back(e.get<std::string>());
      }
    } else {
      lora::detail::fail("{}: target_modules must be a list of names or a regex string, got {}", where, t.dump());
    }
  }
  auto read_pattern = [&](const char* field, auto& out, auto convert) {
    if (!j.contains(field) || j[field].is_null()) return;
    if (!j[field].is_object()) lora::detail::fail("{}: '{}' must be an object, got {}", where, field, j[field].dump());
    for (const auto& [k, v] : j[field].items()) {
      const std::string what = fmt::format("{}['{}']", field, k);
      out.emplace_back(k, convert(v, where, what));
    }
  };
  read_pattern("rank_pattern", c.rank_pattern, [](const nlohmann::json& v, const std::string& w, const std::string& what) {
    return detail::json_rank(v, w, what);
  });
  read_pattern("alpha_pattern", c.alpha_pattern,
               [](const nlohmann::json& v, const std::string& w, const std::string& what) {
                 return detail::json_alpha(v, w, what);
               });
  return c;
}

inline nlohmann::ordered_json PeftConfig::to_json() const {
  nlohmann::ordered_json j = raw.is_object() && !raw.empty() ? raw : detail::default_peft_config();
  j["peft_type"] = "LORA";
  j["r"] = r;
  j["lora_alpha"] = detail::alpha_json(lora_alpha);
  j["use_rslora"] = use_rslora;
  j["use_dora"] = use_dora;
  j["fan_in_fan_out"] = fan_in_fan_out;
  if (target_modules_regex)
    j["target_modules"] = *target_modules_regex;
  else
    j["target_modules"] = target_modules;
  nlohmann::ordered_json rp = nlohmann::ordered_json::object(), ap = nlohmann::ordered_json::object();
  for (const auto& [k, v] : rank_pattern) rp[k] = v;
  for (const auto& [k, v] : alpha_pattern) ap[k] = detail::alpha_json(v);
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;
  return j;
}

/// Reads `adapter_config.json` (pass the file or the adapter folder).
inline PeftConfig load_peft_config(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  const fs::path file = fs::is_directory(path) ? path / "adapter_config.json" : path;
  if (!fs::exists(file)) lora::detail::fail("{}: missing (a PEFT adapter folder needs adapter_config.json)", file.string());
  return PeftConfig::from_json(detail::read_json_file(file), file.string());
}

/// The tensors of one module of an adapter_model.safetensors, as views into the mapped file.
struct PeftModuleTensors {
  std::string name;                       ///< module path without "base_model.model."
  const TensorView* A = nullptr;          ///< lora_A.weight [r × in]
  const TensorView* B = nullptr;          ///< lora_B.weight [out × r]
  const TensorView* magnitude = nullptr;  ///< DoRA's lora_magnitude_vector [out]; null for plain LoRA
};

/// Pairs the tensors of a PEFT adapter_model.safetensors by module and checks them against
/// the config without converting any: every key is a LoRA tensor; lora_A and lora_B are
/// float matrices whose r is the config's; a magnitude [out] is there exactly when use_dora
/// is true. (PEFT itself would only warn about missing magnitudes and keep ‖W‖'s row norms,
/// and silently drop magnitudes it does not expect; both change the model, so both are errors.)
/// Sorted by module name.
inline std::vector<PeftModuleTensors> peft_module_tensors(const SafetensorsFile& f, const PeftConfig& cfg) {
  const std::string& file = f.path();
  std::map<std::string, PeftModuleTensors> parts;
  for (const auto& t : f.tensors()) {
    std::string_view key = t.name;
    if (key.substr(0, detail::peft_prefix().size()) == detail::peft_prefix()) key.remove_prefix(detail::peft_prefix().size());
    auto take = [&](std::string_view suffix) -> std::optional<std::string> {
      if (!detail::ends_with(key, suffix) || key.size() == suffix.size()) return std::nullopt;
      return std::string(key.substr(0, key.size() - suffix.size()));
    };
    if (auto m = take(".lora_A.weight")) {
      parts[*m].A = &t;
    } else if (auto m = take(".lora_B.weight")) {
      parts[*m].B = &t;
    } else if (auto m = take(".lora_magnitude_vector")) {
      parts[*m].magnitude = &t;
    } else if (auto m = take(".lora_magnitude_vector.weight")) {
      parts[*m].magnitude = &t;
    } else if (key.find("lora_embedding_") != std::string_view::npos) {
      lora::detail::fail("{}: tensor '{}': adapters on embedding layers are not supported", file, t.name);
    } else if (detail::ends_with(key, ".lora_B.bias")) {
      lora::detail::fail("{}: tensor '{}': lora_bias (a bias on lora_B) is not supported", file, t.name);
    } else {
      lora::detail::fail("{}: tensor '{}' is not a LoRA tensor (expected <module>.lora_A.weight, .lora_B.weight "
                         "or .lora_magnitude_vector)",
                         file, t.name);
    }
  }
  if (parts.empty()) lora::detail::fail("{}: holds no LoRA tensors", file);

  auto check_float = [&](const TensorView& t) {
    if (t.type != dtype::F32 && t.type != dtype::F16 && t.type != dtype::BF16 && t.type != dtype::F64)
      lora::detail::fail("{}: tensor '{}' has dtype {}, expected a float type (F32, F16, BF16 or F64)", file, t.name,
                         dtype_name(t.type));
  };
  std::vector<PeftModuleTensors> out;
  for (auto& part : parts) {
    const std::string& name = part.first;
    PeftModuleTensors& p = part.second;
    p.name = name;
    if (!p.A)
      lora::detail::fail("{}: module '{}' has {} but no lora_A.weight", file, name,
                         p.B ? "lora_B.weight" : "lora_magnitude_vector");
    if (!p.B) lora::detail::fail("{}: tensor '{}' has no matching lora_B.weight", file, p.A->name);
    check_float(*p.A);
    check_float(*p.B);
    if (p.A->ndim() != 2)
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 2 ([r, in])", file, p.A->name, p.A->ndim());
    if (p.B->ndim() != 2)
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 2 ([out, r])", file, p.B->name, p.B->ndim());
    const int r = cfg.rank_for(name);
    if (p.A->shape[0] != r)
      lora::detail::fail("{}: tensor '{}' has shape [{}, {}]: rank {}, but the config gives r = {} for module '{}'",
                         file, p.A->name, p.A->shape[0], p.A->shape[1], p.A->shape[0], r, name);
    if (p.B->shape[1] != r)
      lora::detail::fail("{}: tensor '{}' has shape [{}, {}], expected [out, {}] (r = {} for module '{}')", file,
                         p.B->name, p.B->shape[0], p.B->shape[1], r, r, name);
    if (cfg.use_dora && !p.magnitude)
      lora::detail::fail("{}: module '{}' has no lora_magnitude_vector, but the config has use_dora = true", file, name);
    if (!cfg.use_dora && p.magnitude)
      lora::detail::fail("{}: tensor '{}' is a DoRA magnitude, but the config has use_dora = false", file,
                         p.magnitude->name);
    if (const TensorView* m = p.magnitude) {
      check_float(*m);
      if (m->ndim() != 1 && !(m->ndim() == 2 && m->shape[1] == 1))
        lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 1 ([out])", file, m->name, m->ndim());
      if (m->shape[0] != p.B->shape[0])
        lora::detail::fail("{}: tensor '{}' has {} elements, expected out = {} (the rows of lora_B)", file, m->name,
                           m->shape[0], p.B->shape[0]);
    }
    out.push_back(p);
  }
  return out;
}

namespace detail {
// The config and the mapped weights of an adapter folder, with the messages for what is missing.
inline std::pair<PeftConfig, SafetensorsFile> open_peft_folder(const std::filesystem::path& folder) {
  namespace fs = std::filesystem;
  if (!fs::exists(folder)) lora::detail::fail("{}: adapter folder does not exist", folder.string());
  if (!fs::is_directory(folder))
    lora::detail::fail("{}: is not a folder (expected a PEFT adapter folder with adapter_config.json)", folder.string());
  PeftConfig cfg = load_peft_config(folder);
  const fs::path wfile = folder / "adapter_model.safetensors";
  if (!fs::exists(wfile)) {
    if (fs::exists(folder / "adapter_model.bin"))
      lora::detail::fail("{}: missing; only adapter_model.bin (pickle) is there, which is not supported: "
                         "re-save the adapter with safe_serialization=True",
                         wfile.string());
    lora::detail::fail("{}: missing (a PEFT adapter folder needs adapter_model.safetensors)", wfile.string());
  }
  return {std::move(cfg), SafetensorsFile::open(wfile)};
}
}  // namespace detail

/// Checks a PEFT adapter folder as load_peft_adapter does (config, tensor names, dtypes,
/// shapes, r, DoRA magnitudes against use_dora) without converting the tensors.
inline void check_peft_adapter(const std::filesystem::path& folder) {
  const auto opened = detail::open_peft_folder(folder);
  peft_module_tensors(opened.second, opened.first);
}

/// Loads a PEFT LoRA/rsLoRA/DoRA adapter folder. Tensors of any float dtype (F64, F32,
/// F16, BF16) are converted to float; r and shapes are checked against the config.
inline PeftAdapter load_peft_adapter(const std::filesystem::path& folder) {
  auto opened = detail::open_peft_folder(folder);
  PeftAdapter out;
  out.config = std::move(opened.first);
  const SafetensorsFile& f = opened.second;
  const std::string file = f.path();
  const PeftConfig& cfg = out.config;
  for (const PeftModuleTensors& p : peft_module_tensors(f, cfg)) {
    AdapterOptions opts;
    opts.fan_in_fan_out = cfg.fan_in_fan_out;
    opts.name = p.name;
    auto make = [&] {
      try {
        return LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
            p.A->to_matrix<float>(), p.B->to_matrix<float>(), cfg.alpha_for(p.name), opts,
            dynamic_scaling{cfg.use_rslora});
      } catch (const lora::error& e) {
        lora::detail::fail("{}: {}", file, e.what());
      }
    };
    PeftModule mod{p.name, make(), std::nullopt, p.A->type};
    if (p.magnitude) {
      Vector<float> m(p.magnitude->shape[0]);
      p.magnitude->convert_into(m.data());
      mod.magnitude = std::move(m);
    }
    out.modules.push_back(std::move(mod));
  }
  return out;
}

/// Writes `adapter` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors
/// with tensors in `type`), atomically: the folder appears complete or not at all (an
/// existing folder is replaced). Per-module ranks and alphas that differ from what the
/// config's patterns give (and any rescale() multiplier, folded into alpha) are written as
/// exact-path rank_pattern/alpha_pattern entries, placed first so that PEFT picks them.
inline void save_peft_adapter(const std::filesystem::path& folder, const PeftAdapter& adapter,
                              dtype type = dtype::F32) {
  if (type != dtype::F32 && type != dtype::F16 && type != dtype::BF16 && type != dtype::F64)
    lora::detail::fail("{}: cannot save a PEFT adapter in dtype {}; use F32, F16, BF16 or F64", folder.string(),
                       dtype_name(type));
  if (adapter.modules.empty()) lora::detail::fail("{}: cannot save a PEFT adapter without modules", folder.string());
  PeftConfig cfg = adapter.config;
  const bool dora = adapter.modules.front().is_dora();
  cfg.use_dora = dora;
  cfg.use_rslora = adapter.modules.front().adapter.policy().rslora;
  cfg.fan_in_fan_out = adapter.modules.front().adapter.fan_in_fan_out();
  std::vector<std::pair<std::string, int>> rank_first;
  std::vector<std::pair<std::string, double>> alpha_first;
  bool all_targeted = true;
  std::set<std::string> seen;
  for (const auto& m : adapter.modules) {
    const auto& a = m.adapter;
    if (!seen.insert(m.name).second) lora::detail::fail("{}: module '{}' appears twice", folder.string(), m.name);
    if (m.is_dora() != dora)
      lora::detail::fail("{}: module '{}' {} a DoRA magnitude but module '{}' {}; PEFT needs all or none",
                         folder.string(), m.name, m.is_dora() ? "has" : "has no", adapter.modules.front().name,
                         dora ? "has" : "has none");
    if (a.policy().rslora != cfg.use_rslora)
      lora::detail::fail("{}: module '{}' uses {} scaling but module '{}' uses {}; PEFT has one use_rslora",
                         folder.string(), m.name, a.policy().rule(), adapter.modules.front().name,
                         adapter.modules.front().adapter.policy().rule());
    if (a.fan_in_fan_out() != cfg.fan_in_fan_out)
      lora::detail::fail("{}: module '{}' has fan_in_fan_out = {} unlike module '{}'", folder.string(), m.name,
                         a.fan_in_fan_out(), adapter.modules.front().name);
    if (m.magnitude && m.magnitude->size() != a.out_features())
      lora::detail::fail("{}: module '{}': magnitude has {} elements, expected out = {}", folder.string(), m.name,
                         m.magnitude->size(), a.out_features());
    const double alpha = a.alpha() * a.multiplier();
    if (cfg.rank_for(m.name) != a.rank()) rank_first.emplace_back(m.name, static_cast<int>(a.rank()));
    if (cfg.alpha_for(m.name) != alpha) alpha_first.emplace_back(m.name, alpha);
    if (!cfg.targets(m.name)) all_targeted = false;
  }
  rank_first.insert(rank_first.end(), cfg.rank_pattern.begin(), cfg.rank_pattern.end());
  alpha_first.insert(alpha_first.end(), cfg.alpha_pattern.begin(), cfg.alpha_pattern.end());
  cfg.rank_pattern = std::move(rank_first);
  cfg.alpha_pattern = std::move(alpha_first);
  if (!all_targeted) {
    // Name the modules exactly: an entry equal to the whole path matches only that module.
    cfg.target_modules_regex.reset();
    cfg.target_modules.clear();
    for (const auto& m : adapter.modules) cfg.target_modules.push_back(m.name);
  }
  for (const auto& m : adapter.modules) {  // the exact-path patterns must now give each module its own r and alpha
    if (cfg.rank_for(m.name) != m.adapter.rank() || cfg.alpha_for(m.name) != m.adapter.alpha() * m.adapter.multiplier())
      lora::detail::fail("{}: module '{}': cannot express its rank/alpha in rank_pattern/alpha_pattern", folder.string(),
                         m.name);
  }

  std::vector<TensorData> tensors;
  tensors.reserve(adapter.modules.size() * 3);
  for (const auto& m : adapter.modules) {
    const std::string key = detail::peft_prefix() + m.name;
    tensors.push_back(TensorData::from_matrix(key + ".lora_A.weight", m.adapter.A(), type));
    tensors.push_back(TensorData::from_matrix(key + ".lora_B.weight", m.adapter.B(), type));
    if (m.magnitude) {
      const Vector<float>& v = *m.magnitude;
      tensors.push_back(TensorData::from_values(key + ".lora_magnitude_vector", v.data(), {v.size()}, type));
    }
  }
  std::sort(tensors.begin(), tensors.end(), [](const TensorData& a, const TensorData& b) { return a.name < b.name; });
  const std::string config_text = cfg.to_json().dump(2) + "\n";
  const std::string weights = serialize_safetensors(tensors, {{"format", "pt"}});
  write_folder_atomically(folder, [&](const std::filesystem::path& tmp) {
    write_bytes(tmp / "adapter_config.json", config_text);
    write_bytes(tmp / "adapter_model.safetensors", weights);
  });
}

}  // namespace lora::io
