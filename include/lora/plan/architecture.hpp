#pragma once
// The linear layers of a transformer checkpoint, from its Hugging Face
// config.json or a named preset: what an adapter plan counts over.

#include <lora/error.hpp>
#include <lora/io/json.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace lora::plan {

/// One adaptable layer: a linear (or Conv1D) projection of a block.
struct LinearModule {
  std::string name;  ///< full path, e.g. model.layers.0.self_attn.q_proj
  std::string kind;  ///< last path component, e.g. q_proj (what target_modules names)
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  bool fan_in_fan_out = false;  ///< GPT-2's Conv1D stores W as [in × out]
  bool has_bias = false;
  bool embedding = false;  ///< an embedding table (LoRA on it has A [r × vocab], B [hidden × r])
};

/// A model's shape: every adaptable module, and the count of all parameters.
struct Architecture {
  std::string name;        ///< preset name or the config's model_type
  std::string model_type;  ///< llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, mixtral, qwen2_moe, gpt2
  std::int64_t hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  bool tied_embeddings = false;
  std::vector<LinearModule> modules;  ///< the linear projections of the blocks, in model order, plus lm_head
  std::int64_t total_parameters = 0;  ///< every parameter of the base model
  std::int64_t embedding_parameters = 0;  ///< embeddings + lm_head (kept in 16-bit under NF4)
};

namespace detail {
/// The largest dimension (and head product) accepted: with at most 2^14 layers every
/// parameter count stays below 2^63.
inline constexpr std::int64_t max_dimension = std::int64_t{1} << 22;

inline std::int64_t get_int(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key)) lora::detail::fail("{}: missing integer field '{}'", where, key);
  // Bounds far above any real model keep every count below 2^63 and the per-layer module
  // list small (num_hidden_layers = 99999999999 used to exhaust memory). 4096.0 is read
  // as 4096, as Python's transformers would use it; 2^64 - 1 and 1e300 are out of range.
  const bool layers = std::string_view(key) == "num_hidden_layers" || std::string_view(key) == "n_layer";
  return lora::io::json_int_value(j[key], fmt::format("field '{}'", key), where, 1,
                                  layers ? (std::int64_t{1} << 14) : max_dimension);
}
inline std::int64_t get_int_or(const nlohmann::json& j, const char* key, std::int64_t fallback,
                               const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return get_int(j, key, where);
}
}  // namespace detail

