// libFuzzer target: loading a whole PEFT adapter folder (lora::io::load_peft_adapter).
// Input: adapter_config.json text, a NUL byte, then adapter_model.safetensors bytes.
// Both are written to a scratch folder per run; a loaded adapter is saved and loaded
// again, and must come back with the same factors.
#include <lora/io/peft.hpp>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <unistd.h>

namespace {
const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    std::string t = (std::filesystem::temp_directory_path() / "lora-fuzz-peft-XXXXXX").string();
    if (!::mkdtemp(t.data())) std::abort();
    return std::filesystem::path(t);
  }();
  return dir;
}
void put(const std::filesystem::path& p, std::string_view s) {
  std::ofstream(p, std::ios::binary).write(s.data(), static_cast<std::streamsize>(s.size()));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace fs = std::filesystem;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const auto nul = in.find('\0');
  const fs::path dir = scratch() / "adapter", copy = scratch() / "copy";
  fs::remove_all(dir);
  fs::create_directory(dir);
  put(dir / "adapter_config.json", in.substr(0, nul));
  if (nul != std::string_view::npos) put(dir / "adapter_model.safetensors", in.substr(nul + 1));
  try {
    const auto ad = lora::io::load_peft_adapter(dir);
    for (const auto& m : ad.modules) {
      const auto& a = m.adapter;
      if (a.A().rows() != a.rank() || a.B().cols() != a.rank() || a.rank() != ad.config.rank_for(m.name)) __builtin_trap();
      if (m.is_dora() && a.magnitude().size() != a.out_features()) __builtin_trap();
    }
    for (const auto& w : ad.params) {  // parameter LoRAs: B's columns are A's rows, r·E of them
      if (w.B.cols() != w.A.rows() || w.A.rows() == 0) __builtin_trap();
      if (w.rank > 0 && (w.A.rows() % w.rank != 0 || w.experts() * w.rank != w.A.rows())) __builtin_trap();
      if (w.rank > 0) (void)w.expert(w.experts() - 1);
    }
    try {
      lora::io::save_peft_adapter(copy, ad);
    } catch (const lora::error&) {
      return 0;  // e.g. a module whose rank the patterns cannot express
    }
    const auto back = lora::io::load_peft_adapter(copy);
    if (back.modules.size() != ad.modules.size() || back.params.size() != ad.params.size()) __builtin_trap();
    for (std::size_t i = 0; i < ad.params.size(); ++i)
      if (ad.params[i].path != back.params[i].path || ad.params[i].A.size() != back.params[i].A.size() ||
          std::memcmp(ad.params[i].A.data(), back.params[i].A.data(), sizeof(float) * static_cast<std::size_t>(ad.params[i].A.size())) != 0)
        __builtin_trap();
    for (std::size_t i = 0; i < ad.modules.size(); ++i) {
      const auto &x = ad.modules[i].adapter, &y = back.modules[i].adapter;
      if (ad.modules[i].name != back.modules[i].name) __builtin_trap();
      // Bitwise equality (NaN payloads included) for what went through F32 unchanged.
      if (x.A().size() != y.A().size() || x.B().size() != y.B().size()) __builtin_trap();
      if (std::memcmp(x.A().data(), y.A().data(), sizeof(float) * static_cast<std::size_t>(x.A().size())) != 0 ||
          std::memcmp(x.B().data(), y.B().data(), sizeof(float) * static_cast<std::size_t>(x.B().size())) != 0)
        __builtin_trap();
      if (x.scaling() != y.scaling() && !(std::isnan(x.scaling()) && std::isnan(y.scaling()))) __builtin_trap();
    }
  } catch (const lora::error&) {
  }
  return 0;
}
