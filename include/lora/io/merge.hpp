#pragma once
// Merging PEFT adapters into a checkpoint, tensor by tensor, as PEFT's merge_and_unload()
// followed by saving the state dict does:
//
//   LoRA:  W' = W + scale·s·B·A
//   DoRA:  W' = (m ⊘ n) ⊙ (W + scale·s·B·A),  n = ‖W + scale·s·B·A‖_row
//   embedding LoRA: E' = E + scale·s·(B·A)ᵀ;   lora_bias: b' = b + scale·s·b_B
//   modules_to_save copies replace the base tensor; trainable-token rows replace rows
//
// computed in float (double for F64 tensors) from the stored dtype and rounded once to the
// output dtype; tensors that nothing changes are copied byte for byte (or converted when an
// output dtype is given, as model.to(dtype) would). Several adapters merge in order, each on
// the result of the one before (no rounding in between). Adapter paths are mapped onto the
// base's keys (resolve_base_keys: with or without model./transformer./language_model.).
// A folder output from a folder base carries the base's other files (config.json with its
// dtype set to what was written, tokenizer, generation config).
//
//   auto base = lora::io::Checkpoint::open("Llama-3.2-1B/");
//   auto a = lora::io::load_peft_adapter("my-adapter/"), b = lora::io::load_peft_adapter("style/");
//   lora::io::merge_peft_checkpoint(base, a, "merged/", {});
//   lora::io::merge_peft_checkpoint(base, {{&a, 1.0}, {&b, 0.5}}, "stacked/");

#include <lora/core/merge.hpp>
#include <lora/error.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/parallel_write.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#if defined(_OPENMP)
#define LORA_IO_OMP(x) _Pragma(#x)
#else
#define LORA_IO_OMP(x)
#endif

namespace lora::io {

namespace detail {

/// Converts a float tensor's bytes from one float dtype to another.
inline ByteBuffer convert_floats(const TensorView& v, dtype to, BufferPool* pool = nullptr) {
  const std::size_t n = static_cast<std::size_t>(v.numel());
  ByteBuffer out = pool ? pool->acquire(n * dtype_size(to)) : ByteBuffer(n * dtype_size(to));
  constexpr std::size_t chunk = 1 << 16;
  const std::ptrdiff_t chunks = static_cast<std::ptrdiff_t>((n + chunk - 1) / chunk);
  const bool wide = v.type == dtype::F64 || to == dtype::F64;
LORA_IO_OMP(omp parallel for schedule(static))
  for (std::ptrdiff_t c = 0; c < chunks; ++c) {
    const std::size_t b = static_cast<std::size_t>(c) * chunk, len = std::min(chunk, n - b);
    if (wide) {
      std::vector<double> buf(len);
      decode_floats(v.type, v.bytes.data() + b * dtype_size(v.type), buf.data(), len);
      encode_floats(to, buf.data(), out.data() + b * dtype_size(to), len);
    } else {
      std::vector<float> buf(len);
      decode_floats(v.type, v.bytes.data() + b * dtype_size(v.type), buf.data(), len);
      encode_floats(to, buf.data(), out.data() + b * dtype_size(to), len);
    }
  }
  return out;
}

}  // namespace detail

/// How adapter module paths name base checkpoint tensors: a path that starts with `strip`
/// has it replaced by `add` (strip "" adds a prefix, add "" removes one; equal: identity).
/// A GPT-2 adapter ("transformer.h.0.attn.c_attn") on the hub's GPT-2 checkpoint
/// ("h.0.attn.c_attn.weight") needs {"transformer.", ""}.
struct BaseKeyMap {
  std::string strip, add;