/// Builds the module list from a config.json object (llama, mistral, qwen2, qwen3,
/// gemma, gemma2, phi3, mixtral, qwen2_moe and gpt2 families; grouped-query attention via
/// num_key_value_heads; phi3's fused qkv_proj and gate_up_proj; mixtral's
/// block_sparse_moe.experts.E.{w1,w2,w3} and router gate; qwen2_moe's mlp.experts.E.*,
/// shared_expert and gates; GPT-2's fused c_attn and Conv1D orientation). Any other
/// model_type is refused by name with the list of supported ones.
inline Architecture architecture_from_config(const nlohmann::json& cfg, std::string where = "config.json") {
  if (!cfg.is_object()) lora::detail::fail("{}: expected a JSON object", where);
  const std::string mt = lora::io::json_string_opt(cfg, "model_type", where).value_or("");
  Architecture a;
  a.model_type = mt;
  a.name = mt;
  using lora::plan::detail::get_int;
  using lora::plan::detail::get_int_or;
  const bool gemma = mt == "gemma" || mt == "gemma2";
  if (mt == "llama" || mt == "mistral" || mt == "qwen2" || mt == "qwen3" || gemma || mt == "phi3" || mt == "mixtral" ||
      mt == "qwen2_moe") {
    a.hidden = get_int(cfg, "hidden_size", where);
    a.intermediate = get_int(cfg, "intermediate_size", where);
    a.layers = get_int(cfg, "num_hidden_layers", where);
    a.heads = get_int(cfg, "num_attention_heads", where);
    a.kv_heads = get_int_or(cfg, "num_key_value_heads", a.heads, where);
    // Grouped-query attention shares each key/value head among heads / kv_heads query heads.
    if (a.heads % a.kv_heads != 0)
      lora::detail::fail("{}: num_key_value_heads = {} does not divide num_attention_heads = {}", where, a.kv_heads,
                         a.heads);
    const bool explicit_head_dim = cfg.contains("head_dim") && !cfg["head_dim"].is_null();
    if (!explicit_head_dim && a.hidden % a.heads != 0)
      lora::detail::fail("{}: hidden_size = {} is not divisible by num_attention_heads = {} (and no head_dim is given)",
                         where, a.hidden, a.heads);
    a.head_dim = get_int_or(cfg, "head_dim", a.hidden / a.heads, where);
    a.vocab = get_int(cfg, "vocab_size", where);
    // Gemma's configs tie the embeddings unless they say otherwise.
    a.tied_embeddings = lora::io::json_bool(cfg, "tie_word_embeddings", gemma, where);
    const bool qkv_bias = mt == "qwen2" || mt == "qwen2_moe" || lora::io::json_bool(cfg, "attention_bias", false, where);
    // Mixture of experts: experts per layer and their width.
    std::int64_t experts = 0, expert_inter = a.intermediate, shared_inter = 0;
    if (mt == "mixtral") experts = get_int(cfg, "num_local_experts", where);
    if (mt == "qwen2_moe") {
      experts = get_int(cfg, "num_experts", where);
      expert_inter = get_int(cfg, "moe_intermediate_size", where);
      shared_inter = get_int_or(cfg, "shared_expert_intermediate_size", 0, where);
    }
    if (experts > 1024) lora::detail::fail("{}: {} experts per layer is more than the supported 1024", where, experts);
    const std::int64_t q = a.heads * a.head_dim, kv = a.kv_heads * a.head_dim;  // each factor ≤ 2^22: no overflow
    if (q > detail::max_dimension)
      lora::detail::fail("{}: num_attention_heads × head_dim = {} × {} = {} is more than the supported {}", where,
                         a.heads, a.head_dim, q, detail::max_dimension);
    std::int64_t total = a.vocab * a.hidden;  // embed_tokens
    a.modules.push_back({"model.embed_tokens", "embed_tokens", a.vocab, a.hidden, false, false, true});
    for (std::int64_t l = 0; l < a.layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      auto add = [&](const std::string& path, const char* kind, std::int64_t in, std::int64_t out, bool bias) {
        a.modules.push_back({p + path, kind, in, out, false, bias, false});
        total += in * out + (bias ? out : 0);
      };
      if (mt == "phi3") {  // fused projections
        add("self_attn.qkv_proj", "qkv_proj", a.hidden, q + 2 * kv, false);
        add("self_attn.o_proj", "o_proj", q, a.hidden, false);
        add("mlp.gate_up_proj", "gate_up_proj", a.hidden, 2 * a.intermediate, false);
        add("mlp.down_proj", "down_proj", a.intermediate, a.hidden, false);
      } else {
        add("self_attn.q_proj", "q_proj", a.hidden, q, qkv_bias);
        add("self_attn.k_proj", "k_proj", a.hidden, kv, qkv_bias);
        add("self_attn.v_proj", "v_proj", a.hidden, kv, qkv_bias);
        add("self_attn.o_proj", "o_proj", q, a.hidden, false);
      }
      if (mt == "mixtral") {
        add("block_sparse_moe.gate", "gate", a.hidden, experts, false);
        for (std::int64_t e = 0; e < experts; ++e) {
          const std::string x = "block_sparse_moe.experts." + std::to_string(e) + ".";
          add(x + "w1", "w1", a.hidden, a.intermediate, false);
          add(x + "w2", "w2", a.intermediate, a.hidden, false);
          add(x + "w3", "w3", a.hidden, a.intermediate, false);
        }
      } else if (mt == "qwen2_moe") {
        add("mlp.gate", "gate", a.hidden, experts, false);
        for (std::int64_t e = 0; e < experts; ++e) {
          const std::string x = "mlp.experts." + std::to_string(e) + ".";
          add(x + "gate_proj", "gate_proj", a.hidden, expert_inter, false);
          add(x + "up_proj", "up_proj", a.hidden, expert_inter, false);
          add(x + "down_proj", "down_proj", expert_inter, a.hidden, false);
        }
        if (shared_inter > 0) {
          add("mlp.shared_expert.gate_proj", "gate_proj", a.hidden, shared_inter, false);
          add("mlp.shared_expert.up_proj", "up_proj", a.hidden, shared_inter, false);
          add("mlp.shared_expert.down_proj", "down_proj", shared_inter, a.hidden, false);
          add("mlp.shared_expert_gate", "shared_expert_gate", a.hidden, 1, false);
        }
      } else if (mt != "phi3") {
        add("mlp.gate_proj", "gate_proj", a.hidden, a.intermediate, false);
        add("mlp.up_proj", "up_proj", a.hidden, a.intermediate, false);
        add("mlp.down_proj", "down_proj", a.intermediate, a.hidden, false);
      }
      total += (mt == "gemma2" ? 4 : 2) * a.hidden;  // input/post-attention (gemma2: + pre/post-feedforward) norms
      if (mt == "qwen3") total += 2 * a.head_dim;  // q_norm, k_norm
    }
    total += a.hidden;  // final norm
    a.modules.push_back({"lm_head", "lm_head", a.hidden, a.vocab, false, false, false});
    a.embedding_parameters = a.vocab * a.hidden;
    if (!a.tied_embeddings) {
      total += a.vocab * a.hidden;
      a.embedding_parameters += a.vocab * a.hidden;
    }
    a.total_parameters = total;
  } else if (mt == "gpt2") {
    a.hidden = get_int(cfg, "n_embd", where);
    a.layers = get_int(cfg, "n_layer", where);
    a.heads = get_int(cfg, "n_head", where);
    if (a.hidden % a.heads != 0)
      lora::detail::fail("{}: n_embd = {} is not divisible by n_head = {}", where, a.hidden, a.heads);
    a.kv_heads = a.heads;
    a.head_dim = a.hidden / a.heads;
    a.intermediate = get_int_or(cfg, "n_inner", 4 * a.hidden, where);
    a.vocab = get_int(cfg, "vocab_size", where);
    const std::int64_t positions = get_int_or(cfg, "n_positions", 1024, where);
    a.tied_embeddings = true;
    std::int64_t total = a.vocab * a.hidden + positions * a.hidden;  // wte, wpe
    a.modules.push_back({"transformer.wte", "wte", a.vocab, a.hidden, false, false, true});
    for (std::int64_t l = 0; l < a.layers; ++l) {
      const std::string p = "transformer.h." + std::to_string(l) + ".";
      auto add = [&](const std::string& path, const char* kind, std::int64_t in, std::int64_t out) {
        a.modules.push_back({p + path, kind, in, out, true, true, false});
        total += in * out + out;
      };
      add("attn.c_attn", "c_attn", a.hidden, 3 * a.hidden);  // fused q, k, v
      add("attn.c_proj", "c_proj", a.hidden, a.hidden);
      add("mlp.c_fc", "c_fc", a.hidden, a.intermediate);
      add("mlp.c_proj", "c_proj", a.intermediate, a.hidden);
      total += 4 * a.hidden;  // ln_1, ln_2 (weight + bias)
    }
    total += 2 * a.hidden;  // ln_f
    a.embedding_parameters = a.vocab * a.hidden + positions * a.hidden;
    a.total_parameters = total;  // lm_head is tied to wte
  } else {
    lora::detail::fail("{}: model_type '{}' is not supported (expected llama, mistral, qwen2, qwen3, gemma, gemma2, "
                       "phi3, mixtral, qwen2_moe or gpt2): its linear shapes cannot be derived here",
                       where, mt.empty() ? "<missing>" : mt);
  }
  return a;
}

