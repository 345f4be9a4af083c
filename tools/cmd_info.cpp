// lora info: what a PEFT adapter folder (or any .safetensors file) holds, in a few lines.
#include <lora/io/peft.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/safetensors.hpp>

#include <filesystem>
#include <map>

#include "cli.hpp"
#include "progress.hpp"

namespace {

using namespace lora;
namespace fs = std::filesystem;

std::string json_or_dash(const nlohmann::ordered_json& raw, const char* key) {
  if (!raw.contains(key) || raw[key].is_null()) return "-";
  if (raw[key].is_string()) return raw[key].get<std::string>();
  return raw[key].dump();
}

void print_tensors(const io::SafetensorsFile& f) {
  std::size_t w = 6;
  for (const auto& t : f.tensors()) w = std::max(w, t.name.size());
  std::map<std::string, std::pair<std::int64_t, std::uint64_t>> by_dtype;  // params, bytes
  fmt::print("\n{:<{}}  {:<5}  {:<14}  {:>12}\n", "tensor", w, "dtype", "shape", "bytes");
  for (const auto& t : f.tensors()) {
    fmt::print("{:<{}}  {:<5}  {:<14}  {:>12}\n", t.name, w, io::dtype_name(t.type),
               fmt::format("[{}]", fmt::join(t.shape, ", ")), cli::thousands(static_cast<std::int64_t>(t.bytes.size())));
    auto& d = by_dtype[std::string(io::dtype_name(t.type))];
    d.first += t.numel();
    d.second += t.bytes.size();
  }
  std::int64_t params = 0;
  std::uint64_t bytes = 0;
  for (const auto& [k, v] : by_dtype) params += v.first, bytes += v.second;
  fmt::print("\n{} tensors, {} parameters, {} bytes", f.tensors().size(), cli::thousands(params),
             cli::thousands(static_cast<std::int64_t>(bytes)));
  if (by_dtype.size() > 1) {
    std::vector<std::string> parts;
    for (const auto& [k, v] : by_dtype) parts.push_back(fmt::format("{} {}", cli::thousands(v.first), k));
    fmt::print(" ({})", fmt::join(parts, ", "));
  }
  fmt::print("\n");
}

int run_info(const std::vector<std::string>& argv) {
  cli::Args args(argv, {}, {}, "info");
  if (args.positional().size() != 1)
    lora::fail("expected one PEFT adapter folder or .safetensors file, got {} arguments (see 'lora info --help')",
                       args.positional().size());
  const fs::path in = args.positional()[0];
  if (!fs::exists(in)) lora::fail("{}: no such file or folder", in.string());
  if (io::is_gguf_file(in)) return fmt::print("{}", io::gguf_summary(in)), 0;  // GGUF (llama.cpp) files
  if (!fs::is_directory(in)) {
    const auto f = io::SafetensorsFile::open(in);
    fmt::print("{}: safetensors file\n", in.string());
    if (!f.metadata().empty()) {
      std::vector<std::string> m;
      for (const auto& [k, v] : f.metadata()) m.push_back(k + "=" + (v.size() > 60 ? v.substr(0, 57) + "..." : v));
      fmt::print("metadata: {}\n", fmt::join(m, ", "));
    }
    print_tensors(f);
    return 0;
  }
  const io::PeftConfig cfg = io::load_peft_config(in);
  const fs::path wfile = in / "adapter_model.safetensors";
  if (!fs::exists(wfile)) lora::fail("{}: missing (a PEFT adapter folder needs adapter_model.safetensors)", wfile.string());
  const auto f = io::SafetensorsFile::open(wfile);
  const io::PeftFileTensors scan = io::scan_peft_tensors(f, cfg);
  const auto& raw = cfg.raw;

  fmt::print("{}: PEFT {} adapter\n", in.string(), json_or_dash(raw, "peft_type"));
  fmt::print("base model      {}\n", json_or_dash(raw, "base_model_name_or_path"));
  fmt::print("PEFT version    {}   task {}\n", json_or_dash(raw, "peft_version"), json_or_dash(raw, "task_type"));
  std::string variant = cfg.use_dora ? "DoRA" : "LoRA";
  if (cfg.use_rslora) variant += ", rsLoRA (s = alpha/sqrt(r))";
  fmt::print("r {}  alpha {:g}  {}{}{}\n", cfg.r, cfg.lora_alpha, variant, cfg.fan_in_fan_out ? ", fan_in_fan_out (Conv1D)" : "",
             cfg.lora_bias ? ", lora_bias" : "");
  if (!cfg.rank_pattern.empty() || !cfg.alpha_pattern.empty())
    fmt::print("patterns        rank_pattern {} entries, alpha_pattern {} entries\n", cfg.rank_pattern.size(),
               cfg.alpha_pattern.size());
  fmt::print("targets         {}\n", cfg.target_modules_regex ? "regex " + *cfg.target_modules_regex
                                   : !cfg.target_modules.empty() ? fmt::format("{}", fmt::join(cfg.target_modules, ", "))
                                   : cfg.target_modules_given    ? std::string("none (target_modules = [])")
                                                                 : std::string("the model type's defaults (target_modules = null)"));
  if (cfg.exclude_modules_regex || !cfg.exclude_modules.empty())
    fmt::print("exclude         {}\n", cfg.exclude_modules_regex ? "regex " + *cfg.exclude_modules_regex
                                                                   : fmt::format("{}", fmt::join(cfg.exclude_modules, ", ")));
  if (!cfg.layers_to_transform.empty())
    fmt::print("layers          {} (pattern {})\n", fmt::join(cfg.layers_to_transform, ", "),
               cfg.layers_pattern.empty() ? "any" : fmt::format("{}", fmt::join(cfg.layers_pattern, ", ")));
  if (!cfg.modules_to_save.empty()) fmt::print("modules_to_save {}\n", fmt::join(cfg.modules_to_save, ", "));
  for (const auto& [m, ids] : cfg.trainable_token_indices)
    fmt::print("trainable tokens {}: {} ids\n", m.empty() ? "input embedding" : m, ids.size());
  if (!cfg.target_parameters.empty()) fmt::print("parameters      {}\n", fmt::join(cfg.target_parameters, ", "));
  if (cfg.bias != "none") fmt::print("bias            {}\n", cfg.bias);

  std::int64_t lora_params = 0, whole_params = 0, token_params = 0, embedding = 0, dora = 0, biases = 0;
  for (const auto& m : scan.modules) {
    lora_params += m.A->numel() + m.B->numel();
    if (m.magnitude) dora += m.magnitude->numel();
    if (m.bias) biases += m.bias->numel();
    if (m.kind == io::PeftModuleKind::embedding) ++embedding;
  }
  for (const auto& p : scan.params) lora_params += p.A->numel() + p.B->numel();
  for (const auto& s : scan.saved) whole_params += s.view->numel();
  for (const auto& t : scan.tokens) token_params += t.rows->numel();
  fmt::print("\nmodules         {} adapted ({} embedding), {} whole tensors, {} trainable-token tables{}\n",
             scan.modules.size(), embedding, scan.saved.size(), scan.tokens.size(),
             scan.params.empty() ? "" : fmt::format(", {} parameter LoRAs", scan.params.size()));
  fmt::print("parameters      {} LoRA (A, B){}{}, {} whole tensors, {} token rows; {} in all\n", cli::thousands(lora_params),
             dora ? fmt::format(", {} DoRA magnitudes", cli::thousands(dora)) : "",
             biases ? fmt::format(", {} lora_B biases", cli::thousands(biases)) : "", cli::thousands(whole_params),
             cli::thousands(token_params), cli::thousands(lora_params + dora + biases + whole_params + token_params));
  if (!scan.params.empty()) {
    // One line per module: its wrappers (outermost first) and what they can adapt.
    fmt::print("parameter LoRA  {} wrapper(s) on {} module(s) (target_parameters; lora_A [r*experts, in], lora_B [out, "
               "r*experts])\n", scan.params.size(), std::count_if(scan.params.begin(), scan.params.end(),
                                                                  [](const io::PeftParamTensors& p) { return p.depth == 0; }));
    for (const auto& p : scan.params)
      if (p.depth == 0) {
        std::vector<std::string> w;
        for (const auto& q : scan.params)
          if (q.module == p.module) w.push_back(fmt::format("[{}, {}]x[{}, {}]", q.A->shape[0], q.A->shape[1], q.B->shape[0], q.B->shape[1]));
        fmt::print("  {}: {} of {{{}}}\n", p.module, fmt::join(w, " "), fmt::join(p.candidates, ", "));
      }
  }
  for (const auto& s : scan.saved)
    fmt::print("whole tensor    {} ({}) replaces the base's\n", s.key, io::role_name(s.role));
  for (const auto& s : scan.skipped) fmt::print("not loaded      {}: {}\n", s.key, s.reason);
  print_tensors(f);
  return 0;
}

const lora::cli::Register reg_info{{"info", "what a PEFT adapter folder or a .safetensors file holds",
                               R"(usage: lora info <peft folder | file.safetensors>

For an adapter folder: its config in a few lines (base model, PEFT version, task,
r/alpha/variant, patterns, targets, exclusions, layers, modules_to_save, trainable
tokens), what the folder carries (adapted modules, whole tensors such as
modules_to_save copies, trainable-token rows, tensors PEFT would not load and why),
parameter counts, and every tensor with its dtype, shape and bytes. For a file:
its metadata and tensors. Nothing is converted; the folder is checked as 'lora
merge' would load it.)",
                               run_info}};

}  // namespace
