#pragma once
// PEFT adapter folders in and out: `adapter_config.json` + `adapter_model.safetensors`,
// as PEFT's `save_pretrained` writes them and `PeftModel.from_pretrained` reads them.
//
//   auto ad = lora::io::load_peft_adapter("my-adapter/");
//   const auto& q = ad.at("model.layers.0.self_attn.q_proj");   // module path, no "base_model.model."
//   auto y = q.adapter.apply(W, X);       // X·Wᵀ + s·(X·Aᵀ)·Bᵀ; DoRA's output when q.is_dora()
//   auto n = q.adapter.merge(W);          // LoRA's or DoRA's merge (n: DoRA's norms, for unmerge)
//   for (const auto& t : ad.saved) { /* modules_to_save copies: t.key replaces the base tensor */ }
//   lora::io::save_peft_adapter("copy/", ad, lora::io::dtype::BF16);
//
// API (host only):
//   struct PeftConfig       r, lora_alpha, use_rslora, use_dora, fan_in_fan_out, target_modules
//                           (list, or a regex string in target_modules_regex), exclude_modules,
//                           layers_to_transform + layers_pattern, modules_to_save, lora_bias, bias,
//                           trainable_token_indices, rank_pattern and alpha_pattern (ordered like
//                           the JSON: PEFT takes the first key that matches), raw (the whole JSON);
//                           rank_for / alpha_for / scaling_for / targets(module); from_json, to_json.
//   PeftConfig load_peft_config(path to adapter_config.json or to the folder)
//   struct PeftModule       name, adapter (ModuleAdapter<float, cpu, dynamic_scaling>: LoRA, or
//                           DoRA with its magnitude m [out]), stored_dtype, kind (linear or
//                           embedding), lora_bias.
//   struct PeftSavedTensor  a full tensor the folder carries (modules_to_save copy, an embedding's
//                           base_layer, a trained bias): it replaces base tensor `key`.
//   struct PeftTrainableTokens  trainable_token_indices' new rows for one embedding (they replace rows).
//   struct PeftAdapter      config, modules (sorted by name), saved, trainable_tokens, skipped
//                           (tensors PEFT would not load, with the reason); at/find/contains.
//   PeftAdapter load_peft_adapter(folder)
//   void check_peft_adapter(folder)          the same checks, nothing converted
//   scan_peft_tensors(file, config)          every tensor of the file classified, checked
//   peft_module_tensors(file, config)        the LoRA modules of scan_peft_tensors
//   void save_peft_adapter(folder, adapter, dtype = F32)   atomic (temporary folder + rename)
//
// Tensor keys in adapter_model.safetensors (all under `base_model.model.`), as PEFT 0.21 writes:
//   <m>.lora_A.weight [r × in], <m>.lora_B.weight [out × r]        a Linear/Conv1D module
//   <m>.lora_B.bias [out]                                            lora_bias = true
//   <m>.lora_magnitude_vector [out]                                  DoRA
//   <m>.lora_embedding_A [r × vocab], <m>.lora_embedding_B [dim × r] an Embedding (core/embedding.hpp)
//   <m>.base_layer.weight                                            an adapted embedding's table
//                                                                    (save_embedding_layers)
//   <m>.weight, <m>.bias                                             modules_to_save copies (bias
//                                                                    "all"/"lora_only": trained biases)
//   <m>.token_adapter.trainable_tokens_delta [k × dim]               trainable_token_indices' rows
// The adapter's scaling is s = alpha/r (alpha/√r with use_rslora), with r and alpha per
// module from the patterns. Which modules carry an adapter is decided by the config as PEFT
// decides it (target_modules, exclude_modules, layers_to_transform, modules_to_save): tensors
// of other modules are not loaded and are listed in PeftAdapter::skipped, as PEFT ignores them.
// Every inconsistency (missing file or tensor, r disagreeing with the tensors, shapes, dtypes,
// bad config values) throws lora::error naming the file and the tensor or key.

