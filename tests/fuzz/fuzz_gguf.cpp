// libFuzzer target: the GGUF reader (lora::io::GgufFile) and the GGUF LoRA adapter import
// (lora::io::load_gguf_adapter) on bytes held in memory. Any input must either parse or throw
// lora::error; every tensor view stays inside the input (ASan checks the reads below), and
// every tensor it keeps dequantises to as many values as its extents say.
#include <lora/io/gguf_lora.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace {
double touch(const lora::io::GgufValue& v) {
  using lora::io::gguf_type;
  if (v.type == gguf_type::STRING) return static_cast<double>(v.as_string().size());
  if (v.type == gguf_type::ARRAY) {
    double s = 0;
    for (const auto& item : v.as_array().items) s += touch(item);
    return s;
  }
  if (v.type == gguf_type::BOOL) return 1;
  return v.as_double();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto f = lora::io::GgufFile::from_bytes(bytes, "fuzz.gguf");
    double sink = 0;
    for (const auto& [k, v] : f.metadata()) sink += static_cast<double>(k.size()) + touch(v);
    for (const auto& t : f.tensors()) {
      if (f.find(t.name) != &t) __builtin_trap();
      if (t.bytes.size() != lora::io::ggml_nbytes(t.type, t.numel())) __builtin_trap();
      if (t.numel() <= (1 << 16)) {
        try {
          const auto v = t.to_vector<float>();
          if (static_cast<std::int64_t>(v.size()) != t.numel()) __builtin_trap();
          for (float x : v) sink += x;
        } catch (const lora::error&) {
          // a type the reader does not dequantise: refused with its name
        }
      }
    }
    lora::io::GgufImportOptions opts;
    opts.keep_gguf_row_order = true;
    const auto ad = lora::io::load_gguf_adapter(f, opts);
    for (const auto& m : ad.modules) sink += static_cast<double>(m.name.size());
    sink += static_cast<double>(lora::io::gguf_model_card(f, "fuzz.gguf").size());  // gguf_to_peft's README
    volatile double keep = sink;
    (void)keep;
  } catch (const lora::error&) {
    // malformed input rejected with a message: the expected outcome
  }
  return 0;
}
