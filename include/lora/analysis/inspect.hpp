#pragma once
// Spectral report of a whole PEFT adapter: per module the exact singular values
// of ΔW = s·B·A and their metrics, and rank recommendations for the adapter.
// What `lora inspect` prints; usable without the CLI.
//
// Compile time: the non-template functions here are `template <class = void>`, so the
// decompositions (and JSON code) they use are compiled only in files that call them, not in
// every file that includes this header (docs/reliability.md, "Sanitizers").

#include <lora/analysis/intruder.hpp>
#include <lora/analysis/lowrank_svd.hpp>
#include <lora/analysis/metrics.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace lora::analysis {

/// One module of the report.
struct ModuleReport {
  std::string name;  ///< without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"
  Index out_features = 0, in_features = 0, rank = 0;
  double alpha = 0, scaling = 0;
  Vector<double> singular_values;  ///< of s·B·A, descending, length min(r, in, out)
  SpectrumMetrics metrics;
  std::optional<IntruderReport> intruders;  ///< with a base model only
};

/// The whole adapter.
struct AdapterReport {
  std::vector<ModuleReport> modules;                ///< sorted by name
  std::vector<RankRecommendation> recommendations;  ///< one per energy threshold
  std::vector<double> thresholds;
  Index parameters = 0;  ///< Σ (in + out)·r
  double frobenius_norm = 0;  ///< sqrt(Σ over modules ‖ΔW‖_F²)
};

/// Options of inspect_adapter.
struct InspectOptions {
  std::vector<double> energy_thresholds = default_energy_thresholds;
  unsigned threads = 0;  ///< modules analysed in parallel; 0: all cores
  /// Base model (.safetensors file with keys "<module>.weight"): adds intruder dimensions.
  std::optional<std::filesystem::path> base_model;
  IntruderOptions intruder = {};
};