/// Reads a config.json file (or a folder containing one).
inline Architecture architecture_from_file(const std::filesystem::path& path) {
  std::filesystem::path p = path;
  if (std::filesystem::is_directory(p)) p /= "config.json";
  // regular files only (a FIFO blocked forever), nesting bounded, messages naming p
  return architecture_from_config(lora::io::read_json_file(p), p.string());
}

/// The named presets: the config.json fields of well-known checkpoints.
inline const std::map<std::string, nlohmann::json>& presets() {
  static const std::map<std::string, nlohmann::json> p = [] {
    auto llama = [](int h, int inter, int layers, int heads, int kv, int vocab, bool tied, int head_dim = 0) {
      nlohmann::json j = {{"model_type", "llama"}, {"hidden_size", h}, {"intermediate_size", inter},
                          {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                          {"num_key_value_heads", kv}, {"vocab_size", vocab}, {"tie_word_embeddings", tied}};
      if (head_dim) j["head_dim"] = head_dim;
      return j;
    };
    std::map<std::string, nlohmann::json> m;
    m["llama-2-7b"] = llama(4096, 11008, 32, 32, 32, 32000, false);
    m["llama-2-13b"] = llama(5120, 13824, 40, 40, 40, 32000, false);
    m["llama-3-8b"] = llama(4096, 14336, 32, 32, 8, 128256, false);
    m["llama-3.1-8b"] = llama(4096, 14336, 32, 32, 8, 128256, false);
    m["llama-3.1-70b"] = llama(8192, 28672, 80, 64, 8, 128256, false);
    m["llama-3.2-1b"] = llama(2048, 8192, 16, 32, 8, 128256, true, 64);
    m["llama-3.2-3b"] = llama(3072, 8192, 28, 24, 8, 128256, true, 128);
    nlohmann::json mistral = llama(4096, 14336, 32, 32, 8, 32000, false);
    mistral["model_type"] = "mistral";
    m["mistral-7b"] = mistral;
    nlohmann::json qwen = llama(3584, 18944, 28, 28, 4, 152064, false);
    qwen["model_type"] = "qwen2";
    m["qwen2-7b"] = qwen;
    m["gpt2"] = {{"model_type", "gpt2"}, {"n_embd", 768}, {"n_layer", 12}, {"n_head", 12}, {"vocab_size", 50257},
                 {"n_positions", 1024}};
    m["gpt2-medium"] = {{"model_type", "gpt2"}, {"n_embd", 1024}, {"n_layer", 24}, {"n_head", 16},
                        {"vocab_size", 50257}, {"n_positions", 1024}};
    return m;
  }();
  return p;
}

/// A preset by name ("llama-3-8b", ...), or a config.json path.
inline Architecture architecture(std::string_view name_or_path) {
  const auto& p = presets();
  if (auto it = p.find(std::string(name_or_path)); it != p.end()) {
    Architecture a = architecture_from_config(it->second, it->first);
    a.name = it->first;
    return a;
  }
  if (std::filesystem::exists(name_or_path)) return architecture_from_file(name_or_path);
  std::string names;
  for (auto& [k, v] : p) names += (names.empty() ? "" : ", ") + k;
  lora::detail::fail("'{}' is neither a config.json path nor a preset (presets: {})", name_or_path, names);
}

}  // namespace lora::plan