#include <lora/core/adapter.hpp>
#include <lora/core/embedding.hpp>
#include <lora/core/scaling.hpp>
#include <lora/core/types.hpp>
#include <lora/dora/module_adapter.hpp>
#include <lora/error.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/json.hpp>
#include <lora/io/pattern.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
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
  /// Whether target_modules was given (a list, possibly empty, or a string); null or absent:
  /// PEFT uses the model type's default targets.
  bool target_modules_given = false;
  /// target_parameters: parameters adapted directly (PEFT's ParamWrapper), such as a MoE
  /// layer's fused expert weights ("mlp.experts.gate_up_proj"); an entry t selects parameter
  /// p of module m if "m.p" is t or ends with "." + t.
  std::vector<std::string> target_parameters;
  /// exclude_modules as a list (suffix match, like target_modules) or a regex string.
  std::vector<std::string> exclude_modules;
  std::optional<std::string> exclude_modules_regex;
  /// layers_to_transform (layer indices; empty: every layer) and layers_pattern (the name of
  /// the layer list, "layers" or "h"; empty: any).
  std::vector<std::int64_t> layers_to_transform;
  std::vector<std::string> layers_pattern;
  /// Modules saved whole (lm_head, embed_tokens, score, …); never adapted themselves.
  std::vector<std::string> modules_to_save;
  bool lora_bias = false;      ///< lora_B has a bias (saved as <m>.lora_B.bias)
  std::string bias = "none";   ///< "none", "all" or "lora_only": which base biases were trained and saved
  /// trainable_token_indices: embedding module (suffix; "" for the input embedding when the
  /// config gives a plain list) → token ids whose rows the adapter replaces.
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> trainable_token_indices;
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
  /// The scaling rule the config selects (use_rslora: alpha/√r, else alpha/r). The one place
  /// that maps config fields to a rule: loading, saving, combine and compress go through it
  /// and set_scaling_policy, so a new PEFT rule is added here and in dynamic_scaling.
  dynamic_scaling scaling_policy() const { return dynamic_scaling{use_rslora}; }
  /// Sets the config fields that select `p` (the inverse of scaling_policy).
  void set_scaling_policy(const dynamic_scaling& p) { use_rslora = p.rslora; }
  /// s = alpha_for(m) / rank_for(m), or alpha/√r with use_rslora.
  double scaling_for(std::string_view module) const {
    return scaling_policy().factor(alpha_for(module), rank_for(module));
  }
  /// Whether the config names its targets (target_modules given); without them PEFT picks
  /// the model type's defaults, which a folder alone does not tell, so nothing is filtered.
  bool has_targets() const {
    return target_modules_regex.has_value() || !target_modules.empty() ||
           (target_modules_given && !target_parameters.empty());
  }
  /// The parameters of `module` that target_parameters selects (their short names, e.g.
  /// "gate_up_proj"), in the config's order.
  std::vector<std::string> parameters_targeted(std::string_view module) const {
    std::vector<std::string> out;
    for (const auto& t : target_parameters) {
      const auto dot = t.rfind('.');
      const std::string p = dot == std::string::npos ? t : t.substr(dot + 1);
      const std::string key = std::string(module) + "." + p;
      if (!name_or_suffix(key, t) || std::find(out.begin(), out.end(), p) != out.end()) continue;
      out.push_back(p);
    }
    return out;
  }

  /// Whether PEFT would put an adapter on `module`, as its check_target_module_exists
  /// decides: not if exclude_modules matches (regex string: whole path; list entry e: the
  /// path is e or ends with "." + e) or a modules_to_save entry m matches `(.*\.)?m(\..*)?`;
  /// then a regex string must match the whole path ("all-linear": every module); a list
  /// entry t matches if the path is t (layers_to_transform not applied) or ends with "." + t,
  /// and then, with layers_to_transform, the layer index after `.<layers_pattern>.` (any
  /// name when layers_pattern is empty) must be listed.
  bool targets(std::string_view module) const {
    if (exclude_modules_regex && regex_full(*exclude_modules_regex, module, "exclude_modules")) return false;
    for (const auto& e : exclude_modules)
      if (name_or_suffix(module, e)) return false;
    for (const auto& m : modules_to_save)
      if (regex_full("(.*\\.)?(" + m + ")(\\..*)?", module, "modules_to_save")) return false;
    if (target_modules_regex) {
      std::string lower = *target_modules_regex;
      for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (lower == "all-linear") return true;
      return regex_full(*target_modules_regex, module, "target_modules");
    }
    bool found = false;
    for (const auto& t : target_modules) {
      if (t == "all-linear" || module == t) return true;
      if (name_or_suffix(module, t)) found = true;
    }
    if (!found || layers_to_transform.empty()) return found;
    const auto index = layer_index(module);
    return index && std::find(layers_to_transform.begin(), layers_to_transform.end(), *index) !=
                        layers_to_transform.end();
  }
  /// The layer index PEFT reads from `module` for layers_to_transform: the number after
  /// `.<p>.` for the first layers_pattern entry p that occurs (the last such occurrence in the
  /// path), or after any `.<name>.` when layers_pattern is empty; nullopt when there is none.
  std::optional<std::int64_t> layer_index(std::string_view module) const {
    // PEFT: re.match(r".*\.{p}\.(\d+)\.", key): the greedy ".*" takes the last occurrence.
    std::vector<std::string> patterns = layers_pattern;
    if (patterns.empty()) patterns.push_back("[^.]*");
    for (const auto& p : patterns)
      if (auto i = regex_capture_int("^.*\\.(?:" + p + ")\\.([0-9]+)\\.", module, "layers_pattern")) return i;
    return std::nullopt;
  }
  /// Whether `module` is a modules_to_save entry (or inside one).
  bool saves_module(std::string_view module) const {
    for (const auto& m : modules_to_save)
      if (regex_full("(.*\\.)?(" + m + ")(\\..*)?", module, "modules_to_save")) return true;
    return false;
  }

  /// Reads the fields from a parsed adapter_config.json; `where` names the file in messages.
  static PeftConfig from_json(const nlohmann::ordered_json& j, const std::string& where);
  /// The config as JSON that PEFT 0.21 accepts: `raw` (or a default LoRA config) with
  /// this struct's fields written over it.
  nlohmann::ordered_json to_json() const;

 private:
  static bool name_or_suffix(std::string_view module, std::string_view t) {
    return module == t || (module.size() > t.size() && module.substr(module.size() - t.size()) == t &&
                           module[module.size() - t.size() - 1] == '.');
  }
  // RE2 (io/pattern.hpp): linear time in the name, Python's semantics.
  static std::optional<std::int64_t> regex_capture_int(const std::string& pattern, std::string_view s,
                                                       const char* field) {
    const auto digits = regex_search_group(pattern, s, fmt::format("adapter_config.json: {}", field));
    if (!digits || digits->empty() || digits->size() > 15) return std::nullopt;
    return std::stoll(*digits);
  }
  static bool regex_full(const std::string& pattern, std::string_view s, const char* field) {
    return regex_full_match(pattern, s, fmt::format("adapter_config.json: {}", field));
  }
  static bool pattern_matches(const std::string& key, std::string_view module) {
    return pattern_key_matches(key, module, "adapter_config.json: rank_pattern/alpha_pattern");
  }
};

/// What kind of layer a module adapts.
enum class PeftModuleKind {
  linear,     ///< nn.Linear / Conv1D: lora_A.weight [r × in], lora_B.weight [out × r]
  embedding,  ///< nn.Embedding: lora_embedding_A [r × vocab], lora_embedding_B [dim × r] (core/embedding.hpp)
};

/// One adapted module of a PEFT adapter.
struct PeftModule {
  std::string name;  ///< module path without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"
  /// The module's adapter: LoRA (A [r × in], B [out × r], alpha, rsLoRA, fan_in_fan_out), or
  /// DoRA when the folder has use_dora (the same plus lora_magnitude_vector m [out]); its apply,
  /// backward, merge and unmerge are DoRA's then. An embedding module has A =
  /// lora_embedding_A [r × vocab], B = lora_embedding_B [dim × r] and fan_in_fan_out set, so
  /// delta_weight() = s·(B·A)ᵀ is the [vocab × dim] change of the table.
  ModuleAdapter<float, cpu, dynamic_scaling> adapter;
  dtype stored_dtype = dtype::F32;                      ///< dtype of lora_A in the file
  PeftModuleKind kind = PeftModuleKind::linear;
  std::optional<Vector<float>> lora_bias = std::nullopt;  ///< lora_B.bias [out] (lora_bias = true), see core/lora_bias.hpp

  bool is_dora() const { return adapter.is_dora(); }
  bool is_embedding() const { return kind == PeftModuleKind::embedding; }
  /// The DoRA adapter of a DoRA module; throws lora::error naming the module for a plain one.
  const DoraAdapter<float, cpu, dynamic_scaling>& dora() const {
    if (!is_dora()) lora::detail::fail("module '{}': not a DoRA module (it has no lora_magnitude_vector)", name);
    return adapter.dora();
  }
};

/// A LoRA on a parameter (LoraConfig.target_parameters, PEFT's ParamWrapper), typically a
/// MoE layer's fused expert weights W [E, out, in] (or [E, in, out] where the model stores
/// them transposed; a 2-D parameter is one expert). The factors hold every expert:
///   A = lora_A.weight [E·r × in]:  rows e·r … e·r + r − 1 are expert e's A_e [r × in]
///   B = lora_B.weight [out × r·E]: column k·E + e is column k of expert e's B_e [out × r]
/// and expert e's change is ΔW_e = s·B_e·A_e [out × in] (PEFT's get_delta_weight).
/// The file does not say which parameter a wrapper adapts when target_parameters selects
/// several on one module (PEFT nests one wrapper per parameter in the module's registration
/// order); `parameter` is empty then until resolve_parameter_targets() matches the shapes
/// against a base checkpoint.
struct PeftParamAdapter {
  std::string module;  ///< e.g. "model.layers.0.mlp.experts"
  std::string path;    ///< PEFT's path of the wrapper in the file: module + ".base_layer" × depth
  int depth = 0;       ///< nesting depth (0: outermost)
  std::vector<std::string> candidates;  ///< parameters of `module` that target_parameters selects
  std::string parameter;                ///< the adapted parameter, "" while unresolved
  Matrix<float> A, B;                   ///< as stored (see above), converted to float
  dtype stored_dtype = dtype::F32;
  int rank = 0;      ///< r; 0 while it depends on the unresolved parameter (rank_pattern)
  double alpha = 0;  ///< alpha of the parameter (alpha_pattern), valid with rank
  bool rslora = false;