/// The module type: the last component of the path ("q_proj", "down_proj").
inline std::string module_type(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

namespace detail {

/// Calls fn(map) with an Eigen::Map of the tensor in its stored float type: no copy.
template <class Fn>
decltype(auto) with_matrix_map(const io::TensorView& t, Fn&& fn) {
  const Index rows = static_cast<Index>(t.shape.at(0)), cols = static_cast<Index>(t.shape.at(1));
  auto go = [&](auto tag) -> decltype(auto) {
    using S = decltype(tag);
    return fn(Eigen::Map<const Matrix<S>>(reinterpret_cast<const S*>(t.bytes.data()), rows, cols));
  };
  switch (t.type) {
    case io::dtype::F32: return go(float{});
    case io::dtype::F64: return go(double{});
    case io::dtype::BF16: return go(bfloat16{});
    case io::dtype::F16: return go(half{});
    default:
      lora::detail::fail("{}: tensor '{}' has dtype {}, expected a float type (F32, F16, BF16 or F64)", t.file, t.name,
                         io::dtype_name(t.type));
  }
}

/// The LoRA factors of one module as mapped tensors.
struct MappedModule {
  std::string name;
  const io::TensorView* A = nullptr;
  const io::TensorView* B = nullptr;
};

/// Pairs lora_A / lora_B tensors of a PEFT adapter_model.safetensors (PEFT's key
/// layout, see io/peft.hpp) without converting them; checks ranks against the config.
inline std::vector<MappedModule> mapped_modules(const io::SafetensorsFile& f, const io::PeftConfig& cfg) {
  const std::string& prefix = io::detail::peft_prefix();
  std::map<std::string, MappedModule> parts;
  for (const auto& t : f.tensors()) {
    std::string_view key = t.name;
    if (key.substr(0, prefix.size()) == prefix) key.remove_prefix(prefix.size());
    for (const char* suffix : {".lora_A.weight", ".lora_B.weight"}) {
      if (!io::detail::ends_with(key, suffix) || key.size() == std::strlen(suffix)) continue;
      auto& m = parts[std::string(key.substr(0, key.size() - std::strlen(suffix)))];
      (suffix[6] == 'A' ? m.A : m.B) = &t;
    }
  }
  std::vector<MappedModule> out;
  for (auto& [name, m] : parts) {
    m.name = name;
    if (!m.A) lora::detail::fail("{}: module '{}' has lora_B.weight but no lora_A.weight", f.path(), name);
    if (!m.B) lora::detail::fail("{}: module '{}' has lora_A.weight but no lora_B.weight", f.path(), name);
    if (m.A->ndim() != 2 || m.B->ndim() != 2)
      lora::detail::fail("{}: module '{}': lora_A and lora_B must be matrices, got {} and {} dimensions", f.path(), name,
                         m.A->ndim(), m.B->ndim());
    const int r = cfg.rank_for(name);
    if (m.A->shape[0] != r || m.B->shape[1] != r)
      lora::detail::fail("{}: module '{}': lora_A is [{}, {}] and lora_B is [{}, {}], but the config gives r = {}",
                         f.path(), name, m.A->shape[0], m.A->shape[1], m.B->shape[0], m.B->shape[1], r);
    out.push_back(m);
  }
  if (out.empty()) lora::detail::fail("{}: holds no LoRA tensors (<module>.lora_A.weight / .lora_B.weight)", f.path());
  return out;
}

inline void finish_report(AdapterReport& rep, const std::vector<double>& thresholds) {
  rep.thresholds = thresholds;
  std::vector<ModuleSpectrum> spectra;
  double fro2 = 0;
  for (const auto& m : rep.modules) {
    spectra.push_back({m.singular_values, m.out_features, m.in_features, m.rank});
    rep.parameters += (m.in_features + m.out_features) * m.rank;
    fro2 += m.metrics.frobenius_norm * m.metrics.frobenius_norm;
  }
  rep.frobenius_norm = std::sqrt(fro2);
  for (double t : thresholds) rep.recommendations.push_back(recommend_rank(spectra, t));
}

inline void check_thresholds(const std::vector<double>& t) {
  if (t.empty()) lora::detail::fail("inspect: at least one energy threshold is needed");
  for (double x : t) check_tau(x);
}

}  // namespace detail

/// Reads a PEFT adapter folder memory-mapped and reports every module: the exact
/// spectrum of s·B·A from r × r Gram matrices accumulated in double while the
/// factors are read in blocks (bf16 is never converted whole), modules in
/// parallel. O(Σ (in + out)·r²).
///
///   auto rep = lora::analysis::inspect_adapter("my-adapter");
///   fmt::print("{}\n", rep.recommendations.back().text);
template <class = void>
inline AdapterReport inspect_adapter(const std::filesystem::path& folder, const InspectOptions& opt = {}) {
  namespace fs = std::filesystem;
  detail::check_thresholds(opt.energy_thresholds);
  if (!fs::is_directory(folder))
    lora::detail::fail("{}: not a folder (expected a PEFT adapter folder with adapter_config.json)", folder.string());
  const io::PeftConfig cfg = io::load_peft_config(folder);
  const fs::path wfile = folder / "adapter_model.safetensors";
  if (!fs::exists(wfile))
    lora::detail::fail("{}: missing (a PEFT adapter folder needs adapter_model.safetensors)", wfile.string());
  const auto file = io::SafetensorsFile::open(wfile);
  // The loader's checks (r and shapes against the config, use_dora against the magnitude
  // tensors, stray or unsupported tensors), without converting anything.
  io::peft_module_tensors(file, cfg);
  const auto mods = detail::mapped_modules(file, cfg);
  std::optional<io::SafetensorsFile> base;
  if (opt.base_model) base = io::SafetensorsFile::open(*opt.base_model);

  AdapterReport rep;
  rep.modules.resize(mods.size());
  detail::parallel_for(static_cast<Index>(mods.size()), opt.threads, [&](Index i) {
    const auto& mm = mods[static_cast<std::size_t>(i)];
    ModuleReport& m = rep.modules[static_cast<std::size_t>(i)];
    m.name = mm.name;
    m.rank = cfg.rank_for(mm.name);
    m.alpha = cfg.alpha_for(mm.name);
    m.scaling = cfg.scaling_for(mm.name);
    // ΔW as the base layer stores it: [out × in], or [in × out] with fan_in_fan_out
    m.out_features = cfg.fan_in_fan_out ? mm.A->shape[1] : mm.B->shape[0];
    m.in_features = cfg.fan_in_fan_out ? mm.B->shape[0] : mm.A->shape[1];
    detail::with_matrix_map(*mm.B, [&](const auto& B) {
      detail::with_matrix_map(*mm.A, [&](const auto& A) {
        m.singular_values = lowrank_singular_values(B, A, m.scaling);
        return 0;
      });
      return 0;
    });
    m.metrics = spectrum_metrics(m.singular_values, m.out_features, m.in_features, opt.energy_thresholds);
    if (base) {
      const std::string key = mm.name + ".weight";
      if (!base->contains(key))
        lora::detail::fail("{}: no tensor '{}' for adapter module '{}'", base->path(), key, mm.name);
      Matrix<double> W = base->tensor(key).to_matrix<double>();
      if (cfg.fan_in_fan_out) W.transposeInPlace();
      const Matrix<double> A = mm.A->to_matrix<double>(), B = mm.B->to_matrix<double>();
      if (W.rows() != B.rows() || W.cols() != A.cols())
        lora::detail::fail("{}: tensor '{}' is [{} x {}], but adapter module '{}' has ΔW [{} x {}]", base->path(), key,
                           W.rows(), W.cols(), mm.name, B.rows(), A.cols());
      m.intruders = intruder_dimensions(W, B, A, m.scaling, opt.intruder);
    }
  });
  detail::finish_report(rep, opt.energy_thresholds);
  return rep;
}

/// The same report for an adapter already in memory.
template <class = void>
inline AdapterReport inspect_adapter(const io::PeftAdapter& adapter, const InspectOptions& opt = {}) {
  detail::check_thresholds(opt.energy_thresholds);
  AdapterReport rep;
  rep.modules.resize(adapter.modules.size());
  detail::parallel_for(static_cast<Index>(adapter.modules.size()), opt.threads, [&](Index i) {
    const auto& pm = adapter.modules[static_cast<std::size_t>(i)];
    ModuleReport& m = rep.modules[static_cast<std::size_t>(i)];
    const auto& a = pm.adapter;
    m.name = pm.name;
    m.rank = a.rank();
    m.alpha = a.alpha();
    m.scaling = a.scaling();
    m.out_features = a.fan_in_fan_out() ? a.in_features() : a.out_features();
    m.in_features = a.fan_in_fan_out() ? a.out_features() : a.in_features();
    m.singular_values = lowrank_singular_values(a.B(), a.A(), a.scaling());
    m.metrics = spectrum_metrics(m.singular_values, m.out_features, m.in_features, opt.energy_thresholds);
  });
  detail::finish_report(rep, opt.energy_thresholds);
  return rep;
}

}  // namespace lora::analysis
