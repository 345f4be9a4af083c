// libFuzzer target: a model's config.json as `lora plan` reads it (lora::io::parse_json +
// lora::plan::architecture_from_config): bounded JSON, range-checked integers, no overflow.
#include <lora/plan/architecture.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto j = lora::io::parse_json(std::string_view(reinterpret_cast<const char*>(data), size), "config.json");
    const auto a = lora::plan::architecture_from_config(j, "config.json");
    if (a.total_parameters <= 0 || a.modules.empty()) __builtin_trap();
    for (const auto& m : a.modules)
      if (m.in_features <= 0 || m.out_features <= 0) __builtin_trap();
  } catch (const lora::error&) {
  }
  return 0;
}
