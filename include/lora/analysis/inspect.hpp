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

#include <algorithm>
#include <filesystem>
#include <functional>
#include <mutex>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace lora::analysis {

/// One module of the report.
struct ModuleReport {
  std::string name;  ///< without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"
  /// Features as the layer sees them: in = what it reads (A's columns; the vocabulary of an
  /// embedding), out = what it produces (B's rows), whether or not the weight is stored
  /// transposed (Conv1D, fan_in_fan_out; embeddings store [vocab × dim]).
  Index out_features = 0, in_features = 0, rank = 0;
  std::string kind = "linear";  ///< "linear", "conv1d" (fan_in_fan_out) or "embedding"
  double alpha = 0, scaling = 0;
  Vector<double> singular_values;  ///< of s·B·A, descending, length min(r, in, out)
  SpectrumMetrics metrics;
  std::optional<IntruderReport> intruders;  ///< with a base model only
};

/// A whole tensor the adapter carries (modules_to_save copy, an embedding's base layer, a
/// trained bias) or its trainable-token rows: listed, not analysed.
struct WholeTensorReport {
  std::string name;  ///< the base tensor it replaces ("lm_head.weight") or changes
  std::string role;  ///< "modules_to_save", "base_layer", "bias" or "trainable_tokens"
  io::dtype type = io::dtype::F32;
  std::vector<std::int64_t> shape;
  Index parameters = 0;
};

/// A module whose spectrum stands out from the adapter's other modules in the way stacked
/// or combined adapters do (see spectral_spikes).
struct SpectralSpike {
  std::string name;
  std::string kind;      ///< "top": σ₁ far above its type's median; "gap": σ₁/σ₂ far above the adapter's median
  double value = 0;      ///< σ₁ (top) or σ₁/σ₂ (gap)
  double median = 0;     ///< the median it is compared with
  double ratio = 0;      ///< value / median
};

/// The whole adapter.
struct AdapterReport {
  std::vector<ModuleReport> modules;                ///< in natural order of their names (layers.2 before layers.10)
  std::vector<WholeTensorReport> whole;             ///< whole tensors and token rows, by name
  std::vector<RankRecommendation> recommendations;  ///< one per energy threshold
  std::vector<double> thresholds;
  Index parameters = 0;  ///< Σ (in + out)·r
  double frobenius_norm = 0;  ///< sqrt(Σ over modules ‖ΔW‖_F²)
  std::vector<SpectralSpike> spikes;  ///< spectral_spikes(modules, …), by module name
};

/// Thresholds of spectral_spikes (ratios to a median: scale-free).
struct SpikeOptions {
  double top_ratio = 8.0;  ///< flag σ₁(m) ≥ top_ratio · median σ₁ of m's module type
  double gap_ratio = 8.0;  ///< flag σ₁/σ₂(m) ≥ gap_ratio · median σ₁/σ₂ over all modules
  Index min_modules = 3;   ///< medians of fewer modules are not trusted (nothing flagged)
};

/// Options of inspect_adapter.
struct InspectOptions {
  std::vector<double> energy_thresholds = default_energy_thresholds;
  unsigned threads = 0;  ///< modules analysed in parallel; 0: all cores
  /// Base model (.safetensors file with keys "<module>.weight"): adds intruder dimensions.
  std::optional<std::filesystem::path> base_model;
  IntruderOptions intruder = {};
  /// Called after each module (done, total), from the analysing threads one at a time.
  std::function<void(std::size_t, std::size_t)> progress;
  SpikeOptions spikes = {};
};

