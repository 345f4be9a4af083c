#pragma once
// What an inference engine would do differently from PEFT with an adapter: scale a module
// differently, ignore tensors, or refuse to load it. Each rule names the engine source file
// it was read from.
//
//   for (const auto& f : lora::io::check_engine("my-adapter/", lora::io::engine::vllm))
//     fmt::print("{} {}: {} [{}]\n", f.kind, f.feature, f.detail, f.source);
//
// Scaling each engine applies (s_PEFT = alpha_m/r_m, or alpha_m/√r_m with use_rslora, with
// alpha_m and r_m from alpha_pattern/rank_pattern):
//   llama.cpp   adapter.lora.alpha / r, r = lora_b's ne[0] per tensor; 1 when alpha is 0
//               (src/llama-adapter.h, get_scale); convert_lora_to_gguf.py writes only lora_alpha.
//   vLLM        one factor for the whole adapter: lora_alpha/r, or lora_alpha/√r with
//               use_rslora (vllm/lora/peft_helper.py, PEFTHelper.__post_init__).
//   TGI         one factor: get_scaling_factor(lora_alpha, r, use_rslora)
//               (server/text_generation_server/adapters/lora.py, LoraWeights.prepare_weights).
//   PEFT        s_PEFT (peft/tuners/lora/layer.py, LoraLayer.update_layer): the reference.

#include <lora/io/gguf.hpp>
#include <lora/io/peft.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace lora::io {

enum class engine { llama_cpp, vllm, tgi, peft };

inline std::string_view engine_name(engine e) {
  switch (e) {
    case engine::llama_cpp: return "llama.cpp";
    case engine::vllm: return "vllm";
    case engine::tgi: return "tgi";
    case engine::peft: return "peft";
  }
  return "?";
}

inline engine parse_engine(std::string_view s) {
  if (s == "llama.cpp" || s == "llama-cpp" || s == "llamacpp") return engine::llama_cpp;
  if (s == "vllm") return engine::vllm;
  if (s == "tgi") return engine::tgi;
  if (s == "peft") return engine::peft;
  lora::detail::fail("unknown engine '{}' (expected llama.cpp, vllm, tgi or peft)", s);
}

/// One thing an engine does differently from PEFT.
struct EngineFinding {
  std::string kind;     ///< "mis-scaled", "ignored", "rejected" or "added"
  std::string feature;  ///< rsLoRA, alpha_pattern, rank_pattern, DoRA, lora_bias, modules_to_save, ...
  std::vector<std::string> modules;  ///< the modules (or tensors) concerned
  double factor = 1;    ///< for "mis-scaled": the engine's scaling / PEFT's
  std::string detail;   ///< what happens, in a sentence
  std::string source;   ///< the engine source file the rule comes from
  bool fixed_by_normalize = false;  ///< `normalize` (and `convert --to gguf` for llama.cpp) removes it
};

namespace detail {

inline const char* llama_adapter_src() { return "src/llama-adapter.h"; }
inline const char* llama_convert_src() { return "convert_lora_to_gguf.py"; }
inline const char* vllm_src() { return "vllm/lora/peft_helper.py"; }
inline const char* tgi_src() { return "server/text_generation_server/adapters/lora.py"; }

/// Groups modules whose engine scaling differs from PEFT's by the same factor and cause.
inline void scale_findings(const PeftAdapter& ad, engine e, std::vector<EngineFinding>& out) {
  const PeftConfig& cfg = ad.config;
  std::map<std::pair<std::string, double>, EngineFinding> groups;
  for (const auto& m : ad.modules) {
    const auto& a = m.adapter;
    const double s_peft = a.scaling();
    double s_eng = 0;
    std::string src, cause;
    if (e == engine::llama_cpp) {
      const double alpha = static_cast<float>(cfg.lora_alpha);
      s_eng = alpha != 0 ? alpha / static_cast<double>(a.rank()) : 1.0;
      src = fmt::format("{} (llama_adapter_lora_weight::get_scale: alpha / lora_b ne[0]); {} (writes only lora_alpha)", llama_adapter_src(),
                        llama_convert_src());
      if (alpha == 0) cause = "lora_alpha 0 (llama.cpp then scales by 1)";
      else if (cfg.use_rslora) cause = "rsLoRA";
      else cause = "alpha_pattern";
    } else if (e == engine::vllm || e == engine::tgi) {
      s_eng = cfg.use_rslora ? cfg.lora_alpha / std::sqrt(double(cfg.r)) : cfg.lora_alpha / double(cfg.r);
      src = e == engine::vllm ? fmt::format("{} (one vllm_lora_scaling_factor from r and lora_alpha)", vllm_src())
                              : fmt::format("{} (get_scaling_factor(lora_alpha, r, use_rslora) for every layer)", tgi_src());
      const bool rank_differs = a.rank() != cfg.r, alpha_differs = a.alpha() != cfg.lora_alpha;
      cause = rank_differs && alpha_differs ? "rank_pattern + alpha_pattern" : rank_differs ? "rank_pattern" : "alpha_pattern";
    } else {
      return;
    }
    if (std::abs(s_eng - s_peft) <= 1e-6 * std::abs(s_peft)) continue;
    const double factor = s_eng / s_peft;
    auto& g = groups[{cause, std::round(factor * 1e9) / 1e9}];
    if (g.modules.empty()) {
      g.kind = "mis-scaled";
      g.feature = cause;
      g.factor = factor;
      g.source = src;
      g.fixed_by_normalize = true;
      g.detail = fmt::format("{} scales by {:g} where PEFT scales by {:g} (×{:g} of PEFT's ΔW)", engine_name(e), s_eng,
                             s_peft, factor);
    }
    g.modules.push_back(m.name);
  }
  for (auto& [k, g] : groups) out.push_back(std::move(g));
}

}  // namespace detail

