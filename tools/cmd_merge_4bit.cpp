// lora merge-4bit: a PEFT adapter merged into a bitsandbytes 4-bit (NF4) checkpoint.
#include <lora/io/merge_quantized.hpp>

#include <cctype>

#include "cli.hpp"

namespace {

using namespace lora;

int run_merge_4bit(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"quiet"}, {"base", "adapter", "out", "dtype", "scale", "reference"}, "merge-4bit");
  if (!args.positional().empty())
    lora::fail("unexpected argument '{}' (see 'lora merge-4bit --help')", args.positional()[0]);
  const std::string base_path = args.required("base"), adapter_path = args.required("adapter"), out = args.required("out");
  io::QuantizedMergeOptions opt;
  if (auto d = args.get("dtype")) {
    std::string lower(*d);
    for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower == "nf4") opt.requantize = true;
    else opt.out = io::parse_float_dtype(*d, "--dtype");
  }
  opt.scale = args.number("scale", 1.0);
  std::vector<std::filesystem::path> inputs = {base_path, adapter_path};
  if (auto r = args.get("reference")) inputs.emplace_back(*r);
  cli::guard_output(args, out, inputs,
                    std::filesystem::path(out).extension() == ".safetensors" ? io::output_kind::file
                                                                              : io::output_kind::folder);
  const auto base = io::Checkpoint::open(base_path);
  const auto adapter = io::load_peft_adapter(adapter_path);
  std::optional<io::Checkpoint> ref;
  if (auto r = args.get("reference")) ref.emplace(io::Checkpoint::open(*r));
  const auto sum = io::merge_into_quantized(base, adapter, out, opt, ref ? &*ref : nullptr);
  if (!args.has("quiet")) {
    if (ref || opt.requantize) {
      fmt::print("{:<50}  {:>5}", "weight", "NF4");
      if (opt.requantize) fmt::print("  {:>13}", "requant error");
      if (ref) fmt::print("  {:>12}  {:>14}", "quant error", "merged error");
      fmt::print("\n");
      double worst = 0, worst_rq = 0;
      for (const auto& m : sum.modules) {
        fmt::print("{:<50}  {:>5}", m.weight, m.from_nf4 ? "yes" : "no");
        if (opt.requantize) fmt::print("  {:>13.4e}", m.requant_error);
        if (ref) fmt::print("  {:>12.4e}  {:>14.4e}", m.quant_error, m.merged_error);
        fmt::print("\n");
        worst = std::max(worst, m.merged_error);
        if (m.from_nf4) worst_rq = std::max(worst_rq, m.requant_error);
      }
      if (opt.requantize) fmt::print("\nlargest ‖deq(q(M)) − M‖_F / ‖M‖_F (M = deq + ΔW): {:.4e}\n", worst_rq);
      if (ref) fmt::print("{}largest ‖out − (W_ref + ΔW)‖_F / ‖W_ref + ΔW‖_F: {:.4e}\n", opt.requantize ? "" : "\n", worst);
    }
    if (opt.requantize)
      fmt::print("merged {} modules, {} of {} NF4 weights quantised again; wrote {} tensors (bnb-4bit) to {}\n",
                 sum.modules.size(), sum.requantized, sum.nf4_weights, sum.written, out);
    else
      fmt::print("merged {} modules into {} NF4-dequantised weights; wrote {} tensors ({}) to {}\n", sum.modules.size(),
                 sum.nf4_weights, sum.written, io::dtype_name(opt.out), out);
  }
  return 0;
}

const lora::cli::Register reg_merge_4bit{{"merge-4bit", "merge a PEFT adapter into a bitsandbytes 4-bit checkpoint (writes bf16/f16)",
                               R"(usage: lora merge-4bit --base <bnb-4bit checkpoint> --adapter <peft folder> --out <file | folder>
                       [--dtype BF16|F16|F32|NF4] [--scale S] [--reference <float checkpoint>] [--quiet]

Every NF4 weight of the base (transformers' load_in_4bit layout, double quantisation
included) is dequantised bit-exactly, s·B·A is added in float64 and the result is rounded
once to --dtype (default BF16); the NF4 companion tensors are dropped. With --reference
(the float model the 4-bit one was quantised from) it prints per merged weight the
quantisation error ‖deq − W_ref‖_F/‖W_ref‖_F and the error of the written result against
merging into the float base, ‖out − (W_ref + ΔW)‖_F/‖W_ref + ΔW‖_F.
--dtype NF4 writes a bnb-4bit checkpoint instead: each merged NF4 weight M = deq + ΔW is
quantised again (the base tensor's blocksize and double quantisation), other tensors are
kept as stored; it prints per module ‖deq(q(M)) − M‖_F/‖M‖_F (and with --reference the
written weight's error against W_ref + ΔW).
)",
                               run_merge_4bit}};

}  // namespace
