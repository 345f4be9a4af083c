#pragma once
// LoRA adapters between PEFT folders and llama.cpp's GGUF adapter files, both ways.
//
//   auto out = lora::io::peft_to_gguf("my-adapter/", "Llama-3-8B/", {.outtype = lora::io::ggml_type::F16});
//   lora::io::write_gguf("my-adapter.gguf", out.metadata, out.tensors);   // or convert_peft_to_gguf(...)
//   for (auto& f : out.folded) fmt::print("{}: B ×{}\n", f.module, f.factor);
//   lora::io::PeftAdapter back = lora::io::load_gguf_adapter("my-adapter.gguf", {.base = "Llama-3-8B/"});
//
// What llama.cpp's convert_lora_to_gguf.py writes, and so what peft_to_gguf writes:
// - tensors `<gguf base name>.lora_a` = lora_A [r × in] (ne = [in, r]) and `.lora_b` = lora_B
//   [out × r] (ne = [r, out]), named by the base model's tensor map (model.layers.3.self_attn.q_proj
//   -> blk.3.attn_q.weight); for LLaMA-family bases (llama, mistral) the rows of lora_b of
//   q_proj/k_proj are permuted as convert_hf_to_gguf permutes the base weights (n_head resp.
//   n_kv_head); the embedding's lora_a is lora_embedding_A transposed ([vocab × r]) and its
//   lora_b is lora_embedding_B.
// - metadata general.architecture, general.type = adapter, adapter.type = lora, general.name
//   (the adapter folder's name, title-cased), general.base_model.* and general.tags from the
//   folder's README.md front matter, adapter.lora.alpha (float32), general.quantization_version.
// llama.cpp scales every pair by adapter.lora.alpha / r with r = lora_b's ne[0] (1 if alpha is 0);
// PEFT scales by alpha_m / r_m (alpha_m / √r_m with rsLoRA, alpha_m from alpha_pattern). Where the
// two differ, peft_to_gguf multiplies lora_b by s_PEFT / s_llama.cpp, so that llama.cpp computes
// PEFT's ΔW exactly; the converter does not (it ignores use_rslora and alpha_pattern).

#include <lora/core/adapter.hpp>
#include <lora/core/embedding.hpp>
#include <lora/error.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/gguf.hpp>
#include <lora/io/peft.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace lora::io {

/// What conversion needs to know about the base model.
struct GgufBaseModel {
  std::string hf_architecture;  ///< e.g. "LlamaForCausalLM" (empty when read from a GGUF)
  std::string architecture;     ///< llama.cpp's name: llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3
  int n_head = 0;
  int n_head_kv = 0;
  /// Whether q_proj/k_proj rows are permuted (LlamaModel.permute in convert_hf_to_gguf.py).
  bool permutes_qk() const { return architecture == "llama"; }
};

