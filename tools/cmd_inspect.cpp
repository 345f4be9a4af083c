// lora inspect: the exact spectrum of every module of a PEFT adapter, its
// effective ranks, and a rank recommendation.
#include <lora/analysis/inspect.hpp>
#include <lora/analysis/plot.hpp>
#include <lora/io/atomic.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/peft.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>

#include "cli.hpp"
#include "progress.hpp"

namespace {

using namespace lora;
using namespace lora::analysis;

std::string tau_key(double t) { return fmt::format("{:g}", t); }

std::vector<double> parse_thresholds(const std::string& s) {
  std::vector<double> out;
  for (const auto& part : cli::Args::split(s)) {
    const double t = cli::Args::parse_number(part, "--energy");
    if (!(t > 0.0 && t <= 1.0)) lora::fail("--energy: thresholds must be in (0, 1], got {}", part);
    out.push_back(t);
  }
  if (out.empty()) lora::fail("--energy: give thresholds like 0.9,0.99, got '{}'", s);
  return out;
}

nlohmann::ordered_json to_json(const AdapterReport& rep) {
  using json = nlohmann::ordered_json;
  json mods = json::array();
  for (const auto& m : rep.modules) {
    json j;
    j["name"] = m.name;
    j["kind"] = m.kind;
    j["out_features"] = m.out_features;
    j["in_features"] = m.in_features;
    j["rank"] = m.rank;
    j["alpha"] = m.alpha;
    j["scaling"] = m.scaling;
    j["singular_values"] = std::vector<double>(m.singular_values.data(), m.singular_values.data() + m.singular_values.size());
    j["frobenius_norm"] = m.metrics.frobenius_norm;
    j["spectral_norm"] = m.metrics.spectral_norm;
    j["stable_rank"] = m.metrics.stable_rank;
    j["entropy_rank"] = m.metrics.entropy_rank;
    json e = json::object();
    for (std::size_t t = 0; t < m.metrics.thresholds.size(); ++t) e[tau_key(m.metrics.thresholds[t])] = m.metrics.energy_ranks[t];
    j["energy_rank"] = e;
    j["numerical_rank"] = m.metrics.numerical_rank;
    if (m.intruders) {
      const auto& r = *m.intruders;
      j["intruder_dimensions"] = {
          {"count", r.intruders.size()},
          {"indices", r.intruders},
          {"max_cosine", std::vector<double>(r.max_cosine.data(), r.max_cosine.data() + r.max_cosine.size())},
          {"singular_values", std::vector<double>(r.singular_values.data(), r.singular_values.data() + r.singular_values.size())},
          {"epsilon", r.epsilon},
          {"checked", r.checked},
          {"base_rank", r.base_rank}};
    }
    mods.push_back(std::move(j));
  }
  json summary;
  summary["modules"] = rep.modules.size();
  Index max_r = 0;
  double entropy = 0, stable = 0;
  Index intruders = 0;
  bool have_intruders = false;
  for (const auto& m : rep.modules) {
    max_r = std::max(max_r, m.rank);
    entropy += m.metrics.entropy_rank;
    stable += m.metrics.stable_rank;
    if (m.intruders) {
      have_intruders = true;
      intruders += static_cast<Index>(m.intruders->intruders.size());
    }
  }
  const double n = std::max<double>(1, double(rep.modules.size()));
  summary["rank"] = max_r;
  summary["parameters"] = rep.parameters;
  summary["frobenius_norm"] = rep.frobenius_norm;
  summary["mean_entropy_rank"] = entropy / n;
  summary["mean_stable_rank"] = stable / n;
  json er = json::object(), recs = json::array();
  for (const auto& rec : rep.recommendations) {
    er[tau_key(rec.tau)] = rec.rank;
    recs.push_back({{"energy", rec.tau},
                    {"rank", rec.rank},
                    {"energy_kept", rec.energy_kept},
                    {"min_module_energy", rec.min_module_energy},
                    {"parameters_after", rec.parameters_after},
                    {"parameters_rank_pattern", rec.parameters_per_module},
                    {"text", rec.text}});
  }
  summary["energy_rank"] = er;
  summary["recommendations"] = recs;
  if (have_intruders) summary["intruder_dimensions"] = intruders;
  json whole = json::array();
  for (const auto& w : rep.whole)
    whole.push_back({{"name", w.name}, {"role", w.role}, {"dtype", io::dtype_name(w.type)}, {"shape", w.shape},
                     {"parameters", w.parameters}});
  json out;
  out["modules"] = std::move(mods);
  out["whole_tensors"] = std::move(whole);
  json spikes = json::array();
  for (const auto& sp : rep.spikes)
    spikes.push_back({{"name", sp.name}, {"kind", sp.kind}, {"value", sp.value}, {"median", sp.median}, {"ratio", sp.ratio}});
  out["spectral_spikes"] = std::move(spikes);
  out["summary"] = std::move(summary);
  return out;
}

void print_table(const AdapterReport& rep) {
  std::size_t w = 6;
  for (const auto& m : rep.modules) w = std::max(w, m.name.size());
  const bool intr = !rep.modules.empty() && rep.modules.front().intruders.has_value();
  std::string head = fmt::format("{:<{}}  {:>12}  {:>4}  {:>8}  {:>10}", "module", w, "out x in", "r", "scaling", "σ₁");
  for (double t : rep.thresholds) head += fmt::format("  {:>6}", fmt::format("E{:g}", t * 100));
  head += fmt::format("  {:>7}  {:>7}", "entropy", "stable");
  if (intr) head += "  intruders";
  fmt::print("{}\n", head);
  for (const auto& m : rep.modules) {
    std::string line = fmt::format("{:<{}}  {:>12}  {:>4}  {:>8.4g}  {:>10.4e}", m.name + (m.kind == "linear" ? "" : " (" + m.kind + ")"), w,
                                   fmt::format("{}x{}", m.out_features, m.in_features), m.rank, m.scaling,
                                   m.metrics.spectral_norm);
    for (auto k : m.metrics.energy_ranks) line += fmt::format("  {:>6}", k);
    line += fmt::format("  {:>7.2f}  {:>7.2f}", m.metrics.entropy_rank, m.metrics.stable_rank);
    if (m.intruders) line += fmt::format("  {:>9}", m.intruders->intruders.size());
    fmt::print("{}\n", line);
  }
  Index max_r = 0;
  for (const auto& m : rep.modules) max_r = std::max(max_r, m.rank);
  if (!rep.whole.empty()) {
    Index whole_params = 0;
    fmt::print("\nwhole tensors the adapter carries (they replace the base's; not analysed):\n");
    for (const auto& t : rep.whole) {
      fmt::print("  {:<{}}  {:<16}  {:<5} [{}]  {} parameters\n", t.name, w, t.role, io::dtype_name(t.type),
                 fmt::join(t.shape, ", "), cli::thousands(t.parameters));
      whole_params += t.parameters;
    }
    fmt::print("  {} whole-tensor parameters\n", cli::thousands(whole_params));
  }
  fmt::print("\n{} modules, r ≤ {}, {} LoRA parameters, ‖ΔW‖_F over all modules {:.4g}\n", rep.modules.size(), max_r,
             cli::thousands(rep.parameters), rep.frobenius_norm);
  fmt::print("(E90 etc.: smallest k whose top-k singular values hold that % of Σσ²; entropy: Roy–Vetterli effective "
             "rank; stable: ‖ΔW‖_F²/‖ΔW‖₂²)\n");
  for (const auto& rec : rep.recommendations) {
    fmt::print("{:g}%: {}\n", rec.tau * 100, rec.text);
    if (rec.rank < rec.current_rank)
      fmt::print("      with a per-module rank_pattern instead: {} parameters (of {})\n",
                 cli::thousands(rec.parameters_per_module), cli::thousands(rec.parameters_now));
  }
}

int run_inspect(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"json", "progress", "quiet"}, {"plot", "energy", "base", "threads", "epsilon", "top-k"}, "inspect");
  if (args.positional().size() != 1)
    lora::fail("expected one PEFT adapter folder, got {} arguments (see 'lora inspect --help')",
                 args.positional().size());
  InspectOptions opt;
  if (auto e = args.get("energy")) opt.energy_thresholds = parse_thresholds(*e);
  if (auto b = args.get("base")) opt.base_model = *b;
  opt.threads = static_cast<unsigned>(args.integer("threads", 0, 0, 4096));
  opt.intruder.epsilon = args.number("epsilon", opt.intruder.epsilon);
  opt.intruder.top_k = static_cast<Index>(args.integer("top-k", opt.intruder.top_k, 1, 1 << 20));
  if (auto plot = args.get("plot")) {
    std::vector<std::filesystem::path> inputs{args.positional()[0]};
    if (opt.base_model) inputs.emplace_back(*opt.base_model);
    cli::guard_output(args, *plot, inputs, io::output_kind::file, "--plot");
  }
  // Progress for big adapters (by file size), per module analysed.
  std::uint64_t size = 0;
  if (std::filesystem::is_directory(args.positional()[0]) &&
      std::filesystem::is_regular_file(std::filesystem::path(args.positional()[0]) / "adapter_model.safetensors"))
    size = std::filesystem::file_size(std::filesystem::path(args.positional()[0]) / "adapter_model.safetensors");
  cli::Progress progress("inspect", !args.has("quiet") && (args.has("progress") || size >= (std::uint64_t{256} << 20)));
  if (progress.enabled())
    opt.progress = [&](std::size_t done, std::size_t total) {
      progress.update(done, total, fmt::format("{}/{} modules", done, total));
    };
  // inspect_adapter maps lora_A / lora_B only; the loader's checks cover the rest of the folder
  // (DoRA magnitudes against use_dora, tensors that are not LoRA factors, dtypes).
  if (std::filesystem::is_directory(args.positional()[0])) io::check_peft_adapter(args.positional()[0]);
  // A GGUF adapter: llama.cpp's q/k row order is kept unless --base's folder has the config to undo it
  // (singular values do not see it; intruder dimensions compare with the base's rows and do).
  const auto rep = io::is_gguf_file(args.positional()[0])
                       ? inspect_adapter(io::load_gguf_adapter(args.positional()[0], io::gguf_options_near(opt.base_model)), opt)
                       : inspect_adapter(args.positional()[0], opt);
  if (auto plot = args.get("plot")) {
    const std::string svg = spectrum_svg(rep, fmt::format("Singular value spectra of {}", args.positional()[0]));
    io::write_file_atomically(*plot, [&](const std::filesystem::path& tmp) { io::write_bytes(tmp, svg); });
  }
  for (const auto& sp : rep.spikes)
    fmt::print(stderr, "lora inspect: warning: {}: {} (median {:.4g}, {:.1f}x): a spectral spike typical of stacked or "
               "combined adapters\n", sp.name,
               sp.kind == "top" ? fmt::format("σ₁ = {:.4g} far above the median σ₁ of its module type", sp.value)
                                : fmt::format("σ₁/σ₂ = {:.4g} far above the adapter's median σ₁/σ₂", sp.value),
               sp.median, sp.ratio);
  if (args.has("json"))
    fmt::print("{}\n", to_json(rep).dump(1));
  else
    print_table(rep);
  return 0;
}