  /// The base key of an adapter-side path or key.
  std::string operator()(std::string_view k) const {
    if (k.substr(0, strip.size()) != strip) return std::string(k);
    return add + std::string(k.substr(strip.size()));
  }
  bool identity() const { return strip == add; }
  /// "'transformer.' -> ''", for messages.
  std::string describe() const { return identity() ? "identity" : fmt::format("'{}' -> '{}'", strip, add); }
};

/// Parses "OLD=NEW" (paths starting with OLD get NEW instead) or "NEW" (NEW is prepended).
inline BaseKeyMap parse_base_key_map(std::string_view s) {
  const auto eq = s.find('=');
  if (eq == std::string_view::npos) return {"", std::string(s)};
  return {std::string(s.substr(0, eq)), std::string(s.substr(eq + 1))};
}

/// One adapter of a stacked merge and its strength (a multiplier on every module's s).
struct ScaledAdapter {
  const PeftAdapter* adapter = nullptr;
  double scale = 1.0;
};

namespace detail {
/// How checkpoints that store experts one by one name a fused parameter's pieces
/// (transformers' conversion mapping, reverted when it saves): expert e's gate_up_proj is
/// experts.e.gate_proj.weight over experts.e.up_proj.weight (rows), down_proj is
/// experts.e.down_proj.weight (qwen2_moe, qwen3_moe, olmoe, deepseek_v2/v3); Mixtral's are
/// block_sparse_moe.experts.e.w1/w3 and w2.
struct SplitExperts {
  std::string module;              ///< the experts module in the checkpoint
  std::vector<std::string> parts;  ///< per expert, stacked along out
  std::string key(Index e, std::size_t part) const { return fmt::format("{}.{}.{}.weight", module, e, parts[part]); }
};
inline std::vector<SplitExperts> split_expert_layouts(const std::string& module, const std::string& parameter) {
  std::vector<SplitExperts> out;
  std::string mixtral;
  if (ends_with(module, "mlp.experts"))
    mixtral = module.substr(0, module.size() - std::string("mlp.experts").size()) + "block_sparse_moe.experts";
  if (parameter == "gate_up_proj") {
    out.push_back({module, {"gate_proj", "up_proj"}});
    if (!mixtral.empty()) out.push_back({mixtral, {"w1", "w3"}});
  } else if (parameter == "down_proj") {
    out.push_back({module, {"down_proj"}});
    if (!mixtral.empty()) out.push_back({mixtral, {"w2"}});
  }
  return out;
}

/// The adapter-side keys a merge must find in the base, each with its alternatives (the
/// first names it): each module's weight, each whole tensor's key, each trainable-token
/// embedding's weight, and each parameter LoRA's parameter (fused, or its first expert's
/// first piece in a checkpoint that stores experts one by one).
inline std::vector<std::vector<std::string>> keys_needed(const std::vector<ScaledAdapter>& adapters) {
  std::set<std::vector<std::string>> keys;
  for (const auto& sa : adapters) {
    for (const auto& m : sa.adapter->modules) keys.insert({m.name + ".weight"});
    auto param = [&](const std::string& module, const std::string& c) {
      std::vector<std::string> alt{module + "." + c};
      for (const auto& l : split_expert_layouts(module, c)) alt.push_back(l.key(0, 0));
      keys.insert(alt);
    };
    for (const auto& w : sa.adapter->params) {  // the parameter, or every candidate when one wrapper per candidate
      if (!w.parameter.empty()) {
        param(w.module, w.parameter);
        continue;
      }
      const auto n = std::count_if(sa.adapter->params.begin(), sa.adapter->params.end(),
                                   [&](const PeftParamAdapter& q) { return q.module == w.module; });
      if (static_cast<std::size_t>(n) == w.candidates.size())
        for (const auto& c : w.candidates) param(w.module, c);
    }
    for (const auto& t : sa.adapter->saved) keys.insert({t.key});
    for (const auto& t : sa.adapter->trainable_tokens) keys.insert({t.module + ".weight"});
  }
  return {keys.begin(), keys.end()};
}
}  // namespace detail

/// Finds how the adapters' module paths map onto `base`'s keys: among the prefix changes
/// between "", "model.", "transformer.", "language_model.", "model.language_model.",
/// "language_model.model." and "base_model.model.", the one under which every needed key
/// (module weights, whole tensors, embeddings with trainable tokens) is in the base. With
/// `forced`, only that one is checked. Throws lora::error when none fits (naming, for the
/// closest candidates, how many keys they find and one they miss) or when several fit
/// differently (listing them; pass one with --base-prefix).
inline BaseKeyMap resolve_base_keys(const Checkpoint& base, const std::vector<ScaledAdapter>& adapters,
                                    const std::optional<BaseKeyMap>& forced = std::nullopt) {
  const std::vector<std::vector<std::string>> need = detail::keys_needed(adapters);
  if (need.empty()) lora::detail::fail("the adapters to merge carry nothing to merge");
  auto missing_under = [&](const BaseKeyMap& m, std::size_t& found) {
    std::optional<std::string> miss;
    found = 0;
    for (const auto& k : need) {
      if (std::any_of(k.begin(), k.end(), [&](const std::string& a) { return base.contains(m(a)); }))
        ++found;
      else if (!miss)
        miss = m(k.front());
    }
    return miss;
  };
  if (forced) {
    std::size_t found = 0;
    if (auto miss = missing_under(*forced, found))
      lora::detail::fail("{}: with the key mapping {} only {} of {} adapter tensors find their base tensor; e.g. no "
                         "tensor '{}'", base.path().string(), forced->describe(), found, need.size(), *miss);
    return *forced;
  }
  static const char* prefixes[] = {"", "model.", "transformer.", "language_model.", "model.language_model.",
                                   "language_model.model.", "base_model.model."};
  struct Candidate {
    BaseKeyMap map;
    std::size_t found;
    std::optional<std::string> miss;
  };
  std::vector<Candidate> all;
  std::vector<BaseKeyMap> fits;
  std::set<std::vector<std::string>> distinct;
  for (const char* strip : prefixes) {
    if (!std::all_of(need.begin(), need.end(), [&](const std::vector<std::string>& k) { return k.front().rfind(strip, 0) == 0; })) continue;
    for (const char* add : prefixes) {
      BaseKeyMap m{strip, add};
      if (m.identity() && std::string(strip) != "") continue;  // one identity is enough
      std::size_t found = 0;
      auto miss = missing_under(m, found);
      all.push_back({m, found, miss});
      if (!miss) {
        std::vector<std::string> mapped;
        for (const auto& k : need) mapped.push_back(m(k.front()));
        if (distinct.insert(mapped).second) fits.push_back(m);
      }
    }
  }
  if (fits.size() == 1) return fits.front();
  if (fits.size() > 1) {
    std::vector<std::string> names;
    for (const auto& m : fits) names.push_back(m.describe());
    lora::detail::fail("{}: the adapter's {} tensors match the base under several key mappings ({}); choose one with "
                       "--base-prefix OLD=NEW", base.path().string(), need.size(), fmt::join(names, ", "));
  }
  std::sort(all.begin(), all.end(), [](const Candidate& a, const Candidate& b) { return a.found > b.found; });
  std::vector<std::string> lines;
  for (std::size_t i = 0; i < all.size() && i < 3; ++i)
    lines.push_back(fmt::format("{} finds {} of {} (no '{}')", all[i].map.describe(), all[i].found, need.size(),
                                all[i].miss.value_or("?")));
  lora::detail::fail("{}: no key mapping puts every adapter tensor on a base tensor (e.g. the adapter's '{}'); closest: "
                     "{}; if the base uses other names, pass --base-prefix OLD=NEW",
                     base.path().string(), need.front().front(), fmt::join(lines, "; "));
}

/// How a checkpoint stores a 3-D expert parameter: transformers' default [experts, out, in]
/// (what PEFT assumes unless the experts module sets is_transposed), or [experts, in, out]
/// (is_transposed: gpt-oss).
enum class ExpertsLayout {
  automatic,  ///< from the shapes; where they cannot tell (square experts), from config.json's model_type
  out_in,     ///< [E, out, in]
  in_out,     ///< [E, in, out]
};

/// "auto", "out-in" or "in-out" (`what` names the option in the message).
inline ExpertsLayout parse_experts_layout(std::string_view s, std::string_view what) {
  if (s == "auto") return ExpertsLayout::automatic;
  if (s == "out-in") return ExpertsLayout::out_in;
  if (s == "in-out") return ExpertsLayout::in_out;
  lora::detail::fail("{}: expected auto, out-in or in-out, got '{}'", what, s);
}

/// A parameter LoRA (PeftParamAdapter) matched to the base tensor it changes.
struct ParamTarget {
  const PeftParamAdapter* wrapper = nullptr;
  std::string parameter;    ///< the parameter it adapts, e.g. "gate_up_proj"
  std::string key;          ///< the base tensor (after the key mapping)
  int rank = 0;
  double alpha = 0;
  bool transposed = false;  ///< the base stores [E, in, out] (ExpertsLayout::in_out)
  Index experts = 1;        ///< E, the wrapper's experts
  /// The part of ΔW the tensor takes: experts first_expert … + tensor_experts − 1, output
  /// rows out_begin … + out_rows − 1 of each. A fused parameter takes all; a checkpoint that
  /// stores experts one by one has a tensor per expert and piece (gate_proj: the first half
  /// of gate_up_proj's rows, up_proj the second).
  Index first_expert = 0, tensor_experts = 1, out_begin = 0, out_rows = 0;
  double scaling() const { return dynamic_scaling{wrapper->rslora}.factor(alpha, rank); }
};

namespace detail {
/// The model_type of a folder checkpoint's config.json ("" without one).
inline std::string checkpoint_model_type(const Checkpoint& base) {
  const auto cfg = base.path() / "config.json";
  if (!std::filesystem::is_directory(base.path()) || !std::filesystem::exists(cfg)) return "";
  const auto j = read_json_file(cfg);
  if (j.is_object() && j.contains("model_type") && j["model_type"].is_string()) return j["model_type"].get<std::string>();
  return "";
}
}  // namespace detail

/// Matches each parameter LoRA of `adapter` to its base tensor `map(<module>.<parameter>)`:
/// a 3-D tensor [E, d1, d2] takes a wrapper whose lora_A has r·E rows (r the parameter's
/// rank) and whose in/out features are (d2, d1) for out_in, (d1, d2) for in_out; a 2-D
/// tensor [out, in] is one expert. A checkpoint without the fused tensor that stores the
/// experts one by one under transformers' hub names (detail::split_expert_layouts:
/// experts.e.gate_proj/up_proj/down_proj.weight, Mixtral's block_sparse_moe.experts.e.w1/w3/w2)
/// gets a target per expert and piece (gate_proj the first half of gate_up_proj's rows).
/// Where target_parameters selects several parameters of a module, the wrappers are assigned
/// by these shapes (one layout per module, as PEFT reads it off the experts module). `layout` automatic takes the layout the shapes allow; where
/// both fit (square experts) gpt_oss checkpoints (config.json model_type) are in_out and
/// the models PEFT documents for target_parameters (llama4 aside) out_in; otherwise an
/// error asks for the layout. Throws lora::error naming the module when no assignment or
/// more than one fits, or a base tensor is missing or not float.
inline std::vector<ParamTarget> resolve_parameter_targets(const Checkpoint& base, const PeftAdapter& adapter,
                                                          const BaseKeyMap& map = {},
                                                          ExpertsLayout layout = ExpertsLayout::automatic) {
  std::vector<ParamTarget> out;
  const PeftConfig& cfg = adapter.config;
  const auto& ps = adapter.params;
  std::string model_type;
  bool model_type_read = false;
  for (std::size_t i = 0; i < ps.size();) {
    std::size_t j = i;
    while (j < ps.size() && ps[j].module == ps[i].module) ++j;
    const std::string& module = ps[i].module;
    // The candidates the base has, with their shapes: fused, or one 2-D piece per expert and
    // part (then seen as [E, parts·rows, in]).
    std::vector<std::string> names;
    std::map<std::string, std::vector<std::int64_t>> shape_of;
    std::map<std::string, detail::SplitExperts> split_of;
    auto float_tensor = [&](const std::string& key) -> const TensorView& {
      const TensorView& W = base.tensor(key);
      if (!is_float(W.type))
        lora::detail::fail("{}: tensor '{}' has dtype {}; merging needs a float weight (F32, F16, BF16, F64)", W.file,
                           key, dtype_name(W.type));
      return W;
    };
    for (const auto& c : ps[i].parameter.empty() ? ps[i].candidates : std::vector<std::string>{ps[i].parameter}) {
      const std::string key = map(module + "." + c);
      if (base.contains(key)) {
        shape_of[c] = float_tensor(key).shape;
        names.push_back(c);
        continue;
      }
      for (const auto& l : detail::split_expert_layouts(module, c)) {
        if (!base.contains(map(l.key(0, 0)))) continue;
        const auto piece = float_tensor(map(l.key(0, 0))).shape;
        if (piece.size() != 2)
          lora::detail::fail("{}: tensor '{}' has shape [{}], expected an expert's 2-D weight", base.path().string(),
                             map(l.key(0, 0)), fmt::join(piece, ", "));
        Index E = 0;
        for (;; ++E) {
          std::size_t have = 0;
          for (std::size_t j = 0; j < l.parts.size(); ++j) have += base.contains(map(l.key(E, j)));
          if (have == 0) break;
          for (std::size_t j = 0; j < l.parts.size(); ++j) {
            if (!base.contains(map(l.key(E, j))))
              lora::detail::fail("{}: expert {} of '{}' has no tensor '{}'", base.path().string(), E, module, map(l.key(E, j)));
            if (float_tensor(map(l.key(E, j))).shape != piece)
              lora::detail::fail("{}: tensor '{}' has shape [{}], but '{}' has [{}]", base.path().string(), map(l.key(E, j)),
                                 fmt::join(base.tensor(map(l.key(E, j))).shape, ", "), map(l.key(0, 0)), fmt::join(piece, ", "));
          }
        }
        shape_of[c] = {E, piece[0] * static_cast<std::int64_t>(l.parts.size()), piece[1]};
        split_of[c] = l;
        names.push_back(c);
        break;
      }
    }
    if (names.size() < j - i)
      lora::detail::fail("{}: module '{}' has {} parameter LoRA(s) (target_parameters: {}), but the checkpoint has only "
                         "{} of its tensors ({}), neither{}", base.path().string(), module, j - i,
                         fmt::join(ps[i].candidates, ", "), names.size(),
                         fmt::join([&] { std::vector<std::string> k; for (const auto& c : ps[i].candidates) k.push_back(map(module + "." + c)); return k; }(), ", "),
                         " fused, nor one tensor per expert as qwen2/qwen3-MoE (experts.0.gate_proj.weight, …) or "
                         "Mixtral (block_sparse_moe.experts.0.w1.weight, …) store them");
    // Does wrapper w fit parameter c with layout t? (rank, experts) when it does.
    auto fits = [&](const PeftParamAdapter& w, const std::string& c, bool t) -> std::optional<std::pair<int, Index>> {
      const auto& shape = shape_of.at(c);
      if (t && split_of.count(c)) return std::nullopt;  // pieces are nn.Linear weights [out, in]
      const int r = cfg.rank_for(module + "." + c);
      if (shape.size() == 2) {
        if (t) return std::nullopt;  // PEFT swaps nothing on a 2-D parameter
        if (w.A.rows() == r && w.in_features() == shape[1] && w.out_features() == shape[0]) return std::pair{r, Index{1}};
        return std::nullopt;
      }
      if (shape.size() != 3) return std::nullopt;
      const std::int64_t in = t ? shape[1] : shape[2], outf = t ? shape[2] : shape[1];
      if (w.A.rows() == static_cast<Index>(r) * shape[0] && w.in_features() == in && w.out_features() == outf)
        return std::pair{r, static_cast<Index>(shape[0])};
      return std::nullopt;
    };
    struct Fit {
      std::vector<std::size_t> assign;  // wrapper k → names[assign[k]]
      bool t;
    };
    std::vector<Fit> all;
    std::vector<std::size_t> perm(names.size());
    for (std::size_t k = 0; k < perm.size(); ++k) perm[k] = k;
    for (bool t : {false, true}) {
      std::sort(perm.begin(), perm.end());
      do {
        std::vector<std::size_t> assign(perm.begin(), perm.begin() + static_cast<std::ptrdiff_t>(j - i));
        bool ok = true;
        for (std::size_t k = 0; k < assign.size() && ok; ++k) ok = fits(ps[i + k], names[assign[k]], t).has_value();
        if (ok && std::none_of(all.begin(), all.end(), [&](const Fit& f) { return f.assign == assign && f.t == t; }))
          all.push_back({assign, t});
      } while (std::next_permutation(perm.begin(), perm.end()));
    }
    auto describe = [&](const Fit& f) {
      std::vector<std::string> parts;
      for (std::size_t k = 0; k < f.assign.size(); ++k) parts.push_back(ps[i + k].path + " → " + names[f.assign[k]]);
      return fmt::format("{} ({})", fmt::join(parts, ", "), f.t ? "[E, in, out]" : "[E, out, in]");
    };
    if (layout != ExpertsLayout::automatic)
      std::erase_if(all, [&](const Fit& f) { return f.t != (layout == ExpertsLayout::in_out); });
    if (all.size() > 1 && layout == ExpertsLayout::automatic) {
      // The same assignment in both layouts (square experts): the model type decides.
      const bool same = std::all_of(all.begin(), all.end(), [&](const Fit& f) { return f.assign == all[0].assign; });
      if (same) {
        if (!model_type_read) model_type = detail::checkpoint_model_type(base), model_type_read = true;
        static const std::set<std::string> in_out{"gpt_oss"};
        static const std::set<std::string> out_in{"qwen2_moe", "qwen3_moe", "mixtral", "olmoe"};
        if (in_out.count(model_type)) std::erase_if(all, [](const Fit& f) { return !f.t; });
        else if (out_in.count(model_type)) std::erase_if(all, [](const Fit& f) { return f.t; });
      }
    }
    auto shapes = [&] {
      std::vector<std::string> v;
      for (const auto& c : names)
        v.push_back(split_of.count(c) ? fmt::format("{} [{} experts × {}]", map(split_of.at(c).key(0, 0)), shape_of.at(c)[0],
                                                    fmt::join(base.tensor(map(split_of.at(c).key(0, 0))).shape, " × "))
                                      : fmt::format("{} [{}]", map(module + "." + c), fmt::join(shape_of.at(c), ", ")));
      for (std::size_t k = i; k < j; ++k)
        v.push_back(fmt::format("{}: lora_A [{}, {}], lora_B [{}, {}]", ps[k].path, ps[k].A.rows(), ps[k].A.cols(),
                                ps[k].B.rows(), ps[k].B.cols()));
      return fmt::format("{}", fmt::join(v, "; "));
    };
    if (all.empty())
      lora::detail::fail("{}: the parameter LoRA(s) of module '{}' fit none of its tensors{}: {}", base.path().string(),
                         module, layout == ExpertsLayout::automatic ? "" : " in the layout given", shapes());
    if (all.size() > 1) {
      std::vector<std::string> d;
      for (const auto& f : all) d.push_back(describe(f));
      lora::detail::fail("{}: the parameter LoRA(s) of module '{}' fit its tensors in {} ways ({}){}: {}",
                         base.path().string(), module, all.size(), fmt::join(d, " or "),
                         std::all_of(all.begin(), all.end(), [&](const Fit& f) { return f.assign == all[0].assign; })
                             ? "; the layout of the experts decides (pass it: [E, out, in] is transformers' default, "
                               "[E, in, out] gpt-oss's)"
                             : "",
                         shapes());
    }
    for (std::size_t k = 0; k < j - i; ++k) {
      const std::string& c = names[all[0].assign[k]];
      const auto [r, E] = *fits(ps[i + k], c, all[0].t);
      const double alpha = cfg.alpha_for(module + "." + c);
      const Index outf = ps[i + k].out_features();
      if (auto it = split_of.find(c); it != split_of.end()) {
        const Index rows = outf / static_cast<Index>(it->second.parts.size());
        for (Index e = 0; e < E; ++e)
          for (std::size_t part = 0; part < it->second.parts.size(); ++part)
            out.push_back({&ps[i + k], c, map(it->second.key(e, part)), r, alpha, false, E, e, 1,
                           static_cast<Index>(part) * rows, rows});
      } else {
        out.push_back({&ps[i + k], c, map(module + "." + c), r, alpha, all[0].t, E, 0, E, 0, outf});
      }
    }
    i = j;
  }
  return out;
}

/// Throws lora::error unless every module of `adapter` has a float base weight
/// `map(<module>).weight` of shape [out, in] ([in, out] with fan_in_fan_out, and for an
/// embedding [vocab, dim]) in `base`.
inline void check_adapter_fits(const Checkpoint& base, const PeftAdapter& adapter, const BaseKeyMap& map = {}) {
  if (adapter.modules.empty() && adapter.params.empty() && adapter.saved.empty() && adapter.trainable_tokens.empty())
    lora::detail::fail("PEFT adapter has no modules");
  for (const auto& m : adapter.modules) {
    const std::string key = map(m.name + ".weight");
    if (!base.contains(key))
      lora::detail::fail("{}: adapter module '{}' has no base weight: the checkpoint has no tensor '{}'",
                         base.path().string(), m.name, key);
    const TensorView& W = base.tensor(key);
    if (!is_float(W.type))
      lora::detail::fail("{}: tensor '{}' has dtype {}; merging needs a float weight (F32, F16, BF16, F64)", W.file,
                         key, dtype_name(W.type));
    const auto& a = m.adapter;
    const std::int64_t want0 = a.fan_in_fan_out() ? a.in_features() : a.out_features();
    const std::int64_t want1 = a.fan_in_fan_out() ? a.out_features() : a.in_features();
    if (W.ndim() != 2 || W.shape[0] != want0 || W.shape[1] != want1)
      lora::detail::fail("{}: tensor '{}' has shape {}, but adapter module '{}' (A [{}, {}], B [{}, {}]) "
                         "needs [{}, {}]",
                         W.file, key, fmt::format("[{}]", fmt::join(W.shape, ", ")), m.name, a.rank(),
                         a.in_features(), a.out_features(), a.rank(), want0, want1);
    if (m.lora_bias && !base.contains(map(m.name + ".bias")))
      lora::detail::fail("{}: adapter module '{}' has lora_bias (lora_B.bias) but the base layer has no bias (no tensor "
                         "'{}'): PEFT refuses this merge too ('Impossible to merge LoRA with lora_bias=True because "
                         "the base layer has no bias')",
                         base.path().string(), m.name, map(m.name + ".bias"));
  }
  for (const auto& t : adapter.saved) {
    const std::string key = map(t.key);
    if (!base.contains(key))
      lora::detail::fail("{}: the adapter's {} tensor '{}' replaces base tensor '{}', which the checkpoint does not "
                         "have", base.path().string(), role_name(t.role), t.data.name, key);
    const TensorView& W = base.tensor(key);
    if (W.shape != t.data.shape)
      lora::detail::fail("{}: the adapter's {} tensor '{}' has shape [{}], but base tensor '{}' has [{}] (a resized "
                         "vocabulary? PEFT cannot load it either)", base.path().string(), role_name(t.role),
                         t.data.name, fmt::join(t.data.shape, ", "), key, fmt::join(W.shape, ", "));
    if (!is_float(W.type))
      lora::detail::fail("{}: tensor '{}' has dtype {}; replacing it needs a float tensor", W.file, key,
                         dtype_name(W.type));
  }
  for (const auto& t : adapter.trainable_tokens) {
    const std::string key = map(t.module + ".weight");
    if (!base.contains(key))
      lora::detail::fail("{}: trainable tokens of '{}' need base tensor '{}', which the checkpoint does not have",
                         base.path().string(), t.module, key);
    const TensorView& W = base.tensor(key);
    if (W.ndim() != 2 || W.shape[1] != t.rows.cols() || !is_float(W.type))
      lora::detail::fail("{}: tensor '{}' has shape [{}] {}, but the trainable-token rows of '{}' are [{}, {}]", W.file,
                         key, fmt::join(W.shape, ", "), dtype_name(W.type), t.module, t.rows.rows(), t.rows.cols());
    for (std::int64_t id : t.indices)
      if (id < 0 || id >= W.shape[0])
        lora::detail::fail("{}: trainable token id {} of '{}' is outside the vocabulary of '{}' ([0, {}))", W.file, id,
                           t.module, key, W.shape[0]);
  }
}

/// One change a merge makes to one base tensor, applied in order.
struct MergeStep {
  enum class Kind {
    low_rank,  ///< W += scale·s·B·A (DoRA: then the magnitude's row scaling)
    bias,      ///< b += scale·s·b_B (lora_bias)
    replace,   ///< the tensor becomes a saved whole tensor (modules_to_save, base_layer, trained bias)
    rows,      ///< rows indices[i] become the trainable-token rows
    experts,   ///< W[e] += scale·s·B_e·A_e for every expert e (a parameter LoRA; transposed: its transpose)
  };
  Kind kind = Kind::low_rank;
  const PeftModule* module = nullptr;
  double scale = 1.0;
  const PeftSavedTensor* saved = nullptr;
  const PeftTrainableTokens* tokens = nullptr;
  const ParamTarget* param = nullptr;
};

namespace detail {

/// A base tensor's merge steps, ready to run on any block of rows (rows: the first
/// dimension; a 1-D tensor has rows of one element). Every step is checked, the factors cast
/// to C and, for DoRA with fan_in_fan_out, the column norms of the whole adapted weight
/// formed once (in row order, so the result does not depend on the thread count). Rows are
/// processed in blocks of merge_row_block starting at multiples of it, in an RB × cols
/// buffer, as the whole-tensor merge does: any split of the rows over threads or chunks
/// gives the same bits.
template <class C>
class RowMerger {
 public:
  static constexpr Index RB = merge_row_block;