  /// "model.layers.0.mlp.experts.gate_up_proj", or the module and its candidates while unresolved.
  std::string name() const {
    return parameter.empty() ? fmt::format("{}.{{{}}}", module, fmt::join(candidates, "|")) : module + "." + parameter;
  }
  bool resolved() const { return !parameter.empty() && rank > 0; }
  /// Expert e's name as a module of its own, in the layout of checkpoints that store experts
  /// separately: "model.layers.0.mlp.experts.3.gate_up_proj" ("….3.wrapper<depth>" while the
  /// parameter is unresolved).
  std::string expert_name(Index e) const {
    return fmt::format("{}.{}.{}", module, e, parameter.empty() ? fmt::format("wrapper{}", depth) : parameter);
  }
  Index in_features() const { return A.cols(); }
  Index out_features() const { return B.rows(); }
  /// The number of experts E (A's rows / r); 0 while the rank is unknown.
  Index experts() const { return rank > 0 ? A.rows() / rank : 0; }
  /// s = alpha/r (alpha/√r with use_rslora).
  double scaling() const { return dynamic_scaling{rslora}.factor(alpha, rank); }
  /// Expert e as an adapter of its own: A_e [r × in], B_e [out × r], the wrapper's alpha and rule.
  LowRankAdapter<float, cpu, dynamic_scaling> expert(Index e) const {
    const Index E = experts();
    if (E == 0)
      lora::detail::fail("'{}': the rank is not known until the parameter is resolved (rank_pattern gives its "
                         "candidates different ranks)", name());
    if (e < 0 || e >= E) lora::detail::fail("'{}': expert {} out of range (it has {})", name(), e, E);
    Matrix<float> Ae = A.middleRows(e * rank, rank);
    Matrix<float> Be(B.rows(), rank);
    for (Index k = 0; k < rank; ++k) Be.col(k) = B.col(k * E + e);
    AdapterOptions opts;
    opts.name = expert_name(e);
    return LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(std::move(Ae), std::move(Be), alpha, opts,
                                                                      dynamic_scaling{rslora});
  }
};

/// A whole tensor that an adapter folder carries and that replaces the base model's tensor
/// of the same path when PEFT loads the adapter (and so in merge_and_unload's result).
struct PeftSavedTensor {
  enum class Role {
    modules_to_save,  ///< a modules_to_save copy (lm_head, embed_tokens, score, …)
    base_layer,       ///< <m>.base_layer.weight of an adapted embedding (save_embedding_layers)
    trained_bias,     ///< a base bias trained with bias = "all" / "lora_only"
  };
  std::string key;     ///< the base tensor it replaces, e.g. "lm_head.weight" (no "base_model.model.")
  std::string module;  ///< its module path, e.g. "lm_head"
  Role role = Role::modules_to_save;
  TensorData data;     ///< as stored in the file (name = the file's key, dtype, shape, bytes)
};

/// The name PEFT's documentation uses for a saved-tensor role.
inline const char* role_name(PeftSavedTensor::Role r) {
  switch (r) {
    case PeftSavedTensor::Role::modules_to_save: return "modules_to_save";
    case PeftSavedTensor::Role::base_layer: return "base_layer";
    case PeftSavedTensor::Role::trained_bias: return "bias";
  }
  return "?";
}

/// trainable_token_indices of one embedding: PEFT's TrainableTokens layer saves the new
/// rows of the listed tokens, and they replace the table's rows (E(indices[i], :) = rows(i, :));
/// they are not added. With tied embeddings the same rows replace lm_head's rows.
struct PeftTrainableTokens {
  std::string module;                 ///< the embedding, e.g. "model.embed_tokens"
  std::vector<std::int64_t> indices;  ///< token ids, in the config's order
  Matrix<float> rows;                 ///< [indices.size() × dim]
  dtype stored_dtype = dtype::F32;
};

/// A tensor of the adapter file that PEFT would not load, and why.
struct PeftSkippedTensor {
  std::string key;     ///< the key in adapter_model.safetensors
  std::string reason;
};

