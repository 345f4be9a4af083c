// libFuzzer target: the bitsandbytes 4-bit quant_state reader (lora::quant::bnb::read).
// First byte even: the rest is the quant_state JSON blob of a weight "w" whose companion
// tensors are fixed ([8 x 16], blocksize 64; bit 1 of the first byte selects double
// quantisation). First byte odd: the rest is a whole safetensors file, and every
// "<w>.quant_state.bitsandbytes__nf4" in it is read.
#include <lora/io/safetensors.hpp>
#include <lora/quant/bnb_format.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace {
std::string fixed_layout(std::string_view blob, bool dq) {
  using lora::io::dtype;
  using lora::io::TensorData;
  std::vector<std::uint8_t> packed(64);
  for (std::size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<std::uint8_t>(i * 37 + 11);
  std::vector<TensorData> t;
  t.push_back(TensorData::from_values("w", packed.data(), {64, 1}, dtype::U8));
  if (dq) {
    const std::uint8_t codes[2] = {3, 250};
    const float nested[1] = {0.25f};
    t.push_back(TensorData::from_values("w.absmax", codes, {2}, dtype::U8));
    t.push_back(TensorData::from_values("w.nested_absmax", nested, {1}, dtype::F32));
    t.push_back(TensorData::from_values("w.nested_quant_map", lora::quant::dynamic_map_signed.data(), {256}, dtype::F32));
  } else {
    const float absmax[2] = {0.5f, 2.0f};
    t.push_back(TensorData::from_values("w.absmax", absmax, {2}, dtype::F32));
  }
  t.push_back(TensorData::from_values("w.quant_map", lora::quant::nf4_code.data(), {16}, dtype::F32));
  t.push_back(TensorData::from_values("w" + std::string(lora::quant::bnb::state_suffix),
                                      reinterpret_cast<const std::uint8_t*>(blob.data()),
                                      {static_cast<std::int64_t>(blob.size())}, dtype::U8));
  return lora::io::serialize_safetensors(t);
}

void read_one(const lora::io::SafetensorsFile& f, const std::string& w) {
  try {
    const auto q = lora::quant::bnb::read(f, w);
    if (static_cast<std::int64_t>(q.packed().size()) != lora::quant::packed_bytes(q.numel())) __builtin_trap();
    if (q.numel() <= (1 << 20)) {
      std::vector<float> out(static_cast<std::size_t>(q.numel()));
      q.dequantize_into(out.data());
      volatile float keep = out.empty() ? 0.0f : out.back();
      (void)keep;
    }
  } catch (const lora::error&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if ((data[0] & 1) == 0) {
    const auto f = lora::io::SafetensorsFile::from_bytes(fixed_layout(rest, (data[0] & 2) != 0), "fuzz.safetensors");
    read_one(f, "w");
    return 0;
  }
  try {
    const auto f = lora::io::SafetensorsFile::from_bytes(rest, "fuzz.safetensors");
    for (const auto& name : f.names()) {
      for (std::string_view suffix : {lora::quant::bnb::state_suffix, std::string_view(".quant_state.bitsandbytes__fp4")})
        if (name.size() > suffix.size() && name.substr(name.size() - suffix.size()) == suffix)
          read_one(f, name.substr(0, name.size() - suffix.size()));
    }
  } catch (const lora::error&) {
  }
  return 0;
}
