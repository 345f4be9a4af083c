// lora merge: base checkpoint + PEFT adapter -> merged checkpoint (merge_and_unload()).
#include <lora/io/merge.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli.hpp"

namespace {

const char* help = R"(usage: lora merge --base <model.safetensors | folder> --adapter <peft folder> --out <file | folder>
                  [--scale S] [--dtype f32|bf16|f16] [--progress | --quiet]

Merges a PEFT LoRA adapter (LoRA, rsLoRA, DoRA, rank/alpha patterns) into a base
checkpoint and writes what PEFT's merge_and_unload() followed by saving the state dict
gives: the same keys, order, shapes and dtypes;
  LoRA:  W' = W + S*s*B*A                                 (s = alpha/r, or alpha/sqrt(r))
  DoRA:  W' = m / ||W + S*s*B*A||_row * (W + S*s*B*A)
computed in float32 and rounded once to the tensor's dtype. Tensors the adapter does
not target are copied unchanged.

  --base      a .safetensors file, or a folder with model.safetensors.index.json
              (sharded) or model.safetensors
  --adapter   a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
  --out       a path ending in .safetensors writes one file; anything else writes a
              folder with the base's shard layout (and index). An existing output is
              replaced, atomically: on any error nothing is written.
  --scale S   multiplies the adapter's strength (default 1; 0.5 = "halve alpha")
  --dtype T   convert every float tensor to f32, bf16 or f16 (default: keep each dtype)
  --progress  always report progress on stderr (default: only above 256 MiB)
  --quiet     never report progress

Exit status 0 on success; 1 with one line on stderr for bad input.)";

lora::io::dtype parse_out_dtype(const std::string& s) {
  if (s == "f32" || s == "F32" || s == "float32") return lora::io::dtype::F32;
  if (s == "bf16" || s == "BF16" || s == "bfloat16") return lora::io::dtype::BF16;
  if (s == "f16" || s == "F16" || s == "float16") return lora::io::dtype::F16;
  lora::detail::fail("--dtype must be f32, bf16 or f16, got '{}'", s);
}

int run_merge(const std::vector<std::string>& argv) {
  namespace fs = std::filesystem;
  lora::cli::Args args(argv, {"progress", "quiet"}, {"base", "adapter", "out", "scale", "dtype"}, "merge");
  if (!args.positional().empty())
    lora::detail::fail("unexpected argument '{}' (see 'lora merge --help')", args.positional().front());
  const fs::path base_path = args.required("base");
  const fs::path adapter_path = args.required("adapter");
  const fs::path out = args.required("out");
  lora::io::MergeOptions opts;
  opts.scale = args.number("scale", 1.0);
  if (auto d = args.get("dtype")) opts.out_dtype = parse_out_dtype(*d);
  if (out.empty()) lora::detail::fail("--out must not be empty");
  std::error_code ec;
  if (fs::exists(out) && fs::equivalent(out, base_path, ec))
    lora::detail::fail("--out {} is the base checkpoint itself; choose another path", out.string());
  if (out.extension() == ".safetensors" && fs::is_directory(out))
    lora::detail::fail("--out {} is a folder but ends in .safetensors", out.string());

  const auto t0 = std::chrono::steady_clock::now();
  const auto adapter = lora::io::load_peft_adapter(adapter_path);
  const auto base = lora::io::Checkpoint::open(base_path);

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
  const auto summary = lora::io::merge_peft_checkpoint(base, adapter, out, opts);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("merged {} tensors, copied {} unchanged, wrote {:.1f} MB to {} in {:.2f} s\n", summary.merged,
             summary.copied, summary.bytes / 1e6, out.string(), secs);
  return 0;
}

lora::cli::Register reg{{"merge", "merge a PEFT adapter into a checkpoint (PEFT's merge_and_unload)", help, run_merge}};

}  // namespace