/// "layers.2.x" < "layers.10.x": runs of digits compare as numbers, the rest byte by byte.
inline bool natural_less(std::string_view a, std::string_view b) {
  std::size_t i = 0, j = 0;
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      std::size_t i2 = i, j2 = j;
      while (i2 < a.size() && digit(a[i2])) ++i2;
      while (j2 < b.size() && digit(b[j2])) ++j2;
      std::string_view x = a.substr(i, i2 - i), y = b.substr(j, j2 - j);
      while (x.size() > 1 && x.front() == '0') x.remove_prefix(1);
      while (y.size() > 1 && y.front() == '0') y.remove_prefix(1);
      if (x.size() != y.size()) return x.size() < y.size();
      if (x != y) return x < y;
      i = i2, j = j2;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i, ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

/// The module type: the last component of the path ("q_proj", "down_proj").
inline std::string module_type(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

/// Modules whose spectrum looks like that of a stacked or combined adapter, by two
/// scale-free rules (multiplying ΔW by any constant, or all of them, changes nothing):
///  - "top":  σ₁(m) / median{σ₁(m') : m' of m's type (q_proj, …)} ≥ top_ratio. Adding a
///    second adapter, or the same one twice, to some modules (a stack whose members cover
///    different modules, a combination weight applied twice) lifts those modules' whole
///    spectrum above the same projection in the other layers.
///  - "gap":  (σ₁/σ₂)(m) / median{(σ₁/σ₂)(m')} ≥ gap_ratio over all modules of rank ≥ 2. Two
///    adapters that share a direction in a module add coherently along it (σ₁ grows like the
///    sum) and incoherently elsewhere, so one singular value detaches from the rest; a
///    trained LoRA's σ₁/σ₂ is of order 1–3.
/// A median needs min_modules modules (of the type, or in all); modules with σ₁ = 0 are
/// skipped. Sorted by name, "top" before "gap".
inline std::vector<SpectralSpike> spectral_spikes(const std::vector<ModuleReport>& modules,
                                                  const SpikeOptions& opt = {}) {
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  std::map<std::string, std::vector<double>> top_by_type;
  std::vector<double> gaps;
  auto top = [](const ModuleReport& m) { return m.singular_values.size() ? m.singular_values(0) : 0.0; };
  auto gap = [](const ModuleReport& m) {
    const auto& s = m.singular_values;
    return s.size() >= 2 && s(1) > 0 ? s(0) / s(1) : std::numeric_limits<double>::infinity();
  };
  for (const auto& m : modules) {
    if (!(top(m) > 0)) continue;
    top_by_type[module_type(m.name)].push_back(top(m));
    if (m.singular_values.size() >= 2) gaps.push_back(gap(m));
  }
  std::map<std::string, double> top_median;
  for (const auto& [t, v] : top_by_type)
    if (static_cast<Index>(v.size()) >= opt.min_modules) top_median[t] = median(v);
  const double gap_median =
      static_cast<Index>(gaps.size()) >= opt.min_modules ? median(gaps) : std::numeric_limits<double>::quiet_NaN();
  std::vector<SpectralSpike> out;
  for (const auto& m : modules) {
    if (!(top(m) > 0)) continue;
    if (auto it = top_median.find(module_type(m.name)); it != top_median.end() && top(m) >= opt.top_ratio * it->second)
      out.push_back({m.name, "top", top(m), it->second, top(m) / it->second});
    if (m.singular_values.size() >= 2 && std::isfinite(gap_median) && gap(m) >= opt.gap_ratio * gap_median)
      out.push_back({m.name, "gap", gap(m), gap_median, gap(m) / gap_median});
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const SpectralSpike& a, const SpectralSpike& b) { return natural_less(a.name, b.name); });
  return out;
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
  bool embedding = false;
};

/// Pairs lora_A / lora_B tensors of a PEFT adapter_model.safetensors (PEFT's key
/// layout, see io/peft.hpp) without converting them; checks ranks against the config.
inline std::vector<MappedModule> mapped_modules(const io::SafetensorsFile& f, const io::PeftConfig& cfg) {
  std::vector<MappedModule> out;
  for (const auto& p : io::scan_peft_tensors(f, cfg).modules)
    out.push_back({p.name, p.A, p.B, p.kind == io::PeftModuleKind::embedding});
  return out;
}

/// One ModuleReport per expert of a parameter LoRA (kind "expert", named as
/// PeftParamAdapter::expert_name): the spectrum of s·B_e·A_e.
template <class MA, class MB>
void expert_reports(std::vector<ModuleReport>& out, const io::PeftParamAdapter& w, const MA& A, const MB& B,
                    const std::vector<double>& thresholds) {
  if (w.rank <= 0)
    lora::detail::fail("parameter LoRA '{}': rank_pattern gives its candidate parameters ({}) different ranks, so its "
                       "experts cannot be told apart without the base model", w.path, fmt::join(w.candidates, ", "));
  const Index r = w.rank, E = w.experts();
  for (Index e = 0; e < E; ++e) {
    ModuleReport m;
    m.name = w.expert_name(e);
    m.rank = r;
    m.alpha = w.alpha;
    m.scaling = w.scaling();
    m.kind = "expert";
    m.out_features = B.rows();
    m.in_features = A.cols();
    Matrix<double> Be(B.rows(), r);
    for (Index k = 0; k < r; ++k) Be.col(k) = B.col(k * E + e).template cast<double>();
    const Matrix<double> Ae = A.middleRows(e * r, r).template cast<double>();
    m.singular_values = lowrank_singular_values(Be, Ae, m.scaling);
    m.metrics = spectrum_metrics(m.singular_values, m.out_features, m.in_features, thresholds);
    out.push_back(std::move(m));
  }
}

inline void finish_report(AdapterReport& rep, const std::vector<double>& thresholds, const SpikeOptions& spikes) {
  rep.thresholds = thresholds;
  std::stable_sort(rep.modules.begin(), rep.modules.end(),
                   [](const ModuleReport& a, const ModuleReport& b) { return natural_less(a.name, b.name); });
  std::stable_sort(rep.whole.begin(), rep.whole.end(),
                   [](const WholeTensorReport& a, const WholeTensorReport& b) { return natural_less(a.name, b.name); });
  std::vector<ModuleSpectrum> spectra;
  double fro2 = 0;
  for (const auto& m : rep.modules) {
    spectra.push_back({m.singular_values, m.out_features, m.in_features, m.rank});
    rep.parameters += (m.in_features + m.out_features) * m.rank;
    fro2 += m.metrics.frobenius_norm * m.metrics.frobenius_norm;
  }
  rep.frobenius_norm = std::sqrt(fro2);
  for (double t : thresholds) rep.recommendations.push_back(recommend_rank(spectra, t));
  rep.spikes = spectral_spikes(rep.modules, spikes);
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
  const io::PeftFileTensors scan = io::scan_peft_tensors(file, cfg);
  const auto mods = detail::mapped_modules(file, cfg);
  std::optional<io::SafetensorsFile> base;
  if (opt.base_model) base = io::SafetensorsFile::open(*opt.base_model);

  AdapterReport rep;
  for (const auto& s : scan.saved)
    rep.whole.push_back({s.key, io::role_name(s.role), s.view->type, s.view->shape, static_cast<Index>(s.view->numel())});
  for (const auto& t : scan.tokens)
    rep.whole.push_back({t.module + ".weight", "trainable_tokens", t.rows->type, t.rows->shape,
                         static_cast<Index>(t.rows->numel())});
  rep.modules.resize(mods.size());
  std::mutex progress_mutex;
  std::size_t done = 0;
  detail::parallel_for(static_cast<Index>(mods.size()), opt.threads, [&](Index i) {
    const auto& mm = mods[static_cast<std::size_t>(i)];
    ModuleReport& m = rep.modules[static_cast<std::size_t>(i)];
    m.name = mm.name;
    m.rank = cfg.rank_for(mm.name);
    m.alpha = cfg.alpha_for(mm.name);
    m.scaling = cfg.scaling_for(mm.name);
    m.kind = mm.embedding ? "embedding" : cfg.fan_in_fan_out ? "conv1d" : "linear";
    // as the layer sees them, however the weight is stored
    m.out_features = mm.B->shape[0];
    m.in_features = mm.A->shape[1];
    // the base weight is stored [in × out] for Conv1D and embeddings
    const bool stored_transposed = cfg.fan_in_fan_out || mm.embedding;
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
      if (stored_transposed) W.transposeInPlace();
      const Matrix<double> A = mm.A->to_matrix<double>(), B = mm.B->to_matrix<double>();
      if (W.rows() != B.rows() || W.cols() != A.cols())
        lora::detail::fail("{}: tensor '{}' is [{} x {}], but adapter module '{}' has ΔW [{} x {}]", base->path(), key,
                           W.rows(), W.cols(), mm.name, B.rows(), A.cols());
      m.intruders = intruder_dimensions(W, B, A, m.scaling, opt.intruder);
    }
    if (opt.progress) {
      std::lock_guard<std::mutex> lock(progress_mutex);
      opt.progress(++done, mods.size());
    }
  });
  // Parameter LoRAs (target_parameters): every expert as a module.
  if (!scan.params.empty()) {
    const io::PeftAdapter loaded = io::load_peft_adapter(folder);
    for (const auto& w : loaded.params) detail::expert_reports(rep.modules, w, w.A, w.B, opt.energy_thresholds);
  }
  detail::finish_report(rep, opt.energy_thresholds, opt.spikes);
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
    m.kind = pm.is_embedding() ? "embedding" : a.fan_in_fan_out() ? "conv1d" : "linear";
    m.out_features = a.out_features();
    m.in_features = a.in_features();
    m.singular_values = lowrank_singular_values(a.B(), a.A(), a.scaling());
    m.metrics = spectrum_metrics(m.singular_values, m.out_features, m.in_features, opt.energy_thresholds);
  });
  for (const auto& w : adapter.params) detail::expert_reports(rep.modules, w, w.A, w.B, opt.energy_thresholds);
  for (const auto& s : adapter.saved)
    rep.whole.push_back({s.key, io::role_name(s.role), s.data.type, s.data.shape,
                         static_cast<Index>(s.data.bytes.size() / io::dtype_size(s.data.type))});
  for (const auto& t : adapter.trainable_tokens)
    rep.whole.push_back({t.module + ".weight", "trainable_tokens", t.stored_dtype, {t.rows.rows(), t.rows.cols()},
                         static_cast<Index>(t.rows.size())});
  detail::finish_report(rep, opt.energy_thresholds, opt.spikes);
  return rep;
}

}  // namespace lora::analysis