  RowMerger(const TensorView& base, const std::vector<MergeStep>& steps, dtype to) : base_(base), to_(to) {
    // Rows are the last dimension's runs: [E, d1, d2] is E·d1 rows of d2.
    cols_ = base.ndim() >= 2 ? static_cast<Index>(base.shape.back()) : 1;
    rows_ = base.ndim() == 0 ? 1 : (cols_ > 0 ? static_cast<Index>(base.numel()) / cols_ : static_cast<Index>(base.shape[0]));
    for (const MergeStep& st : steps) prepare(st);
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  std::size_t row_bytes() const { return static_cast<std::size_t>(cols_) * dtype_size(to_); }

  /// Rows i0 .. i0+n (i0 a multiple of RB, n ≤ RB) after every step, in the output dtype, at
  /// out; V is an RB × cols scratch matrix.
  void block(Index i0, Index n, Matrix<C>& V, std::byte* out) const {
    const std::size_t len = static_cast<std::size_t>(n * cols_);
    decode_floats(base_.type, base_.bytes.data() + static_cast<std::size_t>(i0 * cols_) * dtype_size(base_.type), V.data(),
            len);
    apply(0, steps_.size(), i0, n, V);
    encode_floats(to_, V.data(), out, len);
  }

  /// Bytes [begin, end) of the merged tensor (offsets into its output bytes) at dst.
  void fill(std::uint64_t begin, std::uint64_t end, std::byte* dst) const {
    const std::uint64_t rb = row_bytes();
    if (rb == 0 || end <= begin) return;
    Matrix<C> V(RB, cols_);
    ByteBuffer tmp;
    for (Index i0 = static_cast<Index>(begin / rb) / RB * RB; i0 < rows_ && static_cast<std::uint64_t>(i0) * rb < end;
         i0 += RB) {
      const Index n = std::min(RB, rows_ - i0);
      const std::uint64_t gb = static_cast<std::uint64_t>(i0) * rb, ge = gb + static_cast<std::uint64_t>(n) * rb;
      if (gb >= begin && ge <= end) {
        block(i0, n, V, dst + (gb - begin));
      } else {  // a block cut by the range: merge it whole, keep the part inside
        tmp.resize(static_cast<std::size_t>(ge - gb));
        block(i0, n, V, tmp.data());
        const std::uint64_t lo = std::max(gb, begin), hi = std::min(ge, end);
        std::memcpy(dst + (lo - begin), tmp.data() + (lo - gb), static_cast<std::size_t>(hi - lo));
      }
    }
  }

 private:
  struct Step {
    MergeStep::Kind kind;
    const MergeStep* src;
    Matrix<C> coef, basis;  // low_rank: V(i, :) += s·coef(i, :)·basis
    C s = 0;
    Vector<C> mag, col_scale;  // DoRA: per-row magnitudes, or (fan_in_fan_out) column factors
    bool fifo = false;
    std::vector<std::pair<std::int64_t, std::size_t>> token_rows;  // rows: (row id, index), last one per id, sorted
    Index per_expert = 0;  // experts: rows of one expert (its coef rows; basis rows e·r … e·r + r − 1)
  };

  void prepare(const MergeStep& st) {
    const TensorView& base = base_;
    Step p{st.kind, &st, {}, {}, 0, {}, {}, false, {}, 0};
    switch (st.kind) {
      case MergeStep::Kind::experts: {
        // [E, out, in]: row e·out + o gets s·B_e(o, :)·A_e, so coef = B_e's rows stacked and
        // basis = A as stored; [E, in, out]: row e·in + i gets s·A_e(:, i)ᵀ·B_eᵀ.
        const ParamTarget& pt = *st.param;
        const PeftParamAdapter& w = *pt.wrapper;
        const Index E = pt.experts, r = pt.rank, in = w.in_features(), outf = w.out_features();
        const Index e0 = pt.first_expert, nE = pt.tensor_experts, o0 = pt.out_begin, nO = pt.out_rows;
        const std::vector<std::int64_t> want = pt.transposed      ? std::vector<std::int64_t>{E, in, outf}
                                               : base.ndim() == 3 ? std::vector<std::int64_t>{nE, nO, in}
                                                                  : std::vector<std::int64_t>{nO, in};
        if (base.shape != want || w.A.rows() != E * r || e0 < 0 || e0 + nE > E || o0 < 0 || o0 + nO > outf ||
            (pt.transposed && (nE != E || nO != outf)) || (base.ndim() == 2 && nE != 1))
          lora::detail::fail("{}: tensor '{}' has shape [{}], parameter LoRA '{}' needs [{}]", base.file, base.name,
                             fmt::join(base.shape, ", "), w.path, fmt::join(want, ", "));
        p.s = static_cast<C>(pt.scaling() * st.scale);
        p.per_expert = pt.transposed ? in : nO;
        p.coef.resize(nE * p.per_expert, r);
        p.basis.resize(nE * r, pt.transposed ? outf : in);
        for (Index le = 0; le < nE; ++le)
          for (Index k = 0; k < r; ++k) {
            const Index e = e0 + le;
            if (pt.transposed) {
              p.coef.block(le * in, k, in, 1) = w.A.row(e * r + k).transpose().template cast<C>();
              p.basis.row(le * r + k) = w.B.col(k * E + e).transpose().template cast<C>();
            } else {
              p.coef.block(le * nO, k, nO, 1) = w.B.col(k * E + e).segment(o0, nO).template cast<C>();
              p.basis.row(le * r + k) = w.A.row(e * r + k).template cast<C>();
            }
          }
        break;
      }
      case MergeStep::Kind::low_rank: {
        const PeftModule& mod = *st.module;
        const auto& ad = mod.adapter;
        const std::int64_t want0 = ad.fan_in_fan_out() ? ad.in_features() : ad.out_features();
        const std::int64_t want1 = ad.fan_in_fan_out() ? ad.out_features() : ad.in_features();
        if (base.ndim() != 2 || base.shape[0] != want0 || base.shape[1] != want1)
          lora::detail::fail("{}: tensor '{}' has shape {}, adapter module '{}' needs [{}, {}]", base.file, base.name,
                             fmt::format("[{}]", fmt::join(base.shape, ", ")), mod.name, want0, want1);
        p.fifo = ad.fan_in_fan_out();
        p.s = static_cast<C>(ad.scaling() * st.scale);
        p.coef = p.fifo ? Matrix<C>(ad.A().transpose().template cast<C>()) : Matrix<C>(ad.B().template cast<C>());
        p.basis = p.fifo ? Matrix<C>(ad.B().transpose().template cast<C>()) : Matrix<C>(ad.A().template cast<C>());
        if (ad.is_dora()) {
          p.mag = ad.magnitude().template cast<C>();
          if (p.fifo && p.mag.size() != cols_)
            lora::detail::fail("{}: DoRA magnitude of '{}' has {} elements, tensor '{}' has {} columns", base.file,
                               mod.name, p.mag.size(), base.name, cols_);
          if (!p.fifo && p.mag.size() != rows_)
            lora::detail::fail("{}: DoRA magnitude of '{}' has {} elements, tensor '{}' has {} rows", base.file,
                               mod.name, p.mag.size(), base.name, rows_);
        }
        break;
      }
      case MergeStep::Kind::bias: {
        const auto& b = *st.module->lora_bias;
        if (base.ndim() != 1 || rows_ != b.size())
          lora::detail::fail("{}: tensor '{}' has shape [{}], but lora_B.bias of '{}' has {} elements", base.file,
                             base.name, fmt::join(base.shape, ", "), st.module->name, b.size());
        // PEFT: bias + lora_B.bias * scaling, in the bias' dtype (float32 here).
        p.s = static_cast<C>(st.module->adapter.scaling() * st.scale);
        break;
      }
      case MergeStep::Kind::replace: {
        const TensorData& d = st.saved->data;
        if (d.shape != base.shape)
          lora::detail::fail("{}: tensor '{}' has shape [{}], the adapter's '{}' has [{}]", base.file, base.name,
                             fmt::join(base.shape, ", "), d.name, fmt::join(d.shape, ", "));
        if (!is_float(d.type))
          lora::detail::fail("{}: the adapter's '{}' has dtype {}; replacing '{}' needs a float tensor", base.file,
                             d.name, dtype_name(d.type), base.name);
        break;
      }
      case MergeStep::Kind::rows: {
        const auto& t = *st.tokens;
        if (base.ndim() != 2 || t.rows.cols() != cols_)
          lora::detail::fail("{}: tensor '{}' has rows of {}, the trainable tokens of '{}' have {}", base.file,
                             base.name, cols_, t.module, t.rows.cols());
        if (static_cast<std::size_t>(t.rows.rows()) != t.indices.size())
          lora::detail::fail("{}: trainable tokens of '{}': {} indices for {} rows", base.file, t.module,
                             t.indices.size(), t.rows.rows());
        std::map<std::int64_t, std::size_t> last;  // a repeated id: the later row wins, as row-by-row assignment
        for (std::size_t i = 0; i < t.indices.size(); ++i) {
          const std::int64_t id = t.indices[i];
          if (id < 0 || id >= rows_)
            lora::detail::fail("{}: trainable token id {} is outside '{}' ([0, {}))", base.file, id, base.name, rows_);
          last[id] = i;
        }
        p.token_rows.assign(last.begin(), last.end());
        break;
      }
    }
    steps_.push_back(std::move(p));
    Step& q = steps_.back();
    if (q.kind == MergeStep::Kind::low_rank && q.mag.size() > 0 && q.fifo) {
      // Output features are columns: their norms run over every row of W + s·ΔW (after the steps before).
      Vector<C> sq = Vector<C>::Zero(cols_);
      Matrix<C> V(RB, cols_);
      const std::size_t k = steps_.size() - 1;
      for (Index i0 = 0; i0 < rows_; i0 += RB) {
        const Index n = std::min(RB, rows_ - i0);
        decode_floats(base.type, base.bytes.data() + static_cast<std::size_t>(i0 * cols_) * dtype_size(base.type), V.data(),
                static_cast<std::size_t>(n * cols_));
        apply(0, k, i0, n, V);
        low_rank_update_rows<C>(q.coef.data() + i0 * q.coef.cols(), q.basis.data(), q.coef.cols(), cols_, q.s,
                                V.data(), cols_, n);
        sq += V.topRows(n).colwise().squaredNorm().transpose();
      }
      q.col_scale = q.mag.cwiseQuotient(sq.cwiseSqrt());
    }
  }

  // Steps [first, last) on rows i0 .. i0+n held in V.
  void apply(std::size_t first, std::size_t last, Index i0, Index n, Matrix<C>& V) const {
    for (std::size_t k = first; k < last; ++k) {
      const Step& p = steps_[k];
      switch (p.kind) {
        case MergeStep::Kind::low_rank:
          low_rank_update_rows<C>(p.coef.data() + i0 * p.coef.cols(), p.basis.data(), p.coef.cols(), cols_, p.s,
                                  V.data(), cols_, n);
          if (p.mag.size() > 0) {
            if (p.fifo)
              dora_scale_columns<C>(V.topRows(n), p.col_scale);
            else
              dora_rescale_rows<C>(V.topRows(n), p.mag.data() + i0);
          }
          break;
        case MergeStep::Kind::experts: {
          const Index r = p.coef.cols();
          for (Index row = i0; row < i0 + n;) {  // runs of rows of one expert
            const Index e = row / p.per_expert, end = std::min(i0 + n, (e + 1) * p.per_expert);
            low_rank_update_rows<C>(p.coef.data() + row * r, p.basis.data() + e * r * cols_, r, cols_, p.s,
                                    V.data() + (row - i0) * cols_, cols_, end - row);
            row = end;
          }
          break;
        }
        case MergeStep::Kind::bias: {
          const auto& b = *p.src->module->lora_bias;
          for (Index ii = 0; ii < n; ++ii) V(ii, 0) += static_cast<C>(b[i0 + ii]) * p.s;
          break;
        }
        case MergeStep::Kind::replace: {
          const TensorData& d = p.src->saved->data;
          decode_floats(d.type, d.bytes.data() + static_cast<std::size_t>(i0 * cols_) * dtype_size(d.type), V.data(),
                  static_cast<std::size_t>(n * cols_));
          break;
        }
        case MergeStep::Kind::rows: {
          const auto& t = *p.src->tokens;
          auto it = std::lower_bound(p.token_rows.begin(), p.token_rows.end(), std::pair<std::int64_t, std::size_t>{i0, 0});
          for (; it != p.token_rows.end() && it->first < i0 + n; ++it)
            V.row(it->first - i0) = t.rows.row(static_cast<Index>(it->second)).template cast<C>();
          break;
        }
      }
    }
  }

  const TensorView& base_;
  dtype to_;
  Index rows_ = 0, cols_ = 0;
  std::vector<Step> steps_;
};

/// A RowMerger in float, or in double when the tensor or the output is F64.
class TensorMerge {
 public:
  TensorMerge(const TensorView& base, const std::vector<MergeStep>& steps, dtype to) {
    if (!is_float(base.type) || !is_float(to))
      lora::detail::fail("{}: tensor '{}': merging needs float dtypes, got {} → {}", base.file, base.name,
                         dtype_name(base.type), dtype_name(to));
    if (base.type == dtype::F64 || to == dtype::F64)
      d_ = std::make_unique<RowMerger<double>>(base, steps, to);
    else
      f_ = std::make_unique<RowMerger<float>>(base, steps, to);
  }
  void fill(std::uint64_t begin, std::uint64_t end, std::byte* dst) const {
    if (f_) f_->fill(begin, end, dst);
    else d_->fill(begin, end, dst);
  }
  /// The whole tensor at out, its row blocks split over OpenMP threads.
  void all(std::byte* out) const {
    if (f_) all(*f_, out);
    else all(*d_, out);
  }