namespace detail {

struct GgufArchRow {
  const char* hf;
  const char* arch;
};
inline constexpr GgufArchRow gguf_archs[] = {
    {"LlamaForCausalLM", "llama"},   {"MistralForCausalLM", "llama"}, {"Qwen2ForCausalLM", "qwen2"},
    {"Qwen3ForCausalLM", "qwen3"},   {"GemmaForCausalLM", "gemma"},   {"Gemma2ForCausalLM", "gemma2"},
    {"Gemma3ForCausalLM", "gemma3"}, {"Phi3ForCausalLM", "phi3"},
};

/// Per-layer HF module suffix -> GGUF tensor (gguf-py's tensor_mapping for these families).
inline const std::vector<std::pair<std::string, std::string>>& gguf_layer_map(const std::string& arch) {
  static const std::vector<std::pair<std::string, std::string>> common = {
      {"self_attn.q_proj", "attn_q"},   {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  static const std::vector<std::pair<std::string, std::string>> phi3 = {
      {"self_attn.qkv_proj", "attn_qkv"}, {"self_attn.o_proj", "attn_output"}, {"mlp.gate_up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  return arch == "phi3" ? phi3 : common;
}

inline bool is_gemma(const std::string& arch) { return arch.rfind("gemma", 0) == 0; }

/// "model.layers.3.self_attn.q_proj" -> "blk.3.attn_q" (without ".weight"), or nullopt.
inline std::optional<std::string> gguf_name_of(const std::string& module, const std::string& arch) {
  if (module == "model.embed_tokens") return "token_embd";
  if (module == "lm_head" && !is_gemma(arch)) return "output";  // gemma ties lm_head to the embedding
  const std::string pre = "model.layers.";
  if (module.rfind(pre, 0) != 0) return std::nullopt;
  const auto dot = module.find('.', pre.size());
  if (dot == std::string::npos || dot == pre.size()) return std::nullopt;
  const std::string layer = module.substr(pre.size(), dot - pre.size());
  if (!std::all_of(layer.begin(), layer.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  const std::string rest = module.substr(dot + 1);
  for (const auto& [hf, gg] : gguf_layer_map(arch))
    if (rest == hf) return "blk." + layer + "." + gg;
  return std::nullopt;
}

/// The inverse: "blk.3.attn_q" -> "model.layers.3.self_attn.q_proj".
inline std::optional<std::string> hf_name_of(const std::string& gguf, const std::string& arch) {
  if (gguf == "token_embd") return "model.embed_tokens";
  if (gguf == "output" && !is_gemma(arch)) return "lm_head";
  if (gguf.rfind("blk.", 0) != 0) return std::nullopt;
  const auto dot = gguf.find('.', 4);
  if (dot == std::string::npos || dot == 4) return std::nullopt;
  const std::string layer = gguf.substr(4, dot - 4);
  if (!std::all_of(layer.begin(), layer.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  const std::string rest = gguf.substr(dot + 1);
  for (const auto& [hf, gg] : gguf_layer_map(arch))
    if (rest == gg) return "model.layers." + layer + "." + hf;
  return std::nullopt;
}

/// convert_hf_to_gguf's LlamaModel.permute on rows: row h·hd + i·hd/2 + j moves to h·hd + 2j + i.
inline Matrix<float> permute_qk_rows(const Matrix<float>& m, int n_head, bool inverse, const std::string& who) {
  const Index rows = m.rows();
  if (n_head <= 0 || rows % (2 * n_head) != 0)
    lora::detail::fail("{}: {} rows cannot be split into {} heads of an even size (q/k row permutation)", who, rows,
                       n_head);
  const Index hd = rows / n_head, half = hd / 2;
  Matrix<float> out(rows, m.cols());
  for (Index h = 0; h < n_head; ++h)
    for (Index i = 0; i < 2; ++i)
      for (Index j = 0; j < half; ++j) {
        const Index hf_row = h * hd + i * half + j, gguf_row = h * hd + 2 * j + i;
        if (inverse)
          out.row(hf_row) = m.row(gguf_row);
        else
          out.row(gguf_row) = m.row(hf_row);
      }
  return out;
}

/// Python's str.title() on ASCII, and gguf-py's Metadata.id_to_title.
inline std::string id_to_title(std::string s) {
  for (char& c : s)
    if (c == '-') c = ' ';
  std::istringstream in(s);
  std::string w, out;
  while (in >> w) {
    bool has_cased = false, all_lower = true;
    for (char c : w)
      if (std::isalpha(static_cast<unsigned char>(c))) {
        has_cased = true;
        if (std::isupper(static_cast<unsigned char>(c))) all_lower = false;
      }
    const bool version = (w.size() > 1 && w[0] == 'v' && std::isdigit(static_cast<unsigned char>(w[1]))) ||
                         std::isdigit(static_cast<unsigned char>(w[0]));
    if (has_cased && all_lower && !version) {
      bool prev_alpha = false;
      for (char& c : w) {
        const bool a = std::isalpha(static_cast<unsigned char>(c));
        if (a) c = static_cast<char>(prev_alpha ? std::tolower(c) : std::toupper(c));
        prev_alpha = a;
      }
    }
    out += (out.empty() ? "" : " ") + w;
  }
  return out;
}

/// base_model and tags from the YAML front matter of a model card (the subset PEFT writes:
/// `key: value` and `key:` followed by `- item` lines).
inline std::map<std::string, std::vector<std::string>> model_card_lists(const std::filesystem::path& readme) {
  std::map<std::string, std::vector<std::string>> out;
  std::ifstream in(readme);
  if (!in) return out;
  std::string line, key;
  if (!std::getline(in, line) || line.rfind("---", 0) != 0) return out;
  auto trim = [](std::string s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
    std::size_t b = 0;
    while (b < s.size() && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
    s = s.substr(b);
    if (s.size() >= 2 && (s.front() == '"' || s.front() == '\'') && s.back() == s.front()) s = s.substr(1, s.size() - 2);
    return s;
  };
  while (std::getline(in, line) && line.rfind("---", 0) != 0) {
    const std::string t = trim(line);
    if (t.rfind("- ", 0) == 0 && !key.empty()) {
      out[key].push_back(trim(t.substr(2)));
    } else if (auto c = line.find(':'); c != std::string::npos && !std::isspace(static_cast<unsigned char>(line[0]))) {
      key = trim(line.substr(0, c));
      const std::string v = trim(line.substr(c + 1));
      if (!v.empty()) out[key].push_back(v);
    }
  }
  return out;
}

inline GgufBaseModel base_from_hf_config(const std::filesystem::path& folder) {
  const auto file = std::filesystem::is_directory(folder) ? folder / "config.json" : folder;
  const nlohmann::ordered_json j = read_json_file(file);
  const nlohmann::ordered_json& hp = j.contains("text_config") && j["text_config"].is_object() &&
                                             j["text_config"].contains("architectures")
                                         ? j["text_config"]
                                         : j;
  if (!hp.contains("architectures") || !hp["architectures"].is_array() || hp["architectures"].empty() ||
      !hp["architectures"][0].is_string())
    lora::detail::fail("{}: no 'architectures' list", file.string());
  GgufBaseModel b;
  b.hf_architecture = hp["architectures"][0].get<std::string>();
  for (const auto& row : gguf_archs)
    if (b.hf_architecture == row.hf) b.architecture = row.arch;
  if (b.architecture.empty()) {
    std::string known;
    for (const auto& row : gguf_archs) known += (known.empty() ? "" : ", ") + std::string(row.hf);
    lora::detail::fail("{}: architecture '{}' is not one this converter maps (it knows {})", file.string(),
                       b.hf_architecture, known);
  }
  const nlohmann::ordered_json& cfg = j.contains("text_config") && j["text_config"].is_object() ? j["text_config"] : j;
  auto get_int = [&](const char* k) -> std::optional<int> {  // a head count: bounded, never narrowed
    for (const nlohmann::ordered_json* o : {&cfg, &j})
      if (o->contains(k) && (*o)[k].is_number_integer())
        return static_cast<int>(json_int_value((*o)[k], fmt::format("'{}'", k), file.string(), 0, 1 << 20));
    return std::nullopt;
  };
  auto nh = get_int("num_attention_heads");
  if (!nh || *nh <= 0) lora::detail::fail("{}: no positive integer 'num_attention_heads'", file.string());
  b.n_head = *nh;
  auto kv = get_int("num_key_value_heads");
  b.n_head_kv = kv && *kv > 0 ? *kv : b.n_head;
  return b;
}

inline GgufBaseModel base_from_gguf(const std::filesystem::path& file) {
  const GgufFile f = GgufFile::open(file);
  GgufBaseModel b;
  b.architecture = f.value("general.architecture").as_string("general.architecture");
  auto heads = [&](const std::string& key) {  // bounded, never narrowed (2^32 + 4 is not 4 heads)
    const std::int64_t n = f.value(key).as_int(key);
    if (n < 1 || n > (1 << 20))
      lora::detail::fail("{}: {} is {}, expected a head count in [1, 2^20]", file.string(), key, n);
    return static_cast<int>(n);
  };
  const std::string hk = b.architecture + ".attention.head_count";
  b.n_head = heads(hk);
  const std::string kk = hk + "_kv";
  b.n_head_kv = f.find_value(kk) ? heads(kk) : b.n_head;
  return b;
}

}  // namespace detail

/// The GGUF tensor (without ".weight") llama.cpp's converter gives HF module `module` in a
/// base of architecture `arch`: "model.layers.3.self_attn.q_proj" -> "blk.3.attn_q"; nullopt
/// for modules outside the map.
inline std::optional<std::string> gguf_tensor_name(const std::string& module, const std::string& arch) {
  return detail::gguf_name_of(module, arch);
}
/// The inverse of gguf_tensor_name.
inline std::optional<std::string> hf_module_name(const std::string& gguf, const std::string& arch) {
  return detail::hf_name_of(gguf, arch);
}
/// convert_hf_to_gguf.py's LlamaModel.permute on the rows of a q (n_head) or k (n_kv_head)
/// projection, or its inverse: row h·hd + i·hd/2 + j goes to h·hd + 2j + i (hd = rows/n_head).
inline Matrix<float> llama_permute_rows(const Matrix<float>& m, int n_head, bool inverse = false) {
  return detail::permute_qk_rows(m, n_head, inverse, "llama_permute_rows");
}

/// The base model's architecture and head counts, from its HF folder (config.json) or from
/// its GGUF file (general.architecture, <arch>.attention.head_count[_kv]).
inline GgufBaseModel load_gguf_base_model(const std::filesystem::path& base) {
  namespace fs = std::filesystem;
  if (!fs::exists(base)) lora::detail::fail("{}: base model folder or file does not exist", base.string());
  if (!fs::is_directory(base) && base.extension() == ".gguf") return detail::base_from_gguf(base);
  return detail::base_from_hf_config(base);
}

/// A module whose lora_b was multiplied so that llama.cpp's alpha/r gives PEFT's scaling.
struct GgufFold {
  std::string module;
  double peft_scaling = 1;   ///< PEFT's s for the module
  double engine_scaling = 1; ///< what llama.cpp computes from the file: adapter.lora.alpha / r
  double factor = 1;         ///< peft_scaling / engine_scaling, multiplied into lora_b
  std::string reason;        ///< "rsLoRA", "alpha_pattern", ...
};

struct GgufExportOptions {
  ggml_type outtype = ggml_type::F32;  ///< F32, F16, BF16 or Q8_0 (rows not a multiple of 32 fall back to F16)
  std::string name;                    ///< general.name; default: the adapter folder's name, title-cased
};

/// A converted adapter, ready for write_gguf, with what was changed on the way.
struct GgufExport {
  GgufMetadata metadata;
  std::vector<GgufTensorData> tensors;
  std::vector<GgufFold> folded;    ///< modules whose lora_b carries a scale factor
  std::vector<std::string> notes;  ///< tensors skipped as PEFT skips them, type fallbacks
};

/// Converts a PEFT adapter folder for `base` (HF folder or base GGUF) as llama.cpp's
/// convert_lora_to_gguf.py does, folding rsLoRA / alpha_pattern scaling into lora_b.
/// Refuses, with the reason, what a GGUF LoRA adapter cannot hold: DoRA magnitudes,
/// lora_B.bias, modules_to_save copies and trained biases, trainable tokens, fan_in_fan_out.
inline GgufExport peft_to_gguf(const std::filesystem::path& adapter_dir, const std::filesystem::path& base_dir,
                               const GgufExportOptions& opts = {}) {
  const std::string where = adapter_dir.string();
  const GgufBaseModel base = load_gguf_base_model(base_dir);
  const PeftAdapter ad = load_peft_adapter(adapter_dir);
  require_modules_only(ad, fmt::format("{}: conversion to GGUF", adapter_dir.string()));
  const PeftConfig& cfg = ad.config;
  const ggml_type ot = opts.outtype;
  if (ot != ggml_type::F32 && ot != ggml_type::F16 && ot != ggml_type::BF16 && ot != ggml_type::Q8_0)
    lora::detail::fail("{}: output type {} is not one of f32, f16, bf16, q8_0", where, ggml_type_name(ot));
  if (cfg.fan_in_fan_out)
    lora::detail::fail("{}: fan_in_fan_out = true (Conv1D layers, GPT-2 style) is not a family llama.cpp's converter "
                       "maps for LoRA here",
                       where);
  for (const auto& s : ad.saved) {
    if (s.role == PeftSavedTensor::Role::base_layer) continue;  // the converter skips *.base_layer.weight too
    lora::detail::fail("{}: tensor '{}' is a {} tensor (a whole replacement of '{}'): a GGUF LoRA adapter holds only "
                       "lora_a/lora_b pairs, and llama.cpp's convert_lora_to_gguf.py stops on it ('Not a lora_A or "
                       "lora_B tensor')",
                       where, s.data.name, role_name(s.role), s.key);
  }
  if (!ad.trainable_tokens.empty())
    lora::detail::fail("{}: module '{}' has trainable tokens (whole embedding rows): a GGUF LoRA adapter cannot hold "
                       "them and the converter stops on trainable_tokens_delta",
                       where, ad.trainable_tokens.front().module);
  GgufExport out;
  for (const auto& s : ad.skipped) out.notes.push_back(fmt::format("skipped '{}': {}", s.key, s.reason));
  for (const auto& s : ad.saved)
    if (s.role == PeftSavedTensor::Role::base_layer)
      out.notes.push_back(fmt::format("skipped '{}' (the base embedding, as the converter does)", s.data.name));

  const float alpha_file = static_cast<float>(cfg.lora_alpha);  // the converter writes float32(lora_alpha)
  // PEFT's sorted safetensors keys decide the converter's order; "<m>.lora_A..." sorts as <m> does.
  std::vector<const PeftModule*> mods;
  for (const auto& m : ad.modules) mods.push_back(&m);
  std::sort(mods.begin(), mods.end(), [](auto* a, auto* b) { return a->name < b->name; });
  for (const PeftModule* mp : mods) {
    const PeftModule& m = *mp;
    const std::string who = fmt::format("{}: module '{}'", where, m.name);
    if (m.is_dora())
      lora::detail::fail("{}: DoRA (lora_magnitude_vector): llama.cpp has no DoRA, and the converter stops on the "
                         "magnitude ('Not a lora_A or lora_B tensor'); 'lora merge' it into the base instead",
                         who);
    if (m.lora_bias)
      lora::detail::fail("{}: lora_B.bias (lora_bias = true): llama.cpp's LoRA computes only B·A·x "
                         "(src/llama-adapter.cpp has no bias), and the converter stops on it",
                         who);
    const auto gname = detail::gguf_name_of(m.name, base.architecture);
    if (!gname)
      lora::detail::fail("{}: no GGUF tensor name for it in the {} tensor map (the converter would stop here too)", who,
                         base.architecture);
    const auto& a = m.adapter;
    const int r = static_cast<int>(a.rank());
    const double s_peft = a.scaling();
    const double s_llama = alpha_file != 0.0f ? static_cast<double>(alpha_file) / r : 1.0;
    Matrix<float> A = a.A(), B = a.B();
    if (s_peft != s_llama) {
      std::vector<std::string> why;
      if (a.policy().rslora) why.push_back("rsLoRA (alpha/√r)");
      if (a.alpha() != cfg.lora_alpha) why.push_back(fmt::format("alpha_pattern (alpha {})", a.alpha()));
      if (a.multiplier() != 1.0) why.push_back(fmt::format("multiplier {}", a.multiplier()));
      if (alpha_file == 0.0f) why.push_back("lora_alpha 0 (llama.cpp then scales by 1)");
      if (why.empty()) why.push_back("float32 alpha");
      GgufFold f{m.name, s_peft, s_llama, s_peft / s_llama, fmt::format("{}", fmt::join(why, ", "))};
      B = (B.cast<double>() * f.factor).cast<float>();
      out.folded.push_back(std::move(f));
    }
    const bool is_q = m.name.size() > 7 && m.name.substr(m.name.size() - 7) == ".q_proj";
    const bool is_k = m.name.size() > 7 && m.name.substr(m.name.size() - 7) == ".k_proj";
    if (base.permutes_qk() && (is_q || is_k)) B = detail::permute_qk_rows(B, is_q ? base.n_head : base.n_head_kv, false, who);
    if (m.is_embedding()) A = Matrix<float>(A.transpose());  // llm_build_inp_embd gathers rows of lora_a
    const std::string tname = *gname + ".weight";
    for (auto [suffix, mat] : {std::pair<const char*, const Matrix<float>*>{".lora_a", &A}, {".lora_b", &B}}) {
      ggml_type t = ot;
      if (t == ggml_type::Q8_0 && mat->cols() % 32 != 0) {
        out.notes.push_back(fmt::format("{}{}: rows of {} values are not whole Q8_0 blocks; written as F16 (as the "
                                        "converter falls back)",
                                        tname, suffix, mat->cols()));
        t = ggml_type::F16;
      }
      out.tensors.push_back(GgufTensorData::from_matrix(tname + suffix, *mat, t));
    }
  }

  GgufMetadata& md = out.metadata;
  md.emplace_back("general.architecture", GgufValue::string(base.architecture));
  md.emplace_back("general.type", GgufValue::string("adapter"));
  md.emplace_back("adapter.type", GgufValue::string("lora"));
  std::string folder = std::filesystem::absolute(adapter_dir).lexically_normal().filename().string();
  if (folder.empty()) folder = std::filesystem::absolute(adapter_dir).lexically_normal().parent_path().filename().string();
  md.emplace_back("general.name", GgufValue::string(opts.name.empty() ? detail::id_to_title(folder) : opts.name));
  auto card = detail::model_card_lists(adapter_dir / "README.md");
  if (auto it = card.find("base_model"); it != card.end() && !it->second.empty()) {
    md.emplace_back("general.base_model.count", GgufValue::u32(static_cast<std::uint32_t>(it->second.size())));
    for (std::size_t i = 0; i < it->second.size(); ++i) {
      const std::string& id = it->second[i];
      const auto slash = id.find('/');
      const std::string key = fmt::format("general.base_model.{}.", i);
      md.emplace_back(key + "name", GgufValue::string(detail::id_to_title(slash == std::string::npos ? id : id.substr(slash + 1))));
      if (slash != std::string::npos) {
        md.emplace_back(key + "organization", GgufValue::string(detail::id_to_title(id.substr(0, slash))));
        md.emplace_back(key + "repo_url", GgufValue::string("https://huggingface.co/" + id));
      }
    }
  }
  if (auto it = card.find("tags"); it != card.end() && !it->second.empty())
    md.emplace_back("general.tags", GgufValue::strings(it->second));
  md.emplace_back("adapter.lora.alpha", GgufValue::f32(alpha_file));
  if (cfg.raw.contains("alora_invocation_tokens") && cfg.raw["alora_invocation_tokens"].is_array()) {
    GgufArray toks{gguf_type::UINT32, {}};
    for (const auto& t : cfg.raw["alora_invocation_tokens"]) {
      if (!t.is_number_unsigned()) lora::detail::fail("{}: alora_invocation_tokens must be token ids", where);
      toks.items.push_back(GgufValue::u32(t.get<std::uint32_t>()));
    }
    md.emplace_back("adapter.alora.invocation_tokens", GgufValue::array(std::move(toks)));
  }
  md.emplace_back("general.quantization_version", GgufValue::u32(2));
  return out;
}

/// peft_to_gguf, then write_gguf to `out` (atomic). Refuses to write over an input.
inline GgufExport convert_peft_to_gguf(const std::filesystem::path& adapter_dir, const std::filesystem::path& base,
                                       const std::filesystem::path& out, const GgufExportOptions& opts = {}) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(out) && (fs::equivalent(out, base, ec) || fs::equivalent(out, adapter_dir, ec)))
    lora::detail::fail("{}: is an input of the conversion; choose another output path", out.string());
  GgufExport e = peft_to_gguf(adapter_dir, base, opts);
  write_gguf(out, e.metadata, e.tensors);
  return e;
}

struct GgufImportOptions {
  /// The base model (HF folder or base GGUF): needed to undo the q/k row permutation of
  /// LLaMA-family adapters.
  std::filesystem::path base;
  /// Keep q/k lora_b rows in llama.cpp's order when no base is given (spectra and subspace
  /// similarities do not change under a row permutation; ΔW does).
  bool keep_gguf_row_order = false;
};

/// Reads a GGUF LoRA adapter into the in-memory adapter type the PEFT loader returns:
/// module names are the HF ones, alpha = adapter.lora.alpha for every module (r from each
/// tensor, so PEFT's alpha/r is llama.cpp's scale; with alpha 0 llama.cpp uses 1, and alpha
/// = r is set), ranks other than the most common one go into rank_pattern, token_embd
/// becomes an embedding module. Tensors of any type GgufTensorView dequantises are read.
/// This overload reads a file already opened or held in memory (GgufFile::from_bytes).
inline PeftAdapter load_gguf_adapter(const GgufFile& f, const GgufImportOptions& opts = {}) {
  const std::string where = f.path();
  const auto* gt = f.find_value("general.type");
  if (!gt || gt->type != gguf_type::STRING || gt->as_string() != "adapter")
    lora::detail::fail("{}: general.type is {}, expected 'adapter' (this is not a LoRA adapter GGUF)", where,
                       gt && gt->type == gguf_type::STRING ? "'" + gt->as_string() + "'" : std::string("missing"));
  const auto* at = f.find_value("adapter.type");
  if (!at || at->type != gguf_type::STRING || at->as_string() != "lora")
    lora::detail::fail("{}: adapter.type is not 'lora'", where);
  const std::string arch = f.value("general.architecture").as_string("general.architecture");
  const double alpha = f.find_value("adapter.lora.alpha") ? f.value("adapter.lora.alpha").as_double("adapter.lora.alpha") : 0.0;
  std::optional<GgufBaseModel> base;
  if (!opts.base.empty()) {
    base = load_gguf_base_model(opts.base);
    if (base->architecture != arch)
      lora::detail::fail("{}: the adapter is for architecture '{}', the base {} is '{}'", where, arch,
                         opts.base.string(), base->architecture);
  }
  struct Pair {
    const GgufTensorView* a = nullptr;
    const GgufTensorView* b = nullptr;
  };
  std::map<std::string, Pair> pairs;
  for (const auto& t : f.tensors()) {
    auto ends = [&](std::string_view s) { return t.name.size() > s.size() && t.name.compare(t.name.size() - s.size(), s.size(), s) == 0; };
    if (ends(".weight.lora_a"))
      pairs[t.name.substr(0, t.name.size() - 14)].a = &t;
    else if (ends(".weight.lora_b"))
      pairs[t.name.substr(0, t.name.size() - 14)].b = &t;
    else
      lora::detail::fail("{}: tensor '{}' is not a '<name>.weight.lora_a/lora_b' LoRA tensor (whole tensors such as "
                         "mergekit's norms cannot be expressed as a PEFT LoRA module)",
                         where, t.name);
  }
  if (pairs.empty()) lora::detail::fail("{}: holds no LoRA tensors", where);
  PeftAdapter out;
  std::map<int, int> rank_count;
  struct Built {
    std::string name;
    Matrix<float> A, B;
    bool embedding;
    ggml_type type;
  };
  std::vector<Built> built;
  for (const auto& [g, p] : pairs) {
    if (!p.a || !p.b)
      lora::detail::fail("{}: tensor '{}.weight.{}' has no partner '{}'", where, g, p.a ? "lora_a" : "lora_b",
                         p.a ? "lora_b" : "lora_a");
    const auto hf = detail::hf_name_of(g, arch);
    if (!hf) lora::detail::fail("{}: tensor '{}.weight' has no HF module name in the {} tensor map", where, g, arch);
    const bool emb = g == "token_embd";
    if (p.a->ne.size() != 2 || p.b->ne.size() != 2)
      lora::detail::fail("{}: tensors '{}' and '{}' must be 2-D", where, p.a->name, p.b->name);
    // before any matrix is formed: an empty factor of a huge extent (ne = [2^47, 0]) would be
    // a 0 × 2^47 matrix that every loop over its other extent takes hours to walk
    for (const GgufTensorView* t : {p.a, p.b})
      if (t->ne[0] < 1 || t->ne[1] < 1)
        lora::detail::fail("{}: tensor '{}' has no elements (ne = [{}, {}]); a LoRA factor has a rank and a width of "
                           "at least 1",
                           where, t->name, t->ne[0], t->ne[1]);
    Matrix<float> a = p.a->to_matrix<float>(), b = p.b->to_matrix<float>();
    if (emb) a = Matrix<float>(a.transpose());
    if (a.rows() != b.cols())
      lora::detail::fail("{}: '{}' has rank {} but '{}' has rank {} (lora_b ne[0])", where, p.a->name, a.rows(),
                         p.b->name, b.cols());
    const bool is_q = g.size() > 7 && g.substr(g.size() - 7) == ".attn_q", is_k = g.size() > 7 && g.substr(g.size() - 7) == ".attn_k";
    if (arch == "llama" && (is_q || is_k)) {
      if (base)
        b = detail::permute_qk_rows(b, is_q ? base->n_head : base->n_head_kv, true, where + ": tensor '" + p.b->name + "'");
      else if (!opts.keep_gguf_row_order)
        lora::detail::fail("{}: tensor '{}' has its rows in llama.cpp's q/k order; give the base model (HF folder or "
                           "GGUF) to restore PEFT's order ('lora convert x.gguf --to peft --base <model>')",
                           where, p.b->name);
    }
    ++rank_count[static_cast<int>(a.rows())];
    built.push_back({*hf, std::move(a), std::move(b), emb, p.a->type});
  }
  std::sort(built.begin(), built.end(), [](const Built& x, const Built& y) { return x.name < y.name; });
  int r0 = rank_count.begin()->first;
  for (const auto& [r, n] : rank_count)
    if (n > rank_count[r0]) r0 = r;
  PeftConfig& cfg = out.config;
  cfg.r = r0;
  cfg.lora_alpha = alpha != 0.0 ? alpha : r0;
  for (const auto& m : built) {
    cfg.target_modules.push_back(m.name);
    const int r = static_cast<int>(m.A.rows());
    if (r != r0) cfg.rank_pattern.emplace_back(m.name, r);
    const double a_m = alpha != 0.0 ? alpha : r;
    if (a_m != cfg.lora_alpha) cfg.alpha_pattern.emplace_back(m.name, a_m);
  }
  if (auto* b = f.find_value("general.base_model.0.name"); b && b->type == gguf_type::STRING)
    cfg.raw = detail::default_peft_config(), cfg.raw["base_model_name_or_path"] = b->as_string();
  for (auto& m : built) {
    AdapterOptions o;
    o.name = m.name;
    const double a_m = cfg.alpha_for(m.name);
    const dtype st = m.type == ggml_type::F16 ? dtype::F16 : m.type == ggml_type::BF16 ? dtype::BF16 : dtype::F32;
    if (m.embedding) {
      out.modules.push_back({m.name, embedding_adapter<float, dynamic_scaling>(std::move(m.A), std::move(m.B), a_m, o, dynamic_scaling{false}),
                             st, PeftModuleKind::embedding, std::nullopt});
    } else {
      out.modules.push_back({m.name,
                             LowRankAdapter<float, cpu, dynamic_scaling>::from_factors(std::move(m.A), std::move(m.B), a_m, o,
                                                                                      dynamic_scaling{false}),
                             st, PeftModuleKind::linear, std::nullopt});
    }
  }
  return out;
}
/// The same from a file.
inline PeftAdapter load_gguf_adapter(const std::filesystem::path& file, const GgufImportOptions& opts = {}) {
  return load_gguf_adapter(GgufFile::open(file), opts);
}

/// Whether `path` is a regular file that starts with the GGUF magic.
inline bool is_gguf_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  char magic[4] = {};
  std::ifstream in(path, std::ios::binary);
  in.read(magic, 4);
  return in && std::string_view(magic, 4) == "GGUF";
}

/// Import options for uses that see PEFT's q/k row order only through a base model: without
/// `base`, llama.cpp's order is kept; with it, the base config is `base` itself (a folder with
/// config.json, or a base GGUF) or the config.json beside it (a model.safetensors), and a
/// base without either makes llama-family q/k adapters fail with the reason.
inline GgufImportOptions gguf_options_near(const std::optional<std::filesystem::path>& base) {
  GgufImportOptions o;
  o.keep_gguf_row_order = !base;
  if (base) {
    namespace fs = std::filesystem;
    if (base->extension() == ".gguf") o.base = *base;
    else if (fs::is_directory(*base) && fs::exists(*base / "config.json")) o.base = *base;
    else if (fs::exists(base->parent_path() / "config.json")) o.base = base->parent_path();
  }
  return o;
}

/// A few lines on a GGUF file for `lora info`: version, alignment, every metadata key (scalars
/// with their value, arrays as [n × TYPE]), and every tensor with type, shape (PyTorch order)
/// and bytes; for a LoRA adapter also the pairs, ranks and llama.cpp's scale alpha/r.
inline std::string gguf_summary(const std::filesystem::path& path) {
  const GgufFile f = GgufFile::open(path);
  std::string out = fmt::format("{}: GGUF v{}, alignment {}, {} metadata keys, {} tensors\n", f.path(), f.version(),
                                f.alignment(), f.metadata().size(), f.tensors().size());
  for (const auto& [k, v] : f.metadata()) {
    std::string val;
    if (v.type == gguf_type::ARRAY) {
      const auto& a = v.as_array();
      val = fmt::format("[{} × {}]", a.items.size(), gguf_type_name(a.type));
      if (a.type == gguf_type::STRING && !a.items.empty() && a.items.size() <= 8) {
        std::vector<std::string> xs;
        for (const auto& x : a.items) xs.push_back(x.as_string());
        val += fmt::format(" {}", fmt::join(xs, ", "));
      }
    } else if (v.type == gguf_type::STRING) {
      val = v.as_string().size() > 60 ? v.as_string().substr(0, 57) + "..." : v.as_string();
    } else if (v.type == gguf_type::BOOL) {
      val = std::get<bool>(v.v) ? "true" : "false";
    } else if (v.type == gguf_type::FLOAT32 || v.type == gguf_type::FLOAT64) {
      val = fmt::format("{:g}", v.as_double());
    } else {
      val = v.type == gguf_type::UINT64 ? fmt::format("{}", std::get<std::uint64_t>(v.v)) : fmt::format("{}", v.as_int());
    }
    out += fmt::format("  {} ({}) = {}\n", k, gguf_type_name(v.type), val);
  }
  std::uint64_t bytes = 0;
  for (const auto& t : f.tensors()) {
    out += fmt::format("  {}  {}  [{}]  {} bytes\n", t.name, ggml_type_name(t.type), fmt::join(t.shape(), ", "), t.bytes.size());
    bytes += t.bytes.size();
  }
  out += fmt::format("{} bytes of tensor data\n", bytes);
  const auto* gt = f.find_value("general.type");
  if (gt && gt->type == gguf_type::STRING && gt->as_string() == "adapter") {
    const double alpha = f.find_value("adapter.lora.alpha") ? f.value("adapter.lora.alpha").as_double() : 0.0;
    std::map<std::int64_t, int> ranks;
    for (const auto& t : f.tensors())
      if (t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".lora_b") == 0 && !t.ne.empty()) ++ranks[t.ne[0]];
    for (const auto& [r, n] : ranks)
      out += fmt::format("LoRA: {} pair(s) of rank {}: llama.cpp scales them by {:g}\n", n, r,
                         alpha != 0 ? alpha / double(r) : 1.0);
  }
  return out;
}

/// A PEFT adapter folder or a GGUF LoRA file, whichever `path` is, as a PeftAdapter.
inline PeftAdapter load_adapter(const std::filesystem::path& path, const GgufImportOptions& gguf = {}) {
  return is_gguf_file(path) ? load_gguf_adapter(path, gguf) : load_peft_adapter(path);
}

/// Writes a GGUF LoRA adapter as a PEFT folder (atomic): load_gguf_adapter, then
/// save_peft_adapter in the GGUF's float type (F16/BF16 if every tensor is, else F32), and a
/// README.md whose front matter carries general.base_model.*.name and general.tags back.
/// The model card (README.md) gguf_to_peft writes for a GGUF adapter: its base models
/// (general.base_model.<i>.organization/name), library_name, its tags, and the file it came
/// from (`source`). Throws lora::error for a base-model count past the keys the file holds.
inline std::string gguf_model_card(const GgufFile& f, const std::string& source) {
  std::string readme = "---\n";
  if (auto* n = f.find_value("general.base_model.count")) {
    // each base model is at least a name key: a count past the keys the file holds is not one
    const std::int64_t count = n->as_int("general.base_model.count");
    if (count < 0 || count > static_cast<std::int64_t>(f.metadata().size()))
      lora::detail::fail("{}: general.base_model.count is {}, but the file holds {} metadata keys", f.path(), count,
                         f.metadata().size());
    // one pass over the keys (a file of n keys asking for n base models is not n² lookups)
    std::map<std::int64_t, std::pair<const GgufValue*, const GgufValue*>> models;  // i -> (organization, name)
    const std::string pre = "general.base_model.";
    for (const auto& [k, v] : f.metadata()) {
      if (k.rfind(pre, 0) != 0) continue;
      const auto dot = k.find('.', pre.size());
      if (dot == std::string::npos || dot == pre.size() || dot - pre.size() > 18) continue;
      const std::string digits = k.substr(pre.size(), dot - pre.size()), field = k.substr(dot + 1);
      if (digits.find_first_not_of("0123456789") != std::string::npos) continue;
      const std::int64_t i = std::stoll(digits);
      if (i >= count) continue;
      if (field == "organization") models[i].first = &v;
      if (field == "name") models[i].second = &v;
    }
    readme += "base_model:\n";
    for (const auto& entry : models) {  // (no structured binding: clang < 16 cannot capture one)
      const auto& [org, name] = entry.second;
      if (!name) continue;
      const auto what = [&](const char* field) { return fmt::format("{}{}.{}", pre, entry.first, field); };
      readme += "- " + (org ? org->as_string(what("organization")) + "/" : std::string()) +
                name->as_string(what("name")) + "\n";
    }
  }
  readme += "library_name: peft\n";
  if (auto* t = f.find_value("general.tags"); t && t->type == gguf_type::ARRAY) {
    readme += "tags:\n";
    for (const auto& x : t->as_array().items)
      if (x.type == gguf_type::STRING) readme += "- " + x.as_string() + "\n";
  }
  readme += fmt::format("---\n\nConverted from {} by `lora convert --to peft`.\n", source);
  return readme;
}

inline void gguf_to_peft(const std::filesystem::path& file, const std::filesystem::path& out_folder,
                         const GgufImportOptions& opts = {}) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(out_folder) && fs::equivalent(out_folder, file, ec))
    lora::detail::fail("{}: is the input; choose another output folder", out_folder.string());
  const GgufFile f = GgufFile::open(file);
  const PeftAdapter ad = load_gguf_adapter(f, opts);
  dtype type = ad.modules.front().stored_dtype;
  for (const auto& m : ad.modules)
    if (m.stored_dtype != type) type = dtype::F32;
  const std::string readme = gguf_model_card(f, file.filename().string());
  write_folder_atomically(out_folder, [&](const fs::path& tmp) {
    save_peft_adapter(tmp, ad, type);
    write_bytes(tmp / "README.md", readme);
  });
}

}  // namespace lora::io