/// A loaded adapter folder: its config, its modules (sorted by name), the whole tensors and
/// trainable-token rows it carries, and the tensors it holds that PEFT would ignore.
struct PeftAdapter {
  PeftConfig config;
  std::vector<PeftModule> modules;
  std::vector<PeftParamAdapter> params;                 ///< target_parameters' LoRAs, by module and depth
  std::vector<PeftSavedTensor> saved;                   ///< sorted by key
  std::vector<PeftTrainableTokens> trainable_tokens;    ///< sorted by module
  std::vector<PeftSkippedTensor> skipped;               ///< in file order

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

/// Throws lora::error naming `what` (the operation) and the first parameter LoRA when
/// `adapter` has parameter LoRAs (target_parameters): for the operations that work on
/// modules only and would otherwise drop them.
inline void require_modules_only(const PeftAdapter& adapter, std::string_view what) {
  if (adapter.params.empty()) return;
  lora::detail::fail("{}: the adapter has {} LoRA(s) on parameters (target_parameters: {}, e.g. '{}'), which {} does "
                     "not support (inspect, info and merge do)", what, adapter.params.size(),
                     fmt::join(adapter.config.target_parameters, ", "), adapter.params.front().path, what);
}

namespace detail {

inline const std::string& peft_prefix() {
  static const std::string p = "base_model.model.";
  return p;
}

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Depth-bounded, duplicate keys refused, never blocks on a FIFO (io/json.hpp).
inline nlohmann::ordered_json read_json_file(const std::filesystem::path& path) {
  return lora::io::read_json_file<nlohmann::ordered_json>(path);
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
    c.target_modules_given = true;
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
  // A list of names or a regex string (target_modules' convention), for exclude_modules.
  if (j.contains("exclude_modules") && !j["exclude_modules"].is_null()) {
    const auto& t = j["exclude_modules"];
    if (t.is_string()) {
      c.exclude_modules_regex = t.get<std::string>();
    } else if (t.is_array()) {
      for (const auto& e : t) {
        if (!e.is_string()) lora::detail::fail("{}: exclude_modules entries must be strings, got {}", where, e.dump());
        c.exclude_modules.push_back(e.get<std::string>());
      }
    } else {
      lora::detail::fail("{}: exclude_modules must be a list of names or a regex string, got {}", where, t.dump());
    }
  }
  auto string_list = [&](const char* field, std::vector<std::string>& out) {
    if (!j.contains(field) || j[field].is_null()) return;
    const auto& t = j[field];
    if (t.is_string()) {
      out.push_back(t.get<std::string>());
      return;
    }
    if (!t.is_array()) lora::detail::fail("{}: '{}' must be a list of strings, got {}", where, field, t.dump());
    for (const auto& e : t) {
      if (!e.is_string()) lora::detail::fail("{}: '{}' entries must be strings, got {}", where, field, e.dump());
      out.push_back(e.get<std::string>());
    }
  };
  auto index_of = [&](const nlohmann::ordered_json& v, const std::string& what) -> std::int64_t {
    if (!v.is_number_integer() || v.get<std::int64_t>() < 0)
      lora::detail::fail("{}: {} must be a non-negative integer, got {}", where, what, v.dump());
    return v.get<std::int64_t>();
  };
  auto index_list = [&](const nlohmann::ordered_json& t, const std::string& what) {
    std::vector<std::int64_t> out;
    if (t.is_number()) {
      out.push_back(index_of(t, what));
      return out;
    }
    if (!t.is_array()) lora::detail::fail("{}: {} must be a list of integers, got {}", where, what, t.dump());
    for (const auto& e : t) out.push_back(index_of(e, what + " entries"));
    return out;
  };
  string_list("layers_pattern", c.layers_pattern);
  if (j.contains("target_parameters") && !j["target_parameters"].is_null()) {
    // PEFT: "`target_parameters` must be a list of strings or None."
    if (!j["target_parameters"].is_array())
      lora::detail::fail("{}: 'target_parameters' must be a list of strings, got {}", where, j["target_parameters"].dump());
    string_list("target_parameters", c.target_parameters);
    for (const auto& t : c.target_parameters)
      if (t.empty() || t.front() == '.' || t.back() == '.')
        lora::detail::fail("{}: target_parameters entry '{}' is not a parameter name", where, t);
  }
  string_list("modules_to_save", c.modules_to_save);
  if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null())
    c.layers_to_transform = index_list(j["layers_to_transform"], "'layers_to_transform'");
  c.lora_bias = detail::json_bool(j, "lora_bias", false, where);
  if (j.contains("bias") && !j["bias"].is_null()) {
    if (!j["bias"].is_string() || (j["bias"] != "none" && j["bias"] != "all" && j["bias"] != "lora_only"))
      lora::detail::fail("{}: 'bias' must be \"none\", \"all\" or \"lora_only\", got {}", where, j["bias"].dump());
    c.bias = j["bias"].get<std::string>();
  }
  if (j.contains("trainable_token_indices") && !j["trainable_token_indices"].is_null()) {
    const auto& t = j["trainable_token_indices"];
    if (t.is_object()) {
      for (const auto& [k, v] : t.items())
        c.trainable_token_indices.emplace_back(k, index_list(v, fmt::format("trainable_token_indices['{}']", k)));
    } else {
      c.trainable_token_indices.emplace_back("", index_list(t, "'trainable_token_indices'"));
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
  if (!target_parameters.empty()) j["target_parameters"] = target_parameters;
  else if (j.contains("target_parameters")) j["target_parameters"] = nullptr;
  nlohmann::ordered_json rp = nlohmann::ordered_json::object(), ap = nlohmann::ordered_json::object();
  for (const auto& [k, v] : rank_pattern) rp[k] = v;
  for (const auto& [k, v] : alpha_pattern) ap[k] = detail::alpha_json(v);
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;
  // The selection fields: null when empty, as PEFT writes its defaults.
  auto list_or_null = [](const auto& v) { return v.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(v); };
  if (exclude_modules_regex)
    j["exclude_modules"] = *exclude_modules_regex;
  else
    j["exclude_modules"] = list_or_null(exclude_modules);
  j["layers_to_transform"] = list_or_null(layers_to_transform);
  j["layers_pattern"] = list_or_null(layers_pattern);
  j["modules_to_save"] = list_or_null(modules_to_save);
  j["lora_bias"] = lora_bias;
  j["bias"] = bias;
  if (trainable_token_indices.empty()) {
    if (j.contains("trainable_token_indices")) j["trainable_token_indices"] = nullptr;
  } else if (trainable_token_indices.size() == 1 && trainable_token_indices.front().first.empty()) {
    j["trainable_token_indices"] = trainable_token_indices.front().second;
  } else {
    nlohmann::ordered_json t = nlohmann::ordered_json::object();
    for (const auto& [k, v] : trainable_token_indices) t[k.empty() ? std::string("embed_tokens") : k] = v;
    j["trainable_token_indices"] = t;
  }
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
  const TensorView* A = nullptr;          ///< lora_A.weight [r × in] (lora_embedding_A [r × vocab])
  const TensorView* B = nullptr;          ///< lora_B.weight [out × r] (lora_embedding_B [dim × r])
  const TensorView* magnitude = nullptr;  ///< DoRA's lora_magnitude_vector [out]; null for plain LoRA
  const TensorView* bias = nullptr;       ///< lora_B.bias [out]; null without lora_bias
  PeftModuleKind kind = PeftModuleKind::linear;
};

/// The tensors of one LoRA on a parameter (target_parameters; PEFT's ParamWrapper).
struct PeftParamTensors {
  std::string module;  ///< the module holding the parameter, e.g. "model.layers.0.mlp.experts"
  std::string path;    ///< PEFT's path of the wrapper: module + ".base_layer" × depth
  int depth = 0;       ///< 0: the outermost wrapper; k: wrapped by k others (one per parameter)
  std::vector<std::string> candidates;  ///< the parameters of `module` target_parameters selects
  const TensorView* A = nullptr;        ///< lora_A.weight [r·experts × in]
  const TensorView* B = nullptr;        ///< lora_B.weight [out × r·experts]
};

/// Every tensor of an adapter_model.safetensors, classified as PEFT's loader sees it.
struct PeftFileTensors {
  struct Saved {
    std::string key, module;
    PeftSavedTensor::Role role;
    const TensorView* view;
  };
  struct Tokens {
    std::string module;
    std::vector<std::int64_t> indices;
    const TensorView* rows;
  };
  std::vector<PeftModuleTensors> modules;  ///< adapted modules, sorted by name
  std::vector<PeftParamTensors> params;    ///< adapted parameters (target_parameters), by module and depth
  std::vector<Saved> saved;                ///< whole tensors that replace base tensors, sorted by key
  std::vector<Tokens> tokens;              ///< trainable-token rows, sorted by module
  std::vector<PeftSkippedTensor> skipped;  ///< tensors PEFT would not load, with the reason
};

namespace detail {
inline void check_float_tensor(const std::string& file, const TensorView& t) {
  if (t.type != dtype::F32 && t.type != dtype::F16 && t.type != dtype::BF16 && t.type != dtype::F64)
    lora::detail::fail("{}: tensor '{}' has dtype {}, expected a float type (F32, F16, BF16 or F64)", file, t.name,
                       dtype_name(t.type));
}

// The checks of one parameter wrapper's tensors (ParamWrapper: lora_A [r·E × in], lora_B
// [out × r·E], no DoRA, no lora_bias, E ≥ 1 experts for the rank of some selected parameter).
inline PeftParamTensors check_param_tensors(const std::string& file, const PeftConfig& cfg, const PeftModuleTensors& p,
                                            const std::string& module, int depth, std::vector<std::string> candidates) {
  const std::string& path = p.name;
  if (p.kind == PeftModuleKind::embedding)
    lora::detail::fail("{}: '{}' has lora_embedding_A/B, but target_parameters selects a parameter of module '{}' ({}): "
                       "PEFT's parameter LoRA stores lora_A/lora_B.weight", file, path, module, fmt::join(candidates, ", "));
  if (p.magnitude)
    lora::detail::fail("{}: tensor '{}': DoRA on a parameter (target_parameters) — PEFT refuses it ('does not work "
                       "with use_dora=True')", file, p.magnitude->name);
  if (p.bias)
    lora::detail::fail("{}: tensor '{}': lora_bias on a parameter (target_parameters) — PEFT refuses it ('does not "
                       "work with lora_bias=True')", file, p.bias->name);
  if (!p.A) lora::detail::fail("{}: '{}' has lora_B.weight but no lora_A.weight", file, path);
  if (!p.B) lora::detail::fail("{}: tensor '{}' has no matching lora_B.weight", file, p.A->name);
  for (const TensorView* v : {p.A, p.B}) {
    check_float_tensor(file, *v);
    require_finite(*v, "a PEFT adapter");
    if (v->ndim() != 2)
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 2", file, v->name, v->ndim());
  }
  const std::int64_t rows = p.A->shape[0];
  if (rows == 0 || p.A->shape[1] == 0 || p.B->shape[0] == 0)
    lora::detail::fail("{}: '{}' has lora_A [{}] and lora_B [{}]: a factor with a zero-size dimension", file, path,
                       fmt::join(p.A->shape, ", "), fmt::join(p.B->shape, ", "));
  if (p.B->shape[1] != rows)
    lora::detail::fail("{}: tensor '{}' has shape [{}, {}], expected [out, {}] (the rows of lora_A, r × experts)", file,
                       p.B->name, p.B->shape[0], p.B->shape[1], rows);
  std::vector<std::string> ranks;
  for (const auto& c : candidates) {
    const int r = cfg.rank_for(module + "." + c);
    if (rows % r == 0) return {module, path, depth, std::move(candidates), p.A, p.B};
    ranks.push_back(fmt::format("r = {} for '{}'", r, c));
  }
  lora::detail::fail("{}: tensor '{}' has {} rows, which is no multiple of the rank of any parameter target_parameters "
                     "selects on module '{}' ({}); PEFT stores r × experts rows",
                     file, p.A->name, rows, module, fmt::join(ranks, ", "));
}
}  // namespace detail

/// Classifies and checks every tensor of a PEFT adapter_model.safetensors against its config,
/// converting none:
/// - LoRA factors (lora_A/lora_B, lora_embedding_A/B, lora_B.bias, DoRA magnitudes) of the
///   modules the config targets (PeftConfig::targets); those of other modules are skipped,
///   as PEFT creates no adapter there and ignores them. Factors are float matrices whose r
///   is the config's; a magnitude [out] is there exactly when use_dora is true (PEFT would
///   only warn about missing magnitudes and keep ‖W‖'s row norms, and silently drop ones it
///   does not expect; both change the model, so both are errors); a lora_B.bias [out] is
///   loaded with lora_bias = true and skipped otherwise.
/// - whole tensors: `<m>.base_layer.weight` of an adapted module, copies of modules_to_save
///   modules, biases trained with bias = "all" / "lora_only"; any other is skipped.
/// - `<m>.token_adapter.trainable_tokens_delta` [k × dim], with k the number of token ids
///   trainable_token_indices gives for m.
/// Throws lora::error naming the file and tensor for a key that is not one PEFT writes
/// for LoRA adapters, or for a file without any adapter content.
inline PeftFileTensors scan_peft_tensors(const SafetensorsFile& f, const PeftConfig& cfg) {
  const std::string& file = f.path();
  std::map<std::string, PeftModuleTensors> parts;
  std::map<std::string, const TensorView*> token_rows;
  std::vector<std::pair<std::string, const TensorView*>> whole;  // key (no prefix) → view
  PeftFileTensors out;
  for (const auto& t : f.tensors()) {
    std::string_view key = t.name;
    if (key.substr(0, detail::peft_prefix().size()) == detail::peft_prefix()) key.remove_prefix(detail::peft_prefix().size());
    auto take = [&](std::string_view suffix) -> std::optional<std::string> {
      if (!detail::ends_with(key, suffix) || key.size() == suffix.size()) return std::nullopt;
      return std::string(key.substr(0, key.size() - suffix.size()));
    };
    // One tensor per role: the same module under two spellings (with and without
    // base_model.model., or both magnitude keys) would otherwise be merged twice.
    auto set = [&](const TensorView*& slot, const std::string& m) {
      if (slot)
        lora::detail::fail("{}: tensors '{}' and '{}' are the same tensor of module '{}' under two keys", file,
                           slot->name, t.name, m);
      slot = &t;
    };
    auto linear = [&](const std::string& m) -> PeftModuleTensors& {
      auto& p = parts[m];
      if (p.kind == PeftModuleKind::embedding)
        lora::detail::fail("{}: tensor '{}': module '{}' also has lora_embedding_A/B; a module is either a Linear or "
                           "an Embedding", file, t.name, m);
      return p;
    };
    auto embedding = [&](const std::string& m) -> PeftModuleTensors& {
      auto& p = parts[m];
      if (p.kind == PeftModuleKind::linear && (p.A || p.B || p.bias || p.magnitude))
        lora::detail::fail("{}: tensor '{}': module '{}' also has lora_A/lora_B; a module is either a Linear or an "
                           "Embedding", file, t.name, m);
      p.kind = PeftModuleKind::embedding;
      return p;
    };
    if (auto m = take(".lora_A.weight")) {
      set(linear(*m).A, *m);
    } else if (auto m = take(".lora_B.weight")) {
      set(linear(*m).B, *m);
    } else if (auto m = take(".lora_B.bias")) {
      set(linear(*m).bias, *m);
    } else if (auto m = take(".lora_magnitude_vector")) {
      set(parts[*m].magnitude, *m);
    } else if (auto m = take(".lora_magnitude_vector.weight")) {
      set(parts[*m].magnitude, *m);
    } else if (auto m = take(".lora_embedding_A")) {
      set(embedding(*m).A, *m);
    } else if (auto m = take(".lora_embedding_B")) {
      set(embedding(*m).B, *m);
    } else if (auto m = take(".token_adapter.trainable_tokens_delta")) {
      set(token_rows[*m], *m);
    } else if (key.find("lora_") != std::string_view::npos || key.find("token_adapter") != std::string_view::npos ||
               key.find('.') == std::string_view::npos) {
      lora::detail::fail("{}: tensor '{}' is not a tensor PEFT writes for a LoRA adapter (expected <module>.lora_A.weight, "
                         ".lora_B.weight, .lora_B.bias, .lora_magnitude_vector, .lora_embedding_A/B, "
                         ".token_adapter.trainable_tokens_delta, or a whole <module>.weight/.bias)",
                         file, t.name);
    } else {
      whole.emplace_back(std::string(key), &t);
    }
  }

  // LoRA modules: the config's selection first (PEFT never looks at the others' tensors).
  const bool filter = cfg.has_targets();
  for (auto& [name, p] : parts) {
    p.name = name;
    if (!cfg.target_parameters.empty()) {
      // A LoRA on a parameter: PEFT wraps the module once per targeted parameter, each wrapper
      // around the one before, so the tensors sit at <module>(.base_layer)*.lora_A/B.weight.
      std::string module = name;
      int depth = 0;
      while (detail::ends_with(module, ".base_layer")) {
        module.resize(module.size() - std::string(".base_layer").size());
        ++depth;
      }
      auto candidates = cfg.parameters_targeted(module);
      if (!candidates.empty()) {
        out.params.push_back(detail::check_param_tensors(file, cfg, p, module, depth, std::move(candidates)));
        continue;
      }
    }
    if (filter && !cfg.targets(name)) {
      const std::string why = fmt::format(
          "module '{}' is not adapted under this config (target_modules{}{}{}): PEFT creates no LoRA layer there and "
          "ignores the tensor",
          name, cfg.exclude_modules.empty() && !cfg.exclude_modules_regex ? "" : ", exclude_modules",
          cfg.layers_to_transform.empty() ? "" : ", layers_to_transform", cfg.modules_to_save.empty() ? "" : ", modules_to_save");
      for (const TensorView* v : {p.A, p.B, p.magnitude, p.bias})
        if (v) out.skipped.push_back({v->name, why});
      continue;
    }
    const bool emb = p.kind == PeftModuleKind::embedding;
    const char* a_key = emb ? "lora_embedding_A" : "lora_A.weight";
    const char* b_key = emb ? "lora_embedding_B" : "lora_B.weight";
    if (!p.A)
      lora::detail::fail("{}: module '{}' has {} but no {}", file, name,
                         p.B ? b_key : (p.bias ? "lora_B.bias" : "lora_magnitude_vector"), a_key);
    if (!p.B) lora::detail::fail("{}: tensor '{}' has no matching {}", file, p.A->name, b_key);
    detail::check_float_tensor(file, *p.A);
    detail::check_float_tensor(file, *p.B);
    // NaN/Inf would reach every merged weight and every combination (exit 0 before).
    for (const TensorView* v : {p.A, p.B, p.magnitude, p.bias})
      if (v) require_finite(*v, "a PEFT adapter");
    if (p.A->ndim() != 2)
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 2 ([r, {}])", file, p.A->name, p.A->ndim(),
                         emb ? "vocab" : "in");
    if (p.B->ndim() != 2)
      lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 2 ([{}, r])", file, p.B->name, p.B->ndim(),
                         emb ? "dim" : "out");
    if (p.A->shape[1] == 0 || p.B->shape[0] == 0)
      lora::detail::fail("{}: module '{}' has lora_A [{}] and lora_B [{}]: a factor with a zero-size dimension", file,
                         name, fmt::join(p.A->shape, ", "), fmt::join(p.B->shape, ", "));
    const int r = cfg.rank_for(name);
    if (p.A->shape[0] != r)
      lora::detail::fail("{}: tensor '{}' has shape [{}, {}]: rank {}, but the config gives r = {} for module '{}'",
                         file, p.A->name, p.A->shape[0], p.A->shape[1], p.A->shape[0], r, name);
    if (p.B->shape[1] != r)
      lora::detail::fail("{}: tensor '{}' has shape [{}, {}], expected [{}, {}] (r = {} for module '{}')", file,
                         p.B->name, p.B->shape[0], p.B->shape[1], emb ? "dim" : "out", r, r, name);
    if (cfg.use_dora && !p.magnitude)
      lora::detail::fail("{}: module '{}' has no lora_magnitude_vector, but the config has use_dora = true", file, name);
    if (!cfg.use_dora && p.magnitude)
      lora::detail::fail("{}: tensor '{}' is a DoRA magnitude, but the config has use_dora = false", file,
                         p.magnitude->name);
    if (const TensorView* m = p.magnitude) {
      detail::check_float_tensor(file, *m);
      if (m->ndim() != 1 && !(m->ndim() == 2 && m->shape[1] == 1))
        lora::detail::fail("{}: tensor '{}' has {} dimensions, expected 1 ([out])", file, m->name, m->ndim());
      if (m->shape[0] != p.B->shape[0])
        lora::detail::fail("{}: tensor '{}' has {} elements, expected out = {} (the rows of lora_B)", file, m->name,
                           m->shape[0], p.B->shape[0]);
    }
    if (const TensorView* b = p.bias) {
      if (!cfg.lora_bias) {
        out.skipped.push_back({b->name, "lora_B.bias, but the config has lora_bias = false: PEFT's lora_B has no "
                                        "bias and ignores the tensor"});
        p.bias = nullptr;
      } else {
        detail::check_float_tensor(file, *b);
        if (b->ndim() != 1 || b->shape[0] != p.B->shape[0])
          lora::detail::fail("{}: tensor '{}' has shape [{}], expected [{}] (out, the rows of lora_B)", file, b->name,
                             fmt::join(b->shape, ", "), p.B->shape[0]);
        if (p.magnitude)
          lora::detail::fail("{}: tensor '{}': lora_bias together with DoRA is not supported", file, b->name);
      }
    }
    out.modules.push_back(p);
  }