const lora::cli::Register reg_inspect{{"inspect", "spectrum, effective ranks and a rank recommendation of a PEFT adapter",
                               R"(usage: lora inspect <peft folder> [--json] [--plot spectrum.svg] [--energy 0.9,0.99]
                    [--base model.safetensors [--epsilon 0.5] [--top-k 10]] [--threads N]

For every module of the adapter: the exact singular values of ΔW = s·B·A (from
r x r Gram matrices, without forming ΔW), Frobenius and spectral norm, energy
ranks (smallest k keeping τ of Σσ²), Roy–Vetterli entropy rank, stable rank;
and for the adapter a uniform rank that keeps τ of every module's energy.

  --json          print a JSON document instead of the table:
                  {"modules": [{"name", "out_features", "in_features", "rank", "alpha",
                  "scaling", "singular_values", "frobenius_norm", "spectral_norm",
                  "stable_rank", "entropy_rank", "energy_rank": {"0.9": k, ...},
                  "numerical_rank"}], "summary": {...}}
  --plot FILE     write an SVG chart: normalised spectra per module type, log scale,
                  energy ranks marked
  --energy LIST   energy thresholds τ in (0, 1], comma-separated (default 0.9,0.99)
  --base FILE     the base model's .safetensors (keys <module>.weight): also report
                  intruder dimensions, top singular vectors of W + ΔW whose largest
                  |cosine| with W's top 128 singular vectors is below --epsilon
                  (default 0.5); --top-k of them are checked (default 10)
  --threads N     modules analysed in parallel (default: all cores)
  --progress      always report progress on stderr (default: adapters above 256 MiB)
  --quiet         never report progress

Modules are listed in natural order (layers.2 before layers.10); in/out are as the
layer sees them (a Conv1D's or an embedding's weight is stored [in x out], the table
and "kind" say which). Whole tensors the folder carries (modules_to_save copies,
trainable-token rows) are listed after the modules ("whole_tensors" in --json).

A warning on stderr ("spectral_spikes" in --json) names each module whose σ₁ is at least
8x the median σ₁ of its module type, or whose σ₁/σ₂ is at least 8x the adapter's median
σ₁/σ₂ (medians of 3 or more modules): the spikes stacked or combined adapters leave.
)",
                               run_inspect}};

}  // namespace
