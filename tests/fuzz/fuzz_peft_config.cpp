// libFuzzer target: the PEFT adapter_config.json parser (lora::io::PeftConfig::from_json)
// and what is computed from it (patterns, targets, scaling, to_json round trip).
#include <lora/io/peft.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::ordered_json j;
  try {  // as load_peft_config reads: depth-bounded, duplicate keys refused
    j = lora::io::parse_json<nlohmann::ordered_json>(std::string_view(reinterpret_cast<const char*>(data), size),
                                                     "adapter_config.json");
  } catch (const lora::error&) {
    return 0;  // not JSON (or hostile JSON): load_peft_config reports that before from_json is reached
  }
  try {
    const auto c = lora::io::PeftConfig::from_json(j, "adapter_config.json");
    if (c.r < 1) __builtin_trap();
    for (const char* m : {"model.layers.0.self_attn.q_proj", "q_proj", "transformer.h.11.attn.c_attn", ""}) {
      const int r = c.rank_for(m);
      if (r < 1) __builtin_trap();
      const double s = c.scaling_for(m);
      if (!std::isfinite(c.alpha_for(m))) __builtin_trap();
      (void)s;
      (void)c.targets(m);
    }
    // What we write must read back to the same fields.
    const auto back = lora::io::PeftConfig::from_json(c.to_json(), "round trip");
    if (back.r != c.r || back.lora_alpha != c.lora_alpha || back.use_rslora != c.use_rslora ||
        back.use_dora != c.use_dora || back.fan_in_fan_out != c.fan_in_fan_out ||
        back.target_modules != c.target_modules || back.target_modules_regex != c.target_modules_regex ||
        back.rank_pattern != c.rank_pattern || back.alpha_pattern != c.alpha_pattern)
      __builtin_trap();
  } catch (const lora::error&) {
  }
  return 0;
}
