// lora plan: trainable parameters, adapter size and training memory of an adapter, before training it.
#include <lora/plan/plan.hpp>

#include <fmt/format.h>

#include "cli.hpp"

namespace {

std::string human(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} {}", bytes, units[u]) : fmt::format("{:.2f} {}", bytes, units[u]);
}

std::string grouped(std::int64_t n) {
  std::string s = std::to_string(n), out;
  int c = 0;
  for (auto it = s.rbegin(); it != s.rend(); ++it) {
    if (c && c % 3 == 0 && *it != '-') out.insert(out.begin(), ',');
    out.insert(out.begin(), *it);
    ++c;
  }
  return out;
}

int run(const std::vector<std::string>& argv) {
  using lora::cli::Args;
  Args args(argv, {"dora", "rslora", "json"},
            {"rank", "alpha", "targets", "rank-pattern", "alpha-pattern", "quant", "dtype", "adapter-dtype", "batch",
             "seq", "blocksize"},
            "plan");
  if (args.positional().size() != 1)
    lora::fail("expected one model: a config.json path, a folder with one, or a preset name");
  const auto arch = lora::plan::architecture(args.positional()[0]);
  lora::plan::PlanOptions o;
  const double r = args.number("rank", 8);
  if (r != std::floor(r) || r < 1) lora::fail("--rank must be a positive integer, got '{}'", *args.get("rank"));
  o.rank = static_cast<int>(r);
  o.alpha = args.number("alpha", 2.0 * o.rank);
  o.use_rslora = args.has("rslora");
  o.dora = args.has("dora");
  if (auto t = args.get("targets")) o.targets = Args::split(*t);
  for (const auto& kv : Args::split(args.get("rank-pattern").value_or(""))) {
    auto eq = kv.find('=');
    if (eq == std::string::npos) lora::fail("--rank-pattern entries are key=rank, got '{}'", kv);
    const double v = Args::parse_number(kv.substr(eq + 1), "--rank-pattern value for " + kv.substr(0, eq));
    if (v != std::floor(v) || v < 1) lora::fail("--rank-pattern: rank for '{}' must be a positive integer", kv.substr(0, eq));
    o.rank_pattern.emplace_back(kv.substr(0, eq), static_cast<int>(v));
  }
  for (const auto& kv : Args::split(args.get("alpha-pattern").value_or(""))) {
    auto eq = kv.find('=');
    if (eq == std::string::npos) lora::fail("--alpha-pattern entries are key=alpha, got '{}'", kv);
    o.alpha_pattern.emplace_back(kv.substr(0, eq), Args::parse_number(kv.substr(eq + 1), "--alpha-pattern value"));
  }
  const std::string q = args.get("quant").value_or("none");
  if (q == "none") o.quant = lora::plan::quant_mode::none;
  else if (q == "nf4") o.quant = lora::plan::quant_mode::nf4;
  else if (q == "nf4-dq") o.quant = lora::plan::quant_mode::nf4_dq;
  else lora::fail("--quant must be none, nf4 or nf4-dq, got '{}'", q);
  o.blocksize = static_cast<int>(args.number("blocksize", 64));
  if (auto d = args.get("dtype")) o.base_dtype = lora::io::parse_float_dtype(*d, "--dtype");
  if (auto d = args.get("adapter-dtype")) o.adapter_dtype = lora::io::parse_float_dtype(*d, "--adapter-dtype");
  if (args.has("batch") != args.has("seq")) lora::fail("--batch and --seq go together");
  if (args.has("batch")) {
    o.batch = static_cast<std::int64_t>(args.number("batch", 0));
    o.seq = static_cast<std::int64_t>(args.number("seq", 0));
    if (*o.batch < 1 || *o.seq < 1) lora::fail("--batch and --seq must be positive");
  }
  const auto p = lora::plan::make_plan(arch, o);
  if (args.has("json")) {
    fmt::print("{}\n", lora::plan::to_json(p).dump(2));
    return 0;
  }
  fmt::print("model {} ({}, {} parameters, {} layers, hidden {}, {} heads / {} KV heads)\n", arch.name,
             arch.model_type, grouped(arch.total_parameters), arch.layers, arch.hidden, arch.heads, arch.kv_heads);
  fmt::print("adapter r = {}, alpha = {:g}, {} scaling{}, targets {}\n\n", o.rank, o.alpha,
             o.use_rslora ? "rsLoRA" : "standard", o.dora ? ", DoRA" : "", fmt::join(o.targets, ","));
  fmt::print("{:<12} {:>6} {:>16} {:>9} {:>16}\n", "module", "count", "shape (in->out)", "rank", "parameters");
  for (const auto& k : p.kinds) {
    const std::string rank = k.min_rank == k.max_rank ? std::to_string(k.min_rank)
                                                      : fmt::format("{}..{}", k.min_rank, k.max_rank);
    fmt::print("{:<12} {:>6} {:>16} {:>9} {:>16}\n", k.kind, k.count,
               fmt::format("{}->{}", k.in_features, k.out_features), rank, grouped(k.parameters));
  }
  fmt::print("{:<12} {:>6} {:>16} {:>9} {:>16}\n\n", "total", p.modules.size(), "", "", grouped(p.trainable_parameters));
  fmt::print("trainable parameters  {} ({:.3f}% of the base model)\n", grouped(p.trainable_parameters),
             100.0 * static_cast<double>(p.trainable_parameters) / static_cast<double>(arch.total_parameters));
  fmt::print("adapter file          {} ({} bytes, {})\n\n", human(static_cast<double>(p.adapter_file_bytes)),
             grouped(p.adapter_file_bytes), lora::io::dtype_name(o.adapter_dtype));
  const auto& m = p.memory;
  fmt::print("training memory (estimate; see docs/plan.md)\n");
  fmt::print("  frozen weights      {:>12}  ({})\n", human(static_cast<double>(m.frozen_weights)),
             q == "none" ? std::string(lora::io::dtype_name(o.base_dtype)) : q + ", embeddings and norms in " + std::string(lora::io::dtype_name(o.base_dtype)));
  fmt::print("  adapter weights     {:>12}  (float32)\n", human(static_cast<double>(m.adapter_weights)));
  fmt::print("  gradients           {:>12}  (float32)\n", human(static_cast<double>(m.gradients)));
  fmt::print("  AdamW states        {:>12}  (2 x float32)\n", human(static_cast<double>(m.optimizer_states)));
  if (m.activations)
    fmt::print("  activations         {:>12}  (batch {} x seq {}, 16-bit, no checkpointing)\n",
               human(static_cast<double>(*m.activations)), *o.batch, *o.seq);
  else
    fmt::print("  activations         {:>12}  (give --batch and --seq)\n", "-");
  fmt::print("  total               {:>12}\n", human(static_cast<double>(m.total())));
  return 0;
}