  // Whole tensors.
  auto adapted = [&](const std::string& m) {
    return std::any_of(out.modules.begin(), out.modules.end(), [&](const PeftModuleTensors& p) { return p.name == m; });
  };
  for (const auto& [key, v] : whole) {
    detail::check_float_tensor(file, *v);
    if (const auto pos = key.find(".base_layer."); pos != std::string::npos) {
      const std::string module = key.substr(0, pos);
      std::string base_key = key;
      base_key.erase(pos, std::string(".base_layer").size());
      if (adapted(module))
        out.saved.push_back({base_key, module, PeftSavedTensor::Role::base_layer, v});
      else
        out.skipped.push_back({v->name, fmt::format("a base_layer tensor of '{}', which carries no adapter here", module)});
      continue;
    }
    const auto dot = key.rfind('.');
    const std::string module = key.substr(0, dot), param = key.substr(dot + 1);
    if (cfg.saves_module(module)) {
      out.saved.push_back({key, module, PeftSavedTensor::Role::modules_to_save, v});
    } else if (param == "bias" && (cfg.bias == "all" || (cfg.bias == "lora_only" && adapted(module)))) {
      out.saved.push_back({key, module, PeftSavedTensor::Role::trained_bias, v});
    } else {
      out.skipped.push_back({v->name, fmt::format("a whole tensor of module '{}', which is not in modules_to_save{}: "
                                                  "PEFT does not load it",
                                                  module, param == "bias" ? " (and bias is \"" + cfg.bias + "\")" : "")});
    }
  }
  std::sort(out.saved.begin(), out.saved.end(), [](const auto& a, const auto& b) { return a.key < b.key; });

