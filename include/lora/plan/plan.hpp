#pragma once
// Planning an adapter before training it: exact trainable parameter counts per
// module type, the adapter file size, and an estimate of training memory.
//
//   auto arch = lora::plan::architecture("llama-3-8b");      // or a config.json path
//   lora::plan::PlanOptions o;
//   o.rank = 64; o.targets = {"q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"};
//   auto p = lora::plan::make_plan(arch, o);                   // p.trainable_parameters == 167'772'160

#include <lora/error.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/plan/architecture.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace lora::plan {

enum class quant_mode { none, nf4, nf4_dq };

struct PlanOptions {
  int rank = 8;
  double alpha = 16.0;
  bool use_rslora = false;
  /// PEFT target_modules: names matched against the end of each module path, or "all-linear"
  /// (every linear layer of the blocks, not lm_head, as PEFT does).
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  std::vector<std::pair<std::string, int>> rank_pattern;      ///< PEFT rank_pattern (first match wins)
  std::vector<std::pair<std::string, double>> alpha_pattern;  ///< PEFT alpha_pattern
  bool dora = false;             ///< DoRA adds a magnitude vector [out] per module
  quant_mode quant = quant_mode::none;
  int blocksize = 64;            ///< NF4 block size
  io::dtype base_dtype = io::dtype::BF16;     ///< frozen weights (when not quantised)
  io::dtype adapter_dtype = io::dtype::F32;   ///< adapter weights as trained and saved
  std::optional<std::int64_t> batch, seq;     ///< for the activation estimate
};

/// One adapted module.
struct PlannedModule {
  std::string name, kind;
  std::int64_t in_features, out_features;
  int rank;
  double alpha, scaling;
  std::int64_t parameters;  ///< (in + out)·r (+ out with DoRA)
};

/// Modules of one kind (q_proj, ...), added up.
struct KindSummary {
  std::string kind;
  std::int64_t count = 0;
  std::int64_t in_features = 0, out_features = 0;  ///< of the first module of this kind
  int min_rank = 0, max_rank = 0;
  std::int64_t parameters = 0;
};

/// Bytes of training memory, by what holds them.
struct MemoryEstimate {
  std::int64_t frozen_weights = 0;  ///< base model (quantised linear layers under NF4)
  std::int64_t adapter_weights = 0;
  std::int64_t gradients = 0;
  std::int64_t optimizer_states = 0;  ///< AdamW: two float32 moments per trainable parameter
  std::optional<std::int64_t> activations;
  std::int64_t total() const {
    return frozen_weights + adapter_weights + gradients + optimizer_states + activations.value_or(0);
  }
};

struct Plan {
  Architecture arch;
  PlanOptions options;
  std::vector<PlannedModule> modules;
  std::vector<KindSummary> kinds;  ///< in model order
  std::int64_t trainable_parameters = 0;
  std::int64_t adapter_file_bytes = 0;  ///< adapter_model.safetensors as our writer lays it out
  MemoryEstimate memory;
};

inline std::int64_t bytes_of(io::dtype t) { return static_cast<std::int64_t>(io::dtype_size(t)); }

/// Bytes per weight of NF4 storage: 4 bits + one float32 absmax per block, or with
/// double quantisation one 8-bit absmax per block + one float32 per 256 blocks.
inline double nf4_bytes_per_weight(quant_mode q, int blocksize) {
  if (q == quant_mode::nf4) return 0.5 + 4.0 / blocksize;
  if (q == quant_mode::nf4_dq) return 0.5 + 1.0 / blocksize + 4.0 / (blocksize * 256.0);
  return 0.0;
}

namespace detail {
inline bool is_all_linear(const std::vector<std::string>& t) { return t.size() == 1 && t[0] == "all-linear"; }
}  // namespace detail