/// What `e` would mis-scale, ignore, add or reject in the adapter at `path` (a PEFT folder
/// or a GGUF LoRA file), compared with PEFT.
inline std::vector<EngineFinding> check_engine(const std::filesystem::path& path, engine e) {
  namespace fs = std::filesystem;
  std::vector<EngineFinding> out;
  if (fs::is_regular_file(path)) {
    const GgufFile f = GgufFile::open(path);
    if (e != engine::llama_cpp) {
      out.push_back({"rejected", "GGUF", {}, 1,
                     fmt::format("{} loads PEFT folders (adapter_config.json + safetensors), not GGUF; use "
                                 "'lora convert {} --to peft'",
                                 engine_name(e), path.filename().string()),
                     e == engine::vllm ? detail::vllm_src() : e == engine::tgi ? detail::tgi_src() : "peft/peft_model.py",
                     false});
      return out;
    }
    if (const auto* a = f.find_value("adapter.lora.alpha"); !a || a->as_double("adapter.lora.alpha") == 0)
      out.push_back({"mis-scaled", "no adapter.lora.alpha", {}, 1,
                     "llama.cpp scales every pair by 1 when alpha is 0 or missing, whatever r is",
                     detail::llama_adapter_src(), false});
    return out;
  }
  const PeftAdapter ad = load_peft_adapter(path);
  require_modules_only(ad, fmt::format("{}: the engine check", path.string()));
  detail::scale_findings(ad, e, out);
  std::vector<std::string> dora, bias, emb;
  for (const auto& m : ad.modules) {
    if (m.is_dora()) dora.push_back(m.name);
    if (m.lora_bias) bias.push_back(m.name);
    if (m.is_embedding()) emb.push_back(m.name);
  }
  std::vector<std::string> mts, trained_bias, tokens, skipped;
  for (const auto& s : ad.saved) {
    if (s.role == PeftSavedTensor::Role::modules_to_save) mts.push_back(s.module);
    if (s.role == PeftSavedTensor::Role::trained_bias) trained_bias.push_back(s.key);
  }
  for (const auto& t : ad.trainable_tokens) tokens.push_back(t.module);
  for (const auto& s : ad.skipped) skipped.push_back(s.key);
  auto add = [&](const std::vector<std::string>& mods, std::string kind, std::string feature, std::string detail,
                 std::string source) {
    if (!mods.empty()) out.push_back({std::move(kind), std::move(feature), mods, 1, std::move(detail), std::move(source), false});
  };
  switch (e) {
    case engine::llama_cpp: {
      const std::string conv = detail::llama_convert_src();
      add(dora, "rejected", "DoRA", "the converter stops on lora_magnitude_vector ('Not a lora_A or lora_B tensor'); "
          "llama.cpp has no DoRA (merge the adapter into the base instead)", conv);
      add(bias, "rejected", "lora_bias", "the converter stops on lora_B.bias; llama.cpp's LoRA has no bias term", conv);
      add(mts, "rejected", "modules_to_save", "the converter stops on whole tensors such as lm_head.weight "
          "('Not a lora_A or lora_B tensor')", conv);
      add(trained_bias, "rejected", "bias", "the converter stops on trained base biases", conv);
      add(tokens, "rejected", "trainable_tokens", "the converter stops on trainable_tokens_delta", conv);
      add(skipped, "added", "untargeted tensors",
          "the converter converts every lora_A/lora_B in the file; PEFT ignores these (not targeted by the config), "
          "llama.cpp applies them",
          conv + " (get_tensors reads every tensor of the file)");
      break;
    }
    case engine::vllm: {
      const std::string src = detail::vllm_src();
      add(dora, "rejected", "DoRA", "PEFTHelper raises 'vLLM does not yet support DoRA.'", src);
      if (!ad.config.modules_to_save.empty())
        add(ad.config.modules_to_save, "rejected", "modules_to_save",
            "PEFTHelper raises for a non-empty modules_to_save", src);
      add(bias, "rejected", "lora_bias", "lora_B.bias: vLLM's LoRA layers have no LoRA bias ('Adapter bias is not "
          "supported' in newer versions)", src);
      break;
    }
    case engine::tgi: {
      const std::string src = detail::tgi_src();
      const std::string only = "LoraConfig.map_weights_for_model reads only <module>.lora_A.weight / .lora_B.weight";
      add(dora, "ignored", "DoRA", only + ": the magnitudes are dropped and the module runs as plain LoRA", src);
      add(bias, "ignored", "lora_bias", only + ": lora_B.bias is dropped", src);
      add(emb, "ignored", "embedding LoRA", only + ": lora_embedding_A/B are dropped", src);
      add(mts, "ignored", "modules_to_save", only + ": the saved copies are dropped", src);
      add(tokens, "ignored", "trainable_tokens", only + ": the token rows are dropped", src);
      break;
    }
    case engine::peft:
      add(skipped, "ignored", "untargeted tensors", "PEFT loads only the modules its config targets",
          "peft/tuners/tuners_utils.py (inject_adapter) and peft/utils/save_and_load.py (set_peft_model_state_dict)");
      break;
  }
  return out;
}

}  // namespace lora::io