const lora::cli::Register reg_plan{{"plan", "trainable parameters, adapter size and training memory of an adapter",
                               R"(usage: lora plan <config.json | folder | preset> [options]

Counts exactly what a PEFT LoRA adapter would train on a model, from its Hugging Face config.json
(llama, mistral, qwen2, qwen3, gpt2 families) or a preset: llama-2-7b, llama-2-13b, llama-3-8b,
llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, llama-3.2-3b, mistral-7b, qwen2-7b, gpt2, gpt2-medium.

options:
  --rank R               default rank (8)
  --alpha A              lora_alpha (default 2·R)
  --rslora               scaling alpha/sqrt(r) instead of alpha/r
  --targets a,b,...      target_modules names, or all-linear (default q_proj,v_proj)
  --rank-pattern k=r,..  PEFT rank_pattern (first matching key wins; keys match the end of a path)
  --alpha-pattern k=a,.. PEFT alpha_pattern
  --dora                 DoRA: one magnitude vector per module
  --quant none|nf4|nf4-dq  storage of the frozen linear weights (default none)
  --blocksize N          NF4 block size (64)
  --dtype f32|bf16|f16   frozen weights dtype (bf16)
  --adapter-dtype f32|bf16|f16  adapter file dtype (f32)
  --batch B --seq S      add an activation-memory estimate
  --json                 print JSON: {"trainable_parameters": N, "adapter_file_bytes": ..., ...}

example: lora plan llama-3-8b --rank 64 --targets all-linear --quant nf4 --batch 4 --seq 2048)",
                               run}};

}  // namespace
