// Loads a PEFT adapter folder, prints its modules, and saves it again with
// lora::io::save_peft_adapter — the folder tests/gpu/peft_load_check.py feeds to
// PeftModel.from_pretrained.
//
//   peft_roundtrip tests/data/peft/dora_r4_a8_qv/adapter /tmp/dora_saved [f32|bf16|f16]
#include <lora/io/peft.hpp>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: peft_roundtrip <adapter folder> <output folder> [f32|bf16|f16]\n");
    return 1;
  }
  try {
    const std::string t = argc > 3 ? argv[3] : "f32";
    const lora::io::dtype type = t == "bf16"  ? lora::io::dtype::BF16
                                 : t == "f16" ? lora::io::dtype::F16
                                 : t == "f32" ? lora::io::dtype::F32
                                              : throw lora::error("dtype must be f32, bf16 or f16, got '" + t + "'");
    const auto ad = lora::io::load_peft_adapter(argv[1]);
    fmt::print("{}: r={} alpha={} rslora={} dora={}, {} modules\n", argv[1], ad.config.r, ad.config.lora_alpha,
               ad.config.use_rslora, ad.config.use_dora, ad.modules.size());
    for (const auto& m : ad.modules)
      fmt::print("  {:<40} r={:<3} s={:.4f} [{} x {}]{}\n", m.name, m.adapter.rank(), m.adapter.scaling(),
                 m.adapter.out_features(), m.adapter.in_features(), m.is_dora() ? " +magnitude" : "");
    lora::io::save_peft_adapter(argv[2], ad, type);
    fmt::print("saved to {} ({})\n", argv[2], lora::io::dtype_name(type));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft_roundtrip: %s\n", e.what());
    return 1;
  }
  return 0;
}
