// lora merge: base checkpoint + PEFT adapter(s) -> merged checkpoint (merge_and_unload()).
#include <lora/io/merge.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli.hpp"

namespace {

const char* help = R"(usage: lora merge --base <model.safetensors | folder> --adapter <peft folder>[:S] [--adapter ...]
                  --out <file | folder> [--scale S] [--dtype f32|bf16|f16] [--base-prefix OLD=NEW]
                  [--experts-layout auto|out-in|in-out] [--threads N] [--progress | --quiet]

Merges PEFT LoRA adapters (LoRA, rsLoRA, DoRA, rank/alpha patterns, embedding LoRA,
lora_bias, modules_to_save copies, trainable tokens, LoRA on MoE expert parameters
through target_parameters) into a base checkpoint and writes
what PEFT's merge_and_unload() followed by saving the state dict gives: the same keys,
order, shapes and dtypes;
  LoRA:  W' = W + S*s*B*A                                 (s = alpha/r, or alpha/sqrt(r))
  DoRA:  W' = m / ||W + S*s*B*A||_row * (W + S*s*B*A)
  embedding LoRA: E' = E + S*s*(B*A)^T;  lora_bias: b' = b + S*s*b_B
  target_parameters: W[e] = W[e] + S*s*B_e*A_e for every expert e of a fused
  [experts, out, in] parameter (its transpose for [experts, in, out]), or of each
  expert's own tensors where the base stores them one by one (experts.e.gate_proj /
  up_proj / down_proj.weight; Mixtral's block_sparse_moe.experts.e.w1 / w3 / w2)
  modules_to_save copies replace the base tensor; trainable-token rows replace the
  embedding's rows (and lm_head's with tied embeddings)
computed in float32 and rounded once to the tensor's dtype. Tensors no adapter changes
are copied unchanged. Which modules an adapter changes follows its adapter_config.json
as PEFT does (target_modules, exclude_modules, layers_to_transform): tensors of other
modules are reported and not merged, as PEFT ignores them.

  --base      a .safetensors file, or a folder with model.safetensors.index.json
              (sharded) or model.safetensors
  --adapter   a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
              optionally with its own strength: --adapter B:0.5. Repeat to merge several,
              in order: the result equals merging them one after the other
  --out       a path ending in .safetensors writes one file; anything else writes a
              folder with the base's shard layout (and index) and, from a base folder,
              its other files (config.json with "dtype" set to what was written,
              generation_config.json, tokenizer files, ...; not other weight formats).
              An existing output is replaced, atomically: on any error nothing is written.
  --scale S   multiplies every adapter's strength (default 1; 0.5 = "halve alpha")
  --dtype T   convert every float tensor to f32, bf16 or f16 (default: keep each dtype)
  --base-prefix OLD=NEW  adapter module paths starting with OLD name base tensors
              starting with NEW ("transformer.=" for GPT-2 from the hub; "=model." adds).
              Default: the one mapping (among "", model., transformer., language_model.)
              under which every adapter tensor finds its base tensor
  --experts-layout L  how the base stores fused expert weights (target_parameters):
              out-in ([E, out, in], transformers' default), in-out ([E, in, out],
              gpt-oss). Default auto: what the shapes allow; for square experts the
              base folder's config.json model_type decides (gpt_oss: in-out; qwen2_moe,
              qwen3_moe, mixtral, olmoe: out-in), else this option is needed
  --threads N threads that read, merge and write parts of the output at once (default:
              one per hardware thread); the output is the same for every N
  --progress  always report progress on stderr (default: only above 256 MiB)
  --quiet     never report progress

Exit status 0 on success; 1 with one line on stderr for bad input.)";

/// "folder" or "folder:0.5" (the part after the last ':' is a strength when it is a number).
std::pair<std::filesystem::path, double> parse_adapter(const std::string& s) {
  const auto colon = s.rfind(':');
  if (colon != std::string::npos && colon + 1 < s.size() && !std::filesystem::exists(s)) {
    const std::string tail = s.substr(colon + 1);
    return {s.substr(0, colon), lora::cli::Args::parse_number(tail, "the strength in --adapter " + s)};
  }
  return {s, 1.0};
}

