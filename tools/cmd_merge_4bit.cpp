// lora merge-4bit: a PEFT adapter merged into a bitsandbytes 4-bit (NF4) checkpoint.
#include <lora/io/merge_quantized.hpp>

#include "cli.hpp"

namespace {

using namespace lora;

int run_merge_4bit(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"quiet"}, {"base", "adapter", "out", "dtype", "scale", "reference"}, "merge-4bit");
  if (!args.positional().empty())
    lora::fail("unexpected argument '{}' (see 'lora merge-4bit --help')", args.positional()[0]);
  const std::string base_path = args.required("base"), adapter_path = args.required("adapter"), out = args.required("out");
  io::QuantizedMergeOptions opt;
  if (auto d = args.get("dtype")) opt.out = io::parse_float_dtype(*d, "--dtype");
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
    if (ref) {
      fmt::print("{:<50}  {:>5}  {:>12}  {:>14}\n", "weight", "NF4", "quant error", "merged error");
      double worst = 0;
      for (const auto& m : sum.modules) {
        fmt::print("{:<50}  {:>5}  {:>12.4e}  {:>14.4e}\n", m.weight, m.from_nf4 ? "yes" : "no", m.quant_error,
                   m.merged_error);
        worst = std::max(worst, m.merged_error);
      }
      fmt::print("\nlargest ‖out − (W_ref + ΔW)‖_F / ‖W_ref + ΔW‖_F: {:.4e}\n", worst);
    }
    fmt::print("merged {} modules into {} NF4-dequantised weights; wrote {} tensors ({}) to {}\n", sum.modules.size(),
               sum.nf4_weights, sum.written, io::dtype_name(opt.out), out);
  }
  return 0;
}

const lora::cli::Register reg{{"merge-4bit", "merge a PEFT adapter into a bitsandbytes 4-bit checkpoint (writes bf16/f16)",
                               R"(usage: lora merge-4bit --base <bnb-4bit checkpoint> --adapter <peft folder> --out <file | folder>
                       [--dtype BF16|F16|F32] [--scale S] [--reference <float checkpoint>] [--quiet]

Every NF4 weight of the base (transformers' load_in_4bit layout, double quantisation
included) is dequantised bit-exactly, s·B·A is added in float64 and the result is rounded
once to --dtype (default BF16); the NF4 companion tensors are dropped. With --reference
(the float model the 4-bit one was quantised from) it prints per merged weight the
quantisation error ‖deq − W_ref‖_F/‖W_ref‖_F and the error of the written result against
merging into the float base, ‖out − (W_ref + ΔW)‖_F/‖W_ref + ΔW‖_F.
)",
                               run_merge_4bit}};

}  // namespace