  // Trainable tokens.
  for (const auto& [module, v] : token_rows) {
    const std::vector<std::int64_t>* ids = nullptr;
    for (const auto& [target, list] : cfg.trainable_token_indices)
      if (target.empty() || module == target ||
          (module.size() > target.size() && detail::ends_with(module, "." + target)))
        ids = &list;
    if (!ids)
      lora::detail::fail("{}: tensor '{}' holds trainable-token rows, but the config's trainable_token_indices gives no "
                         "token ids for module '{}'", file, v->name, module);
    detail::check_float_tensor(file, *v);
    if (v->ndim() != 2 || v->shape[0] != static_cast<std::int64_t>(ids->size()))
      lora::detail::fail("{}: tensor '{}' has shape [{}], expected [{}, dim] (one row per token id in "
                         "trainable_token_indices)", file, v->name, fmt::join(v->shape, ", "), ids->size());
    out.tokens.push_back({module, *ids, v});
  }
  // Parameter wrappers: depths 0 .. n−1 on each module, at most one per selected parameter.
  std::sort(out.params.begin(), out.params.end(),
            [](const PeftParamTensors& a, const PeftParamTensors& b) { return std::tie(a.module, a.depth) < std::tie(b.module, b.depth); });
  for (std::size_t i = 0; i < out.params.size();) {
    std::size_t j = i;
    while (j < out.params.size() && out.params[j].module == out.params[i].module) ++j;
    const auto& first = out.params[i];
    for (std::size_t k = i; k < j; ++k)
      if (out.params[k].depth != static_cast<int>(k - i))
        lora::detail::fail("{}: module '{}' has LoRA tensors at '{}' but none at '{}{}' (PEFT nests one wrapper per "
                           "targeted parameter: <module>.lora_A, <module>.base_layer.lora_A, …)",
                           file, first.module, out.params[k].path, first.module,
                           [&] { std::string s; for (std::size_t d = 0; d < k - i; ++d) s += ".base_layer"; return s; }());
    if (j - i > first.candidates.size())
      lora::detail::fail("{}: module '{}' has {} LoRA wrappers (down to '{}'), but target_parameters selects {} "
                         "parameter(s) of it ({})", file, first.module, j - i, out.params[j - 1].path,
                         first.candidates.size(), fmt::join(first.candidates, ", "));
    i = j;
  }
  if (out.modules.empty() && out.params.empty() && out.saved.empty() && out.tokens.empty())
    lora::detail::fail("{}: holds no LoRA tensors{}", file,
                       out.skipped.empty() ? "" : fmt::format(" the config selects ({} skipped, e.g. '{}': {})",
                                                              out.skipped.size(), out.skipped.front().key,
                                                              out.skipped.front().reason));
  return out;
}

/// The LoRA modules of scan_peft_tensors (lora_A / lora_B / magnitude / bias views per
/// module), sorted by module name.
inline std::vector<PeftModuleTensors> peft_module_tensors(const SafetensorsFile& f, const PeftConfig& cfg) {
  return scan_peft_tensors(f, cfg).modules;
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
  scan_peft_tensors(opened.second, opened.first);
}

/// Loads a PEFT LoRA/rsLoRA/DoRA adapter folder with everything it carries (embedding LoRA,
/// lora_B biases, modules_to_save copies, trainable tokens). Factors of any float dtype
/// (F64, F32, F16, BF16) are converted to float; whole tensors are kept as stored; r and
/// shapes are checked against the config (see scan_peft_tensors).
inline PeftAdapter load_peft_adapter(const std::filesystem::path& folder) {
  auto opened = detail::open_peft_folder(folder);
  PeftAdapter out;
  out.config = std::move(opened.first);
  const SafetensorsFile& f = opened.second;
  const std::string file = f.path();
  const PeftConfig& cfg = out.config;
  PeftFileTensors scan = scan_peft_tensors(f, cfg);
  for (const PeftModuleTensors& p : scan.modules) {
    AdapterOptions opts;
    opts.fan_in_fan_out = cfg.fan_in_fan_out;
    opts.name = p.name;
    auto make = [&]() -> ModuleAdapter<float, cpu, dynamic_scaling> {
      try {
        // An embedding is [vocab × dim] stored [in × out] (fan_in_fan_out); DoRA's magnitude
        // and norm then run over its dim columns (PEFT's DoraEmbeddingVariant).
        auto lora = p.kind == PeftModuleKind::embedding
                        ? embedding_adapter<float, dynamic_scaling>(p.A->to_matrix<float>(), p.B->to_matrix<float>(),
                                                                    cfg.alpha_for(p.name), opts, cfg.scaling_policy())
                        : LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(
                              p.A->to_matrix<float>(), p.B->to_matrix<float>(), cfg.alpha_for(p.name), opts,
                              cfg.scaling_policy());
        if (!p.magnitude) return lora;
        Vector<float> m(p.magnitude->shape[0]);
        p.magnitude->convert_into(m.data());
        return DoraAdapter<float, cpu, dynamic_scaling>(std::move(lora), std::move(m));
      } catch (const lora::error& e) {
        lora::detail::fail("{}: {}", file, e.what());
      }
    };
    PeftModule mod{p.name, make(), p.A->type, p.kind, std::nullopt};
    if (p.bias) {
      Vector<float> b(p.bias->shape[0]);
      p.bias->convert_into(b.data());
      mod.lora_bias = std::move(b);
    }
    out.modules.push_back(std::move(mod));
  }
  for (const PeftParamTensors& p : scan.params) {
    PeftParamAdapter w;
    w.module = p.module;
    w.path = p.path;
    w.depth = p.depth;
    w.candidates = p.candidates;
    w.A = p.A->to_matrix<float>();
    w.B = p.B->to_matrix<float>();
    w.stored_dtype = p.A->type;
    w.rslora = cfg.use_rslora;
    const std::size_t wrappers = static_cast<std::size_t>(std::count_if(
        scan.params.begin(), scan.params.end(), [&](const PeftParamTensors& q) { return q.module == p.module; }));
    if (wrappers == 1 && p.candidates.size() == 1) w.parameter = p.candidates.front();
    // The rank and alpha: the parameter's, or those all candidates share.
    std::set<std::pair<int, double>> ra;
    for (const auto& c : w.parameter.empty() ? p.candidates : std::vector<std::string>{w.parameter})
      ra.insert({cfg.rank_for(p.module + "." + c), cfg.alpha_for(p.module + "." + c)});
    if (ra.size() == 1 && w.A.rows() % ra.begin()->first == 0) std::tie(w.rank, w.alpha) = *ra.begin();
    out.params.push_back(std::move(w));
  }
  for (const auto& s : scan.saved) out.saved.push_back({s.key, s.module, s.role, TensorData::copy_of(*s.view)});
  for (const auto& t : scan.tokens)
    out.trainable_tokens.push_back({t.module, t.indices, t.rows->to_matrix<float>(), t.rows->type});
  out.skipped = std::move(scan.skipped);
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
  if (adapter.modules.empty() && adapter.params.empty() && adapter.saved.empty() && adapter.trainable_tokens.empty())
    lora::detail::fail("{}: cannot save a PEFT adapter without modules", folder.string());
  PeftConfig cfg = adapter.config;
  for (const auto& w : adapter.params)  // written as loaded: the config must still select them, with their rank
    if (cfg.parameters_targeted(w.module).empty() ||
        (!w.parameter.empty() && (cfg.rank_for(w.module + "." + w.parameter) != w.rank ||
                                  cfg.alpha_for(w.module + "." + w.parameter) != w.alpha)))
      lora::detail::fail("{}: parameter LoRA '{}' (r {}, alpha {}) is not what the config's target_parameters, "
                         "rank_pattern and alpha_pattern give", folder.string(), w.name(), w.rank, w.alpha);
  const bool dora = !adapter.modules.empty() && adapter.modules.front().is_dora();
  cfg.use_dora = dora;
  if (!adapter.modules.empty()) cfg.set_scaling_policy(adapter.modules.front().adapter.policy());
  // fan_in_fan_out is the Linear modules' (an embedding module always has it set).
  for (const auto& m : adapter.modules)
    if (!m.is_embedding()) {
      cfg.fan_in_fan_out = m.adapter.fan_in_fan_out();
      break;
    }
  cfg.lora_bias = std::any_of(adapter.modules.begin(), adapter.modules.end(),
                              [](const PeftModule& m) { return m.lora_bias.has_value(); });
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
    if (a.policy() != cfg.scaling_policy())
      lora::detail::fail("{}: module '{}' uses {} scaling but module '{}' uses {}; PEFT has one use_rslora",
                         folder.string(), m.name, a.policy().rule(), adapter.modules.front().name,
                         adapter.modules.front().adapter.policy().rule());
    if (!m.is_embedding() && a.fan_in_fan_out() != cfg.fan_in_fan_out)
      lora::detail::fail("{}: module '{}' has fan_in_fan_out = {} unlike module '{}'", folder.string(), m.name,
                         a.fan_in_fan_out(), adapter.modules.front().name);
    if (m.is_embedding() && !a.fan_in_fan_out())
      lora::detail::fail("{}: embedding module '{}' must have fan_in_fan_out set (A [r × vocab], B [dim × r])",
                         folder.string(), m.name);
    if (m.lora_bias && m.lora_bias->size() != a.out_features())
      lora::detail::fail("{}: module '{}': lora_B.bias has {} elements, expected out = {}", folder.string(), m.name,
                         m.lora_bias->size(), a.out_features());
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
    cfg.exclude_modules.clear();
    cfg.exclude_modules_regex.reset();
  }
  for (const auto& m : adapter.modules)
    if (!cfg.targets(m.name))
      lora::detail::fail("{}: module '{}' is also in modules_to_save, where PEFT puts no adapter", folder.string(),
                         m.name);
  for (const auto& t : adapter.trainable_tokens) {  // the config must give each embedding its token ids
    bool listed = false;
    for (const auto& [target, ids] : cfg.trainable_token_indices)
      if ((target.empty() || t.module == target || detail::ends_with(t.module, "." + target)) && ids == t.indices)
        listed = true;
    if (!listed) {
      std::erase_if(cfg.trainable_token_indices, [&](const auto& e) { return e.first.empty() || e.first == t.module; });
      cfg.trainable_token_indices.emplace_back(t.module, t.indices);
    }
  }
  for (const auto& m : adapter.modules) {  // the exact-path patterns must now give each module its own r and alpha
    if (cfg.rank_for(m.name) != m.adapter.rank() || cfg.alpha_for(m.name) != m.adapter.alpha() * m.adapter.multiplier())
      lora::detail::fail("{}: module '{}': cannot express its rank/alpha in rank_pattern/alpha_pattern", folder.string(),
                         m.name);
  }