int run_merge(const std::vector<std::string>& argv) {
  namespace fs = std::filesystem;
  lora::cli::Args args(argv, {"progress", "quiet"}, {"base", "adapter", "out", "scale", "dtype", "base-prefix", "threads", "experts-layout"},
                       "merge");
  if (!args.positional().empty())
    lora::fail("unexpected argument '{}' (see 'lora merge --help')", args.positional().front());
  const fs::path base_path = args.required("base");
  const auto adapter_args = args.all("adapter");
  if (adapter_args.empty()) lora::fail("missing required option --adapter (see 'lora merge --help')");
  std::vector<std::pair<fs::path, double>> adapter_specs;
  for (const auto& a : adapter_args) adapter_specs.push_back(parse_adapter(a));
  const fs::path out = args.required("out");
  lora::io::MergeOptions opts;
  opts.scale = args.number("scale", 1.0);
  opts.threads = static_cast<unsigned>(args.integer("threads", 0, 1, 4096));
  if (auto d = args.get("dtype")) opts.out_dtype = lora::io::parse_float_dtype(*d, "--dtype");
  if (auto p = args.get("base-prefix")) opts.base_keys = lora::io::parse_base_key_map(*p);
  if (auto l = args.get("experts-layout")) opts.experts_layout = lora::io::parse_experts_layout(*l, "--experts-layout");
  std::vector<fs::path> inputs{base_path};
  for (const auto& [p, s] : adapter_specs) inputs.push_back(p);
  std::error_code ec;
  if (fs::exists(out) && fs::equivalent(out, base_path, ec))
    lora::fail("--out {} is the base checkpoint itself; choose another path", out.string());
  lora::cli::guard_output(args, out, inputs,
                          out.extension() == ".safetensors" ? lora::io::output_kind::file : lora::io::output_kind::folder);

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<lora::io::PeftAdapter> adapters;
  for (const auto& [p, s] : adapter_specs) adapters.push_back(lora::io::load_peft_adapter(p));
  const auto base = lora::io::Checkpoint::open(base_path);
  std::vector<lora::io::ScaledAdapter> stack;
  for (std::size_t i = 0; i < adapters.size(); ++i) stack.push_back({&adapters[i], adapter_specs[i].second});

  // What PEFT would warn about: tensors it does not load, targeted modules without tensors.
  const auto key_map = lora::io::resolve_base_keys(base, stack, opts.base_keys);
  opts.base_keys = key_map;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const std::string name = adapter_specs[i].first.string();
    for (const auto& s : adapters[i].skipped)
      fmt::print(stderr, "lora merge: warning: {}: not merged: '{}': {}\n", name, s.key, s.reason);
    const auto missing = lora::io::targeted_without_tensors(base, adapters[i], key_map);
    if (!missing.empty())
      fmt::print(stderr,
                 "lora merge: warning: {}: {} module(s) the config targets have no tensors (PEFT leaves them "
                 "unchanged): {}{}\n",
                 name, missing.size(), fmt::join(missing.begin(), missing.begin() + std::min<std::size_t>(missing.size(), 5), ", "),
                 missing.size() > 5 ? ", ..." : "");
  }
  if (!key_map.identity()) fmt::print(stderr, "lora merge: adapter paths map to base keys by {}\n", key_map.describe());

  const bool show = !args.has("quiet") && (args.has("progress") || base.total_bytes() >= (std::uint64_t{256} << 20));
  int last_pct = -1;
  auto last_time = t0;
  if (show)
    opts.progress = [&](const lora::io::WriteProgress& p) {
      const int pct = p.bytes_total ? static_cast<int>(100.0 * static_cast<double>(p.bytes_done) / p.bytes_total) : 100;
      const auto now = std::chrono::steady_clock::now();
      const bool last = p.tensors_done == p.tensors_total;
      if (!last && pct / 5 == last_pct / 5 && now - last_time < std::chrono::seconds(2)) return;
      last_pct = pct;
      last_time = now;
      fmt::print(stderr, "lora merge: {:3d}%  {:.2f} / {:.2f} GB  {}/{} tensors\n", pct, p.bytes_done / 1e9,
                 p.bytes_total / 1e9, p.tensors_done, p.tensors_total);
    };
  const auto summary = lora::io::merge_peft_checkpoint(base, stack, out, opts);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("merged {} adapter{} into {} tensors, copied {} unchanged, wrote {:.1f} MB to {} in {:.2f} s\n",
             adapters.size(), adapters.size() == 1 ? "" : "s", summary.merged, summary.copied, summary.bytes / 1e6,
             out.string(), secs);
  if (!summary.files_copied.empty())
    fmt::print("copied from the base folder: {}\n", fmt::join(summary.files_copied, ", "));
  if (!summary.files_skipped.empty())
    fmt::print("not copied (weights in other formats, folders): {}\n", fmt::join(summary.files_skipped, ", "));
  return 0;
}

lora::cli::Register reg_merge{{"merge", "merge PEFT adapters into a checkpoint (PEFT's merge_and_unload)", help, run_merge}};

}  // namespace
