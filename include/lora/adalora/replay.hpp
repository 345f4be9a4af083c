#pragma once
// Replays a recorded PEFT AdaLoRA run (the layout of tests/data/peft/adalora_trace):
// the initial triplets and the gradient of every step go through RankAllocator, and
// the budget and surviving singular values come out per step.

#include <lora/adalora/rank_allocator.hpp>
#include <lora/adalora/regularizer.hpp>
#include <lora/adalora/svd_adapter.hpp>
#include <lora/io/json.hpp>
#include <lora/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace lora {

/// One replayed step: the schedule's budget and, per module, which singular values are
/// nonzero after update_and_allocate(step) and their values.
struct ReplayStep {
  int step = 0;
  Budget budget;
  bool masked = false;
  std::vector<std::vector<bool>> kept;
  std::vector<Vector<float>> E;
};

/// The outcome of replay_adalora_trace.
struct TraceReplay {
  AdaLoraConfig config;
  std::string adapter_name;          ///< "default"
  std::vector<std::string> modules;  ///< e.g. model.layers.0.self_attn.q_proj (sorted)
  std::vector<ReplayStep> steps;
  RankPattern rank_pattern;          ///< the frozen final pattern
  double orth_reg = 0.0;             ///< R of the final adapters (unweighted; see regularizer.hpp)
  std::vector<SvdAdapter<float>> adapters;  ///< the adapters after the last step
};

/// Reads <folder>/trace.json (config) and <folder>/trace.safetensors (init.<module>.lora_{A,E,B}.<adapter>,
/// step<k>.grad.<module>.lora_{A,E,B}.<adapter>) and replays every recorded step in float32, as PEFT ran it.
inline TraceReplay replay_adalora_trace(const std::filesystem::path& folder) {
  TraceReplay out;
  const auto json_path = folder / "trace.json";
  const std::string where = json_path.string();
  // bounded nesting, unique keys, and typed getters that name the file and the key
  const nlohmann::json j = io::read_json_file(json_path);
  if (!j.is_object() || !j.contains("config") || !j.at("config").is_object())
    detail::fail("{}: no \"config\" object", where);
  const auto& c = j.at("config");
  auto number = [&](const char* key) {
    if (!c.contains(key)) detail::fail("{}: config has no \"{}\"", where, key);
    return io::json_number_value(c.at(key), fmt::format("config '{}'", key), where);
  };
  // counts bounded so that the schedule's arithmetic (total_step − tfinal, …) cannot overflow
  constexpr std::int64_t steps_max = std::int64_t{1} << 30, rank_max = std::int64_t{1} << 20;
  AdaLoraConfig& cfg = out.config;
  cfg.init_r = static_cast<int>(io::json_int(c, "init_r", where, 0, rank_max));
  cfg.target_r = static_cast<int>(io::json_int(c, "target_r", where, 0, rank_max));
  cfg.tinit = static_cast<int>(io::json_int(c, "tinit", where, 0, steps_max));
  cfg.tfinal = static_cast<int>(io::json_int(c, "tfinal", where, 0, steps_max));
  cfg.deltaT = static_cast<int>(io::json_int(c, "deltaT", where, 1, steps_max));
  cfg.beta1 = number("beta1");
  cfg.beta2 = number("beta2");
  cfg.total_step = static_cast<int>(io::json_int(c, "total_step", where, 1, steps_max));
  cfg.orth_reg_weight = io::json_number_opt(c, "orth_reg_weight", where).value_or(0.5);
  cfg.lora_alpha = io::json_number_opt(c, "lora_alpha", where).value_or(8.0);
  cfg.validate();

  auto file = io::SafetensorsFile::open(folder / "trace.safetensors");
  std::map<std::string, bool> modules;
  for (const auto& name : file.names()) {
    const std::string pre = "init.";
    const auto pos = name.find(".lora_A.");
    if (name.rfind(pre, 0) != 0 || pos == std::string::npos) continue;
    modules[name.substr(pre.size(), pos - pre.size())] = true;
    out.adapter_name = name.substr(pos + 8);
  }
  if (modules.empty())
    detail::fail("{}: no init.<module>.lora_A.<adapter> tensors", (folder / "trace.safetensors").string());
  const std::string suf = "." + out.adapter_name;
  for (const auto& [m, _] : modules) {
    out.modules.push_back(m);
    auto A = file.tensor("init." + m + ".lora_A" + suf).to_matrix<float>();
    auto E = file.tensor("init." + m + ".lora_E" + suf).to_matrix<float>();
    auto B = file.tensor("init." + m + ".lora_B" + suf).to_matrix<float>();
    AdapterOptions o;
    o.name = m;
    out.adapters.push_back(SvdAdapter<float>::from_factors(std::move(A), E, std::move(B), cfg.lora_alpha, o));
  }

  RankAllocator<float> alloc(cfg, out.adapters);
  for (int k = 0;; ++k) {
    const std::string pre = "step" + std::to_string(k) + ".grad.";
    if (!file.contains(pre + out.modules.front() + ".lora_A" + suf)) break;
    std::vector<SvdGradients<float>> grads;
    for (const auto& m : out.modules) {
      SvdGradients<float> g;
      g.dA = file.tensor(pre + m + ".lora_A" + suf).to_matrix<float>();
      const Matrix<float> dE = file.tensor(pre + m + ".lora_E" + suf).to_matrix<float>();
      g.dE = Eigen::Map<const Vector<float>>(dE.data(), dE.size());
      g.dB = file.tensor(pre + m + ".lora_B" + suf).to_matrix<float>();
      grads.push_back(std::move(g));
    }
    const AllocationStep a = alloc.update_and_allocate(k, out.adapters, grads);
    ReplayStep s;
    s.step = k;
    s.budget = a.budget;
    s.masked = a.masked;
    for (const auto& ad : out.adapters) {
      s.kept.push_back(ad.active());
      s.E.push_back(ad.E());
    }
    out.steps.push_back(std::move(s));
  }
  if (out.steps.empty())
    detail::fail("{}: no step0.grad.* tensors", (folder / "trace.safetensors").string());
  if (alloc.rank_pattern()) out.rank_pattern = *alloc.rank_pattern();
  out.orth_reg = orthogonal_penalty(out.adapters, false).value;
  return out;
}

/// The replay as JSON: {"steps": [{"step": k, "budget": b, "kept": {"<module>": [bool, ...]}}]}.
inline nlohmann::ordered_json replay_to_json(const TraceReplay& r) {
  nlohmann::ordered_json j;
  j["steps"] = nlohmann::ordered_json::array();
  for (const auto& s : r.steps) {
    nlohmann::ordered_json js;
    js["step"] = s.step;
    js["budget"] = s.budget.budget;
    nlohmann::ordered_json kept = nlohmann::ordered_json::object();
    for (std::size_t m = 0; m < r.modules.size(); ++m) kept[r.modules[m]] = s.kept[m];
    js["kept"] = std::move(kept);
    j["steps"].push_back(std::move(js));
  }
  return j;
}

}  // namespace lora
