// lora convert: PEFT adapter folder <-> llama.cpp GGUF LoRA adapter.
#include <lora/io/gguf_lora.hpp>

#include <filesystem>

#include "cli.hpp"

namespace {

using namespace lora;

int run_convert(const std::vector<std::string>& argv) {
  cli::Args args(argv, {}, {"to", "out", "base", "outtype", "name"}, "convert");
  if (args.positional().size() != 1)
    lora::fail("expected one adapter (PEFT folder or .gguf file), got {} arguments (see 'lora convert --help')",
                       args.positional().size());
  const std::filesystem::path in = args.positional()[0];
  const std::string to = args.required("to");
  const std::filesystem::path out = args.required("out");
  if (to == "gguf") {
    if (!std::filesystem::is_directory(in))
      lora::fail("{}: --to gguf needs a PEFT adapter folder", in.string());
    const std::filesystem::path base = args.required("base");
    cli::guard_output(args, out, {in, base}, io::output_kind::file);
    io::GgufExportOptions opts;
    opts.outtype = io::parse_ggml_type(args.get("outtype").value_or("f32"), "--outtype");
    if (auto n = args.get("name")) opts.name = *n;
    const auto e = io::convert_peft_to_gguf(in, base, out, opts);
    for (const auto& n : e.notes) fmt::print("note: {}\n", n);
    for (const auto& f : e.folded)
      fmt::print("folded into lora_b: {}: PEFT scaling {:g}, llama.cpp would use {:g} (alpha/r); lora_b ×{:g} [{}]\n",
                 f.module, f.peft_scaling, f.engine_scaling, f.factor, f.reason);
    std::size_t bytes = 0;
    for (const auto& t : e.tensors) bytes += t.bytes.size();
    fmt::print("{}: {} tensors ({} LoRA pairs, {} bytes of data), {} scale(s) folded; wrote {}\n", in.string(),
               e.tensors.size(), e.tensors.size() / 2, bytes, e.folded.size(), out.string());
    return 0;
  }
  if (to == "peft") {
    if (args.has("outtype")) lora::fail("--outtype is for --to gguf");
    io::GgufImportOptions opts;
    if (auto b = args.get("base")) opts.base = *b;
    std::vector<std::filesystem::path> inputs{in};
    if (!opts.base.empty()) inputs.push_back(opts.base);
    cli::guard_output(args, out, inputs, io::output_kind::folder);
    io::gguf_to_peft(in, out, opts);
    const auto ad = io::load_peft_adapter(out);
    fmt::print("{}: {} modules (r {}, lora_alpha {:g}); wrote {}\n", in.string(), ad.modules.size(), ad.config.r,
               ad.config.lora_alpha, out.string());
    return 0;
  }
  lora::fail("--to must be gguf or peft, got '{}'", to);
}

const lora::cli::Register reg_convert{{"convert", "PEFT adapter <-> llama.cpp GGUF LoRA adapter (scales folded exactly)",
                               R"(usage: lora convert <peft folder> --to gguf --base <HF model folder | base.gguf> --out x.gguf
                         [--outtype f32|f16|bf16|q8_0] [--name NAME]
       lora convert <x.gguf> --to peft --out <folder> [--base <HF model folder | base.gguf>]

--to gguf writes what llama.cpp's convert_lora_to_gguf.py writes (tensor names from the
base's tensor map, q/k lora_b rows permuted for llama/mistral, token_embd LoRA, the
metadata keys), byte-identical for plain LoRA. llama.cpp scales every pair by
adapter.lora.alpha / r; where PEFT's scaling differs (use_rslora, alpha_pattern) lora_b
is multiplied by s_PEFT / s_llama.cpp and the command prints each module so folded.
Refused with the reason: DoRA, lora_B.bias, modules_to_save copies, trainable tokens.
q8_0: rows that are not whole 32-value blocks (lora_b with r < 32) are written as F16.

--to peft writes a PEFT folder (alpha = adapter.lora.alpha, per-tensor ranks as
rank_pattern); --base restores PEFT's q/k row order for llama-family adapters and is
required for them.
)",
                               run_convert}};

}  // namespace
