// lora quantize / lora dequantize: NF4 (bitsandbytes) checkpoints in transformers' bnb-4bit layout.
#include <lora/io/quantize.hpp>

#include <filesystem>
#include <functional>
#include <memory>

#include "cli.hpp"
#include "progress.hpp"

namespace {

namespace fs = std::filesystem;

/// Progress on stderr by input bytes, as "lora <cmd>:  45%  1.20 / 2.65 GB"; on by default
/// from 256 MiB of input.
std::function<void(const lora::io::WriteProgress&)> progress_printer(const lora::cli::Args& args, const fs::path& in,
                                                                     const char* command,
                                                                     std::shared_ptr<lora::cli::Progress>& holder) {
  std::uint64_t total = 0;
  if (fs::is_directory(in)) {
    for (const auto& e : fs::directory_iterator(in))
      if (e.is_regular_file() && e.path().extension() == ".safetensors") total += e.file_size();
  } else {
    total = fs::file_size(in);
  }
  holder = std::make_shared<lora::cli::Progress>(
      command, !args.has("quiet") && (args.has("progress") || total >= (std::uint64_t{256} << 20)));
  if (!holder->enabled()) return {};
  return [p = holder](const lora::io::WriteProgress& w) {
    p->update(w.bytes_done, w.bytes_total,
              w.bytes_done < w.bytes_total ? fmt::format("{:.2f} / {:.2f} GB", w.bytes_done / 1e9, w.bytes_total / 1e9)
                                           : fmt::format("{:.2f} GB", w.bytes_total / 1e9));
  };
}

/// The input must exist before guard_output compares it with the output.
fs::path existing_input(const lora::cli::Args& args) {
  const fs::path in = args.positional().at(0);
  if (!fs::exists(in)) lora::fail("{}: no such file or folder", in.string());
  return in;
}

int run_quantize(const std::vector<std::string>& argv) {
  lora::cli::Args args(argv, {"double-quant", "progress", "quiet"}, {"out", "blocksize", "skip"}, "quantize");
  if (args.positional().size() != 1)
    lora::fail("expected one input (a .safetensors file or a model folder), got {}", args.positional().size());
  const fs::path out = args.required("out");
  lora::io::QuantizeOptions opt;
  const std::int64_t bs = args.integer("blocksize", 64, 0, std::int64_t{1} << 40);
  if (!lora::quant::is_valid_blocksize(bs))
    lora::fail("--blocksize must be a power of two from 32 to 4096, got {}", args.get("blocksize").value_or("64"));
  opt.nf4 = {bs, args.has("double-quant")};
  opt.skip = lora::cli::Args::split(args.get("skip").value_or("lm_head,embed_tokens"));
  const fs::path in = existing_input(args);
  lora::cli::guard_output(args, out, {in}, fs::is_directory(in) ? lora::io::output_kind::folder : lora::io::output_kind::file);
  std::shared_ptr<lora::cli::Progress> progress;
  opt.progress = progress_printer(args, in, "quantize", progress);
  const auto s = lora::io::quantize_checkpoint(in, out, opt);
  fmt::print("quantised {} tensors to NF4 (blocksize {}{}), kept {} as they were: {:.1f} MiB -> {:.1f} MiB, {:.3f} bits per quantised parameter\n",
             s.quantized, opt.nf4.blocksize, opt.nf4.double_quant ? ", double quantisation" : "", s.kept,
             s.bytes_before / 1048576.0, s.bytes_after / 1048576.0, s.bits_per_parameter());
  return 0;
}

int run_dequantize(const std::vector<std::string>& argv) {
  lora::cli::Args args(argv, {"progress", "quiet"}, {"out", "dtype"}, "dequantize");
  if (args.positional().size() != 1)
    lora::fail("expected one input (a .safetensors file or a model folder), got {}", args.positional().size());
  const fs::path out = args.required("out");
  lora::io::DequantizeOptions opt;
  if (auto d = args.get("dtype")) opt.to = lora::io::parse_float_dtype(*d, "--dtype");
  const fs::path in = existing_input(args);
  lora::cli::guard_output(args, out, {in}, fs::is_directory(in) ? lora::io::output_kind::folder : lora::io::output_kind::file);
  std::shared_ptr<lora::cli::Progress> progress;
  opt.progress = progress_printer(args, in, "dequantize", progress);
  const auto s = lora::io::dequantize_checkpoint(in, out, opt);
  fmt::print("dequantised {} NF4 tensors{}\n", s.dequantized, opt.to ? fmt::format(" to {}", lora::io::dtype_name(*opt.to)) : "");
  return 0;
}

const lora::cli::Register reg_quantize{{"quantize", "quantise a model's linear weights to NF4 (bitsandbytes / transformers bnb-4bit layout)",
    R"(usage: lora quantize <model.safetensors | folder> --out <file | folder> [--blocksize 64] [--double-quant]
                     [--skip lm_head,embed_tokens]

Quantises every 2-D floating-point tensor whose name ends in ".weight" to NF4,
bit-identical to bitsandbytes' quantize_4bit(quant_type="nf4"), and writes it in
the layout transformers saves for bnb-4bit models: <m>.weight (packed uint8),
<m>.weight.absmax, .quant_map, (.nested_absmax, .nested_quant_map with
--double-quant) and the .quant_state.bitsandbytes__nf4 JSON blob. Norms, biases
and other 1-D tensors are copied as they are.

  --blocksize N     elements per scale: 32, 64, 128, ..., 4096 (default 64)
  --double-quant    quantise the scales too (about 4.127 instead of 4.5 bits per parameter)
  --skip LIST       comma-separated module names or path suffixes to leave unquantised
                    (default lm_head,embed_tokens)
  --progress        always report progress on stderr (default: only above 256 MiB)
  --quiet           never report progress

A folder input (sharded or not) gives a folder output: every .safetensors file is
converted, config.json gets a "quantization_config", the shard index lists the
new tensors and its total_size is the bytes written, other files are copied. The output is written atomically.)",
    run_quantize}};

const lora::cli::Register reg_dequantize{{"dequantize", "dequantise a bnb-4bit NF4 checkpoint back to f32/bf16/f16",
    R"(usage: lora dequantize <model.safetensors | folder> --out <file | folder> [--dtype f32|bf16|f16|f64]
                       [--progress | --quiet]

Dequantises every bitsandbytes NF4 weight (with or without double quantisation)
of a transformers bnb-4bit checkpoint — ours or one from the hub — to a plain
tensor: code value × absmax in float32, then rounded to --dtype (any case; default: the
dtype recorded in the weight's quant_state). Other tensors are copied; a folder's
config.json loses its "quantization_config". The output is written atomically.
Progress goes to stderr above 256 MiB of input (--progress: always; --quiet: never).)",
    run_dequantize}};

}  // namespace
