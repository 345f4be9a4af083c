// libFuzzer target: PEFT's regexes (lora/io/pattern.hpp) — target_modules strings
// (re.fullmatch), rank_pattern/alpha_pattern keys (get_pattern_key) and layers_pattern
// searches — on arbitrary patterns and names. RE2: linear time, so -timeout catches a hang.
// Input: pattern, a NUL byte, the module name.
#include <lora/io/pattern.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const auto nul = in.find('\0');
  const std::string pattern = in.substr(0, nul);
  const std::string name = nul == std::string::npos ? std::string("model.layers.0.self_attn.q_proj") : in.substr(nul + 1);
  try {
    const bool full = lora::io::regex_full_match(pattern, name);
    const bool key = lora::io::pattern_key_matches(pattern, name);
    if (full && !key) __builtin_trap();  // fullmatch(k) implies (.*\.)?(k) matches
  } catch (const lora::error&) {
  }
  try {
    (void)lora::io::regex_search_group("^.*\\.(?:" + pattern + ")\\.([0-9]+)\\.", name, "layers_pattern");
  } catch (const lora::error&) {
  }
  return 0;
}
