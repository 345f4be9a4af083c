// libFuzzer target: the safetensors header parser (lora::io::SafetensorsFile).
// Any input must either parse or throw lora::error; every view of a parsed file must
// stay inside the input (ASan checks the reads below).
#include <lora/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto f = lora::io::SafetensorsFile::from_bytes(bytes, "fuzz.safetensors");
    double sink = 0;
    for (const auto& t : f.tensors()) {
      if (t.bytes.size() != static_cast<std::size_t>(t.numel()) * lora::io::dtype_size(t.type)) __builtin_trap();
      if (t.numel() > 0) sink += t.at<double>(t.numel() - 1);
      if (t.numel() <= (1 << 16)) {
        for (double v : t.to_vector<double>()) sink += v;
        if (t.ndim() == 1 || t.ndim() == 2) sink += static_cast<double>(t.to_matrix<float>().size());
      }
      if (!f.contains(t.name) || &f.tensor(t.name) != &t) __builtin_trap();
    }
    for (const auto& [k, v] : f.metadata()) sink += static_cast<double>(k.size() + v.size());
    volatile double keep = sink;
    (void)keep;
  } catch (const lora::error&) {
    // malformed input rejected with a message: the expected outcome
  }
  return 0;
}