  std::vector<TensorData> tensors;
  tensors.reserve(adapter.modules.size() * 3 + adapter.saved.size() + adapter.trainable_tokens.size());
  for (const auto& m : adapter.modules) {
    const std::string key = detail::peft_prefix() + m.name;
    const bool emb = m.is_embedding();
    tensors.push_back(TensorData::from_matrix(key + (emb ? ".lora_embedding_A" : ".lora_A.weight"), m.adapter.A(), type));
    tensors.push_back(TensorData::from_matrix(key + (emb ? ".lora_embedding_B" : ".lora_B.weight"), m.adapter.B(), type));
    if (m.lora_bias) {
      const Vector<float>& v = *m.lora_bias;
      tensors.push_back(TensorData::from_values(key + ".lora_B.bias", v.data(), {v.size()}, type));
    }
    if (m.is_dora()) {
      const Vector<float>& v = m.adapter.magnitude();
      tensors.push_back(TensorData::from_values(key + ".lora_magnitude_vector", v.data(), {v.size()}, type));
    }
  }
  for (const auto& w : adapter.params) {
    tensors.push_back(TensorData::from_matrix(detail::peft_prefix() + w.path + ".lora_A.weight", w.A, type));
    tensors.push_back(TensorData::from_matrix(detail::peft_prefix() + w.path + ".lora_B.weight", w.B, type));
  }
  // Whole tensors keep their stored dtype (they are base weights, as PEFT saves them).
  for (const auto& t : adapter.saved) {
    std::string key = t.key;
    if (t.role == PeftSavedTensor::Role::base_layer) key = t.module + ".base_layer" + t.key.substr(t.module.size());
    TensorData d = t.data;
    d.name = detail::peft_prefix() + key;
    tensors.push_back(std::move(d));
  }
  for (const auto& t : adapter.trainable_tokens)
    tensors.push_back(TensorData::from_matrix(detail::peft_prefix() + t.module + ".token_adapter.trainable_tokens_delta",
                                              t.rows, type));
  std::sort(tensors.begin(), tensors.end(), [](const TensorData& a, const TensorData& b) { return a.name < b.name; });
  for (std::size_t i = 1; i < tensors.size(); ++i)
    if (tensors[i].name == tensors[i - 1].name)
      lora::detail::fail("{}: tensor '{}' would be written twice", folder.string(), tensors[i].name);
  const std::string config_text = cfg.to_json().dump(2) + "\n";
  const std::string weights = serialize_safetensors(tensors, {{"format", "pt"}});
  write_folder_atomically(folder, [&](const std::filesystem::path& tmp) {
    write_bytes(tmp / "adapter_config.json", config_text);
    write_bytes(tmp / "adapter_model.safetensors", weights);
  });
}

}  // namespace lora::io