/// Counts the adapter `o` describes on `arch`. Throws lora::error if no module
/// matches the targets, or a rank exceeds a module's min(in, out).
inline Plan make_plan(const Architecture& arch, const PlanOptions& o) {
  if (o.rank < 1) lora::detail::fail("rank must be at least 1, got {}", o.rank);
  if (!std::isfinite(o.alpha)) lora::detail::fail("alpha must be a finite number, got {}", o.alpha);
  if (o.targets.empty()) lora::detail::fail("no target modules given");
  if (o.blocksize < 32 || o.blocksize > 4096 || (o.blocksize & (o.blocksize - 1)))
    lora::detail::fail("NF4 blocksize must be a power of two in [32, 4096], got {}", o.blocksize);
  io::PeftConfig cfg;
  cfg.r = o.rank;
  cfg.lora_alpha = o.alpha;
  cfg.use_rslora = o.use_rslora;
  cfg.use_dora = o.dora;
  cfg.target_modules = o.targets;
  cfg.rank_pattern = o.rank_pattern;
  cfg.alpha_pattern = o.alpha_pattern;
  const bool all_linear = detail::is_all_linear(o.targets);

  Plan p;
  p.arch = arch;
  p.options = o;
  std::map<std::string, std::size_t> kind_index;
  std::int64_t adapted_per_layer_rank = 0;  // Σ r over adapted modules, for the activation estimate
  for (const auto& m : arch.modules) {
    const bool hit = all_linear ? (!m.embedding && m.name != "lm_head") : cfg.targets(m.name);
    if (!hit) continue;
    PlannedModule pm;
    pm.name = m.name;
    pm.kind = m.kind;
    pm.in_features = m.in_features;
    pm.out_features = m.out_features;
    pm.rank = cfg.rank_for(m.name);
    pm.alpha = cfg.alpha_for(m.name);
    if (pm.rank < 1) lora::detail::fail("rank_pattern gives r = {} for {}; it must be at least 1", pm.rank, m.name);
    if (!m.embedding && pm.rank > std::min(m.in_features, m.out_features))
      lora::detail::fail("r = {} exceeds min(in, out) = {} for {} [{} -> {}]", pm.rank,
                         std::min(m.in_features, m.out_features), m.name, m.in_features, m.out_features);
    pm.scaling = cfg.scaling_for(m.name);
    pm.parameters = (m.in_features + m.out_features) * pm.rank + (o.dora ? m.out_features : 0);
    p.trainable_parameters += pm.parameters;
    adapted_per_layer_rank += pm.rank;
    auto [it, fresh] = kind_index.try_emplace(m.kind, p.kinds.size());
    if (fresh) p.kinds.push_back({m.kind, 0, m.in_features, m.out_features, pm.rank, pm.rank, 0});
    auto& k = p.kinds[it->second];
    ++k.count;
    k.min_rank = std::min(k.min_rank, pm.rank);
    k.max_rank = std::max(k.max_rank, pm.rank);
    k.parameters += pm.parameters;
    p.modules.push_back(std::move(pm));
  }
  if (p.modules.empty()) {
    std::string kinds;
    std::map<std::string, int> seen;
    for (const auto& m : arch.modules)
      if (!seen[m.kind]++) kinds += (kinds.empty() ? "" : ", ") + m.kind;
    lora::detail::fail("no module of {} matches the targets [{}] (module names: {})", arch.name,
                       fmt::format("{}", fmt::join(o.targets, ", ")), kinds);
  }

  // adapter_model.safetensors: the header our writer produces, plus the data.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::uint64_t offset = 0;
  const std::uint64_t esz = io::dtype_size(o.adapter_dtype);
  const std::string dt(io::dtype_name(o.adapter_dtype));
  for (const auto& m : p.modules) {
    const std::string base = "base_model.model." + m.name;
    auto put = [&](const std::string& key, std::vector<std::int64_t> shape) {
      std::uint64_t n = 1;
      for (auto d : shape) n *= static_cast<std::uint64_t>(d);
      header[key] = {{"dtype", dt}, {"shape", shape}, {"data_offsets", {offset, offset + n * esz}}};
      offset += n * esz;
    };
    put(base + ".lora_A.weight", {m.rank, m.in_features});
    put(base + ".lora_B.weight", {m.out_features, m.rank});
    if (o.dora) put(base + ".lora_magnitude_vector", {m.out_features});
  }
  std::int64_t hbytes = static_cast<std::int64_t>(header.dump().size());
  hbytes += (8 - (8 + hbytes) % 8) % 8;
  p.adapter_file_bytes = 8 + hbytes + static_cast<std::int64_t>(offset);

  // Memory. Linear layers of the blocks may be NF4; embeddings, lm_head, norms and biases stay in base dtype.
  std::int64_t block_linear = 0;
  for (const auto& m : arch.modules)
    if (!m.embedding && m.name != "lm_head") block_linear += m.in_features * m.out_features;
  const std::int64_t rest = arch.total_parameters - block_linear;
  if (o.quant == quant_mode::none)
    p.memory.frozen_weights = arch.total_parameters * bytes_of(o.base_dtype);
  else
    p.memory.frozen_weights = static_cast<std::int64_t>(std::ceil(block_linear * nf4_bytes_per_weight(o.quant, o.blocksize))) +
                              rest * bytes_of(o.base_dtype);
  p.memory.adapter_weights = p.trainable_parameters * 4;
  p.memory.gradients = p.trainable_parameters * 4;
  p.memory.optimizer_states = p.trainable_parameters * 8;
  if (o.batch && o.seq) {
    const std::int64_t tokens = *o.batch * *o.seq;
    const std::int64_t h = arch.hidden, I = arch.intermediate, kv = arch.kv_heads * arch.head_dim;
    // Saved for backward per layer and token, in 16-bit elements (see docs/plan.md).
    const std::int64_t per_layer = arch.model_type == "gpt2" ? 8 * h + 2 * I : 6 * h + 2 * kv + 4 * I;
    const std::int64_t lora_extra = adapted_per_layer_rank / std::max<std::int64_t>(arch.layers, 1);
    p.memory.activations = tokens * (arch.layers * (per_layer + lora_extra) * 2 + h * 2 + arch.vocab * 4);
  }
  return p;
}