 private:
  template <class C>
  static void all(const RowMerger<C>& m, std::byte* out) {
    const Index rows = m.rows(), RB = RowMerger<C>::RB, blocks = (rows + RB - 1) / RB;
    const std::size_t rb = m.row_bytes();
    if (rb == 0) return;
LORA_IO_OMP(omp parallel)
    {
      Matrix<C> V(RB, m.cols());
LORA_IO_OMP(omp for schedule(static))
      for (Index g = 0; g < blocks; ++g) {
        const Index i0 = g * RB;
        m.block(i0, std::min(RB, rows - i0), V, out + static_cast<std::size_t>(i0) * rb);
      }
    }
  }
  std::unique_ptr<RowMerger<float>> f_;
  std::unique_ptr<RowMerger<double>> d_;
};

/// Bytes [begin, end) of float tensor v converted to `to` (offsets into the converted bytes).
inline void convert_range(const TensorView& v, dtype to, std::uint64_t begin, std::uint64_t end, std::byte* dst) {
  const std::size_t ie = dtype_size(v.type), oe = dtype_size(to), n = static_cast<std::size_t>(v.numel());
  constexpr std::size_t block = 1 << 14;
  std::vector<double> wide;
  std::vector<float> narrow;
  ByteBuffer tmp;
  const bool use_double = v.type == dtype::F64 || to == dtype::F64;
  for (std::size_t e0 = static_cast<std::size_t>(begin / oe) / block * block; e0 < n && e0 * oe < end; e0 += block) {
    const std::size_t len = std::min(block, n - e0);
    const std::uint64_t gb = e0 * oe, ge = gb + len * oe;
    const bool inside = gb >= begin && ge <= end;
    std::byte* out = inside ? dst + (gb - begin) : (tmp.resize(len * oe), tmp.data());
    if (use_double) {
      wide.resize(len);
      decode_floats(v.type, v.bytes.data() + e0 * ie, wide.data(), len);
      encode_floats(to, wide.data(), out, len);
    } else {
      narrow.resize(len);
      decode_floats(v.type, v.bytes.data() + e0 * ie, narrow.data(), len);
      encode_floats(to, narrow.data(), out, len);
    }
    if (!inside) {
      const std::uint64_t lo = std::max(gb, begin), hi = std::min(ge, end);
      std::memcpy(dst + (lo - begin), tmp.data() + (lo - gb), static_cast<std::size_t>(hi - lo));
    }
  }
}

}  // namespace detail

/// The merged bytes of one base weight W ([out, in], or [in, out] with fan_in_fan_out)
/// for module `mod`, in dtype `to`; `pool` (optional) supplies the buffer.
inline ByteBuffer merge_weight(const TensorView& W, const PeftModule& mod, double scale, dtype to,
                               BufferPool* pool = nullptr) {
  const std::vector<MergeStep> steps{{MergeStep::Kind::low_rank, &mod, scale, nullptr, nullptr}};
  const detail::TensorMerge m(W, steps, to);
  const std::size_t n = static_cast<std::size_t>(W.numel()) * dtype_size(to);
  ByteBuffer out = pool ? pool->acquire(n) : ByteBuffer(n);
  m.all(out.data());
  return out;
}

/// The base tensor after `steps` (each on the result of the one before, in float, or double
/// for F64 tensors), rounded once to `to`.
inline ByteBuffer apply_merge_steps(const TensorView& base, const std::vector<MergeStep>& steps, dtype to,
                                    BufferPool* pool = nullptr) {
  const detail::TensorMerge m(base, steps, to);
  const std::size_t n = static_cast<std::size_t>(base.numel()) * dtype_size(to);
  ByteBuffer out = pool ? pool->acquire(n) : ByteBuffer(n);
  m.all(out.data());
  return out;
}

/// What a stacked merge does to each base tensor: the steps, in adapter order and within an
/// adapter whole-tensor replacements first, then LoRA deltas and biases, then token rows
/// (as loading the adapter and then merge_and_unload does). With `tied` (tied input and
/// output embeddings) the token rows of an embedding also replace lm_head's rows.
inline std::map<std::string, std::vector<MergeStep>> merge_plan(const Checkpoint& base,
                                                                const std::vector<ScaledAdapter>& adapters,
                                                                const BaseKeyMap& map, double scale, bool tied,
                                                                const std::vector<std::vector<ParamTarget>>& params = {}) {
  std::map<std::string, std::vector<MergeStep>> plan;
  for (std::size_t a = 0; a < adapters.size(); ++a) {
    const auto& sa = adapters[a];
    const PeftAdapter& ad = *sa.adapter;
    check_adapter_fits(base, ad, map);
    if (!ad.params.empty() &&
        (a >= params.size() || std::any_of(ad.params.begin(), ad.params.end(), [&](const PeftParamAdapter& w) {
           return std::none_of(params[a].begin(), params[a].end(), [&](const ParamTarget& t) { return t.wrapper == &w; });
         })))
      lora::detail::fail("merge: the adapter's parameter LoRAs ({}) were not matched to the base "
                         "(resolve_parameter_targets)", ad.params.size());
    for (const auto& t : ad.saved) plan[map(t.key)].push_back({MergeStep::Kind::replace, nullptr, 1.0, &t, nullptr});
    for (const auto& m : ad.modules) {
      plan[map(m.name + ".weight")].push_back({MergeStep::Kind::low_rank, &m, sa.scale * scale, nullptr, nullptr});
      if (m.lora_bias) plan[map(m.name + ".bias")].push_back({MergeStep::Kind::bias, &m, sa.scale * scale, nullptr, nullptr});
    }
    // PEFT's merge_and_unload merges the outermost wrapper first (depth 0, 1, …).
    if (a < params.size())
      for (const auto& pt : params[a])
        plan[pt.key].push_back({MergeStep::Kind::experts, nullptr, sa.scale * scale, nullptr, nullptr, &pt});
    for (const auto& t : ad.trainable_tokens) {
      plan[map(t.module + ".weight")].push_back({MergeStep::Kind::rows, nullptr, 1.0, nullptr, &t});
      const std::string head = map("lm_head.weight");
      if (tied && base.contains(head) && base.tensor(head).shape == base.tensor(map(t.module + ".weight")).shape)
        plan[head].push_back({MergeStep::Kind::rows, nullptr, 1.0, nullptr, &t});
    }
  }
  return plan;
}

struct MergeOptions {
  double scale = 1.0;                  ///< multiplies every module's s ("halve alpha at inference" = 0.5)
  std::optional<dtype> out_dtype;      ///< convert every float tensor to this (F32, F16, BF16 or F64)
  /// Called once each tensor is written, in checkpoint order, one call at a time (from the
  /// writing threads).
  std::function<void(const WriteProgress&)> progress;
  /// Threads that read, merge and write chunks of the output at once; 0: one per hardware thread.
  unsigned threads = 0;
  /// Bytes of output each thread fills and writes at a time (a multiple of 4096).
  std::size_t chunk_bytes = std::size_t{8} << 20;
  /// How adapter paths name base tensors; unset: found by resolve_base_keys.
  std::optional<BaseKeyMap> base_keys;
  /// How 3-D expert parameters are stored, for parameter LoRAs (target_parameters).
  ExpertsLayout experts_layout = ExpertsLayout::automatic;
  /// Tied input/output embeddings (trainable-token rows then go into lm_head too); unset:
  /// the base folder's config.json "tie_word_embeddings", else whether lm_head.weight and
  /// the embedding hold the same bytes.
  std::optional<bool> tie_word_embeddings;
  /// For a folder output from a folder base: copy the base's other files (config.json with
  /// its dtype set to what was written, generation_config.json, tokenizer files, …).
  bool copy_base_files = true;
};

struct MergeSummary {
  std::size_t merged = 0;    ///< tensors changed by the adapters
  std::size_t copied = 0;    ///< tensors copied unchanged (possibly converted)
  std::uint64_t bytes = 0;   ///< bytes of tensor data written
  BaseKeyMap key_map;        ///< how adapter paths were mapped to base keys
  std::vector<std::string> files_copied;   ///< other files of the base folder written to the output
  std::vector<std::string> files_skipped;  ///< base folder entries not copied (weights in other formats, folders)
};

/// Whether a file of a model folder holds weights in some format (so a merged folder must not
/// carry it: it would hold the unmerged model): *.safetensors, *.bin, *.pt, *.pth, *.ckpt,
/// *.h5, *.msgpack, *.gguf, *.onnx and the weight indexes (*.index.json).
inline bool is_weight_file(const std::filesystem::path& p) {
  static const std::set<std::string> ext = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                                            ".msgpack",     ".gguf", ".onnx", ".pkl"};
  const std::string name = p.filename().string();
  return ext.count(p.extension().string()) || detail::ends_with(name, ".index.json");
}

/// transformers' name of a dtype in config.json ("float32", "bfloat16", …).
inline const char* torch_dtype_name(dtype t) {
  switch (t) {
    case dtype::F32: return "float32";
    case dtype::BF16: return "bfloat16";
    case dtype::F16: return "float16";
    case dtype::F64: return "float64";
    default: return "float32";
  }
}

namespace detail {
inline bool tied_embeddings(const Checkpoint& base, const std::vector<ScaledAdapter>& adapters, const BaseKeyMap& map) {
  namespace fs = std::filesystem;
  const fs::path cfg = fs::is_directory(base.path()) ? base.path() / "config.json" : base.path().parent_path() / "config.json";
  if (fs::exists(cfg)) {
    const auto j = read_json_file(cfg);
    if (j.is_object() && j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean())
      return j["tie_word_embeddings"].get<bool>();
  }
  const std::string head = map("lm_head.weight");
  if (!base.contains(head)) return false;
  for (const auto& sa : adapters)
    for (const auto& t : sa.adapter->trainable_tokens) {
      const std::string emb = map(t.module + ".weight");
      if (base.contains(emb) && base.tensor(emb).bytes.size() == base.tensor(head).bytes.size() &&
          std::memcmp(base.tensor(emb).bytes.data(), base.tensor(head).bytes.data(), base.tensor(head).bytes.size()) == 0)
        return true;
    }
  return false;
}
}  // namespace detail

/// Merges `adapters`, in order, into `base` and writes the result to `out`: equal to merging
/// the first, then the next into that result, and so on (computed in float without rounding
/// in between). Each adapter's LoRA deltas (and lora_B biases) are scaled by its scale ×
/// options.scale; its whole tensors (modules_to_save, an embedding's base_layer) replace the
/// base tensors and its trainable-token rows replace the embedding's rows, as
/// merge_and_unload() gives them. `out` is a file when it ends in ".safetensors", else a
/// folder with the base's shard layout (model.safetensors for a single-file base) and, from a
/// folder base, the base's other files (MergeOptions::copy_base_files). Same keys, order,
/// shapes and dtypes as the base (float dtypes changed to options.out_dtype when set).
/// Atomic; nothing is written when an adapter does not fit the base.
///
///   auto a = lora::io::load_peft_adapter("a/"), b = lora::io::load_peft_adapter("b/");
///   lora::io::merge_peft_checkpoint(base, {{&a, 1.0}, {&b, 0.5}}, "merged/");
inline MergeSummary merge_peft_checkpoint(const Checkpoint& base, const std::vector<ScaledAdapter>& adapters,
                                          const std::filesystem::path& out, const MergeOptions& options = {}) {
  namespace fs = std::filesystem;
  if (adapters.empty()) lora::detail::fail("merge needs at least one adapter");
  for (const auto& sa : adapters) {
    if (!sa.adapter) lora::detail::fail("merge: adapter pointer is null");
    if (!std::isfinite(sa.scale)) lora::detail::fail("merge: adapter scale must be finite, got {}", sa.scale);
  }
  if (options.out_dtype && !is_float(*options.out_dtype))
    lora::detail::fail("output dtype must be F32, F16, BF16 or F64, got {}", dtype_name(*options.out_dtype));
  if (!std::isfinite(options.scale)) lora::detail::fail("merge scale must be finite, got {}", options.scale);
  MergeSummary summary;
  summary.key_map = resolve_base_keys(base, adapters, options.base_keys);
  const bool tied = options.tie_word_embeddings.value_or(detail::tied_embeddings(base, adapters, summary.key_map));
  std::vector<std::vector<ParamTarget>> params;
  for (const auto& sa : adapters)
    params.push_back(resolve_parameter_targets(base, *sa.adapter, summary.key_map, options.experts_layout));
  const auto plan = merge_plan(base, adapters, summary.key_map, options.scale, tied, params);

  auto retype = [&](const TensorView& v) { return options.out_dtype && is_float(v.type) ? *options.out_dtype : v.type; };
  CheckpointLayout layout = layout_of(base, retype);
  const bool single = out.extension() == ".safetensors";
  if (single) {
    CheckpointLayout one;
    one.single_file = true;
    one.shards.push_back(ShardSpec{out.filename().string(), {}, base.shard(0).metadata()});
    for (auto& s : layout.shards)
      for (auto& t : s.tensors) one.shards[0].tensors.push_back(std::move(t));
    layout = std::move(one);
  } else if (!base.sharded()) {
    layout.shards[0].file = "model.safetensors";
  }

  // The float dtype most of the written bytes have: what config.json's dtype should say.
  std::map<dtype, std::uint64_t> float_bytes;
  for (const auto& s : layout.shards)
    for (const auto& t : s.tensors)
      if (is_float(t.type)) float_bytes[t.type] += t.nbytes();
  dtype main_type = dtype::F32;
  std::uint64_t most = 0;
  for (const auto& [t, b] : float_bytes)
    if (b > most) most = b, main_type = t;

  std::function<void(const fs::path&)> extra;
  if (!single && options.copy_base_files && fs::is_directory(base.path())) {
    for (const auto& e : fs::directory_iterator(base.path())) {
      const std::string name = e.path().filename().string();
      const bool ours = e.path().extension() == ".safetensors" || name == checkpoint_index_name;  // written anew
      if (ours) continue;
      if (!e.is_regular_file() || is_weight_file(e.path()))
        summary.files_skipped.push_back(name + (e.is_directory() ? "/" : ""));
      else
        summary.files_copied.push_back(name);
    }
    std::sort(summary.files_copied.begin(), summary.files_copied.end());
    std::sort(summary.files_skipped.begin(), summary.files_skipped.end());
    extra = [&](const fs::path& tmp) {
      for (const auto& name : summary.files_copied) {
        const fs::path from = base.path() / name;
        if (name == "config.json") {
          auto j = detail::read_json_file(from);
          if (j.is_object()) {
            bool set = false;
            for (const char* k : {"dtype", "torch_dtype"})
              if (j.contains(k)) j[k] = torch_dtype_name(main_type), set = true;
            if (!set) j["dtype"] = torch_dtype_name(main_type);
          }
          write_bytes(tmp / name, j.dump(2) + "\n");
        } else {
          fs::copy_file(from, tmp / name);
        }
      }
    };
  }

  // Every merged tensor checked and prepared before anything is written.
  std::map<std::string, detail::TensorMerge> merges;
  for (const auto& s : layout.shards)
    for (const auto& t : s.tensors) {
      summary.bytes += t.nbytes();
      if (auto it = plan.find(t.name); it != plan.end()) {
        merges.try_emplace(t.name, base.tensor(t.name), it->second, t.type);
        ++summary.merged;
      } else {
        ++summary.copied;
      }
    }
  ParallelWriteOptions wopt;
  wopt.threads = options.threads;
  wopt.chunk_bytes = options.chunk_bytes;
  write_checkpoint_parallel(
      out, layout,
      [&](const TensorSpec& spec, std::uint64_t b, std::uint64_t e, std::byte* dst) {
        if (auto it = merges.find(spec.name); it != merges.end()) return it->second.fill(b, e, dst);
        const TensorView& v = base.tensor(spec.name);
        if (spec.type == v.type)
          std::memcpy(dst, v.bytes.data() + b, static_cast<std::size_t>(e - b));
        else
          detail::convert_range(v, spec.type, b, e, dst);
      },
      options.progress, extra, wopt);
  return summary;
}

/// Merges one adapter (strength options.scale) into `base`: merge_peft_checkpoint of
/// {{&adapter, 1.0}}.
inline MergeSummary merge_peft_checkpoint(const Checkpoint& base, const PeftAdapter& adapter,
                                          const std::filesystem::path& out, const MergeOptions& options = {}) {
  return merge_peft_checkpoint(base, std::vector<ScaledAdapter>{{&adapter, 1.0}}, out, options);
}

/// The modules `adapter`'s config targets in `base` (2-D "<module>.weight" tensors, through
/// `map`) that the adapter has no tensors for: PEFT creates their LoRA layers with B = 0 and
/// warns about missing keys; they leave the model unchanged. Empty when the config names no
/// targets or uses "all-linear".
inline std::vector<std::string> targeted_without_tensors(const Checkpoint& base, const PeftAdapter& adapter,
                                                         const BaseKeyMap& map = {}) {
  std::vector<std::string> out;
  const PeftConfig& cfg = adapter.config;
  if (!cfg.has_targets()) return out;
  if (std::find(cfg.target_modules.begin(), cfg.target_modules.end(), "all-linear") != cfg.target_modules.end()) return out;
  std::set<std::string> have;
  for (const auto& m : adapter.modules) have.insert(map(m.name));
  for (const auto& key : base.names()) {
    if (!detail::ends_with(key, ".weight") || base.tensor(key).ndim() != 2) continue;
    const std::string base_module = key.substr(0, key.size() - 7);
    // Back to the adapter's path: undo the mapping.
    std::string module = base_module;
    if (!map.identity() && base_module.rfind(map.add, 0) == 0) module = map.strip + base_module.substr(map.add.size());
    if (cfg.targets(module) && !have.count(base_module)) out.push_back(module);
  }
  return out;
}

}  // namespace lora::io