/// The plan as JSON: {"trainable_parameters": N, "adapter_file_bytes": ..., "modules_by_type": [...], "memory": {...}}.
inline nlohmann::ordered_json to_json(const Plan& p) {
  nlohmann::ordered_json j;
  j["model"] = p.arch.name;
  j["model_type"] = p.arch.model_type;
  j["base_parameters"] = p.arch.total_parameters;
  j["rank"] = p.options.rank;
  j["alpha"] = p.options.alpha;
  j["targets"] = p.options.targets;
  j["dora"] = p.options.dora;
  j["trainable_parameters"] = p.trainable_parameters;
  j["trainable_fraction"] = static_cast<double>(p.trainable_parameters) / static_cast<double>(p.arch.total_parameters);
  j["adapted_modules"] = p.modules.size();
  j["adapter_file_bytes"] = p.adapter_file_bytes;
  auto& kinds = j["modules_by_type"] = nlohmann::ordered_json::array();
  for (const auto& k : p.kinds)
    kinds.push_back({{"type", k.kind},
                     {"count", k.count},
                     {"in_features", k.in_features},
                     {"out_features", k.out_features},
                     {"min_rank", k.min_rank},
                     {"max_rank", k.max_rank},
                     {"parameters", k.parameters}});
  auto& mem = j["memory"];
  mem["frozen_weights_bytes"] = p.memory.frozen_weights;
  mem["adapter_weights_bytes"] = p.memory.adapter_weights;
  mem["gradients_bytes"] = p.memory.gradients;
  mem["optimizer_states_bytes"] = p.memory.optimizer_states;
  mem["activations_bytes"] = p.memory.activations ? nlohmann::ordered_json(*p.memory.activations) : nlohmann::ordered_json();
  mem["total_bytes"] = p.memory.total();
  return j;
}

}  // namespace lora::plan
