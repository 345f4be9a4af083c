#pragma once
// Double quantisation of NF4 block scales, as bitsandbytes' quantize_4bit with
// compress_statistics=True: the float32 absmax values minus their mean
// (`offset`) are quantised blockwise (blocks of 256) with the signed dynamic
// 8-bit map, and restored on dequantisation as code[q]·nested_absmax + offset.

#include <lora/core/host_device.hpp>
#include <lora/error.hpp>
#include <lora/quant/nf4.hpp>

#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lora::quant {

/// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
/// 256 ascending float32 values in [-0.99297, 1]; entry 127 is 0, entry 255 is 1.
/// bitsandbytes builds it at run time with torch float32 arithmetic, so its last bits
/// can vary with the torch build; these values are its output under torch 1.13
/// (CPU). Checkpoints carry their own map (`nested_quant_map`), which is what
/// dequantisation uses.
inline constexpr std::array<float, 256> dynamic_map_signed = {
    -0x1.fc6666p-1f, -0x1.f53332p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df9998p-1f, -0x1.d86666p-1f,
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb9998p-1f, -0x1.b46666p-1f, -0x1.ad3332p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.979998p-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f,
    -0x1.7acccep-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56cccep-1f,
    -0x1.4f999ap-1f, -0x1.486666p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.07999ap-1f, -0x1.006666p-1f,
    -0x1.f26668p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6664p-2f,
    -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626664p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3334p-3f,
    -0x1.de6668p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3332p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eap-4f,
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb85p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f4p-5f,
    -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c28ep-5f, -0x1.fd70a4p-6f, -0x1.cf5c26p-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451eb8p-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f,
    -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f,
    -0x1.27476ep-21f, 0.0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f,
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f,
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f,
    0x1.451eb8p-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c26p-6f, 0x1.fd70a4p-6f, 0x1.15c28ep-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f,
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f4p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb85p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eap-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3332p-3f, 0x1.88p-3f,
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6668p-3f, 0x1.fb3334p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626664p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6664p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26668p-2f, 0x1.006666p-1f, 0x1.07999ap-1f, 0x1.0eccccp-1f,
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486666p-1f, 0x1.4f999ap-1f, 0x1.56cccep-1f, 0x1.5ep-1f, 0x1.653334p-1f,
    0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7acccep-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.979998p-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3332p-1f, 0x1.b46666p-1f, 0x1.bb9998p-1f,
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df9998p-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53332p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};

/// Block size of the nested (8-bit) quantisation of the absmax values.
inline constexpr std::int64_t nested_blocksize = 256;

/// bitsandbytes' dQuantize<0> for a 256-entry ascending code: a 7-step binary
/// search from entry 127, then the nearer of the final pivot and its bracketing
/// neighbour by the float32 midpoint ((a + b)·0.5, two roundings). NaN gives 0.
/// Host and device (Nf4Tensor<cuda>'s double quantisation runs it on a map in
/// shared memory).
LORA_HOST_DEVICE inline std::uint8_t dynamic_encode(const float* code, float x) {
  // The midpoint as two float32 roundings, never contracted: on the device by intrinsics.
  auto midpoint = [](float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(__fadd_rn(a, b), 0.5f);
#else
    return (a + b) * 0.5f;
#endif
  };
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) return static_cast<std::uint8_t>(x > midpoint(upper, val) ? upper_pivot : pivot);
  return static_cast<std::uint8_t>(x < midpoint(lower, val) ? lower_pivot : pivot);
}

inline std::uint8_t dynamic_encode(const std::array<float, 256>& code, float x) { return dynamic_encode(code.data(), x); }

/// The compressed block scales of an NF4 tensor.
struct DoubleQuantState {
  std::vector<std::uint8_t> codes;     ///< one 8-bit code per NF4 block (`absmax` in the checkpoint)
  std::vector<float> nested_absmax;    ///< one float per 256 codes
  std::array<float, 256> nested_code;  ///< the 8-bit map (`nested_quant_map`)
  float offset = 0.0f;                 ///< mean of the original absmax values (`nested_offset`)

  /// Restored scales, bitsandbytes' arithmetic: float(float(code[q]·nested_absmax) + offset).
  std::vector<float> restore() const {
    std::vector<float> out(codes.size());
    restore_into(out.data());
    return out;
  }
  void restore_into(float* out) const {
    const std::int64_t n = static_cast<std::int64_t>(codes.size());
    for (std::int64_t i = 0; i < n; ++i) {
      // Two roundings (the product, then the sum), never a fused multiply-add:
      // bitsandbytes runs them as separate kernels.
      volatile float p = nested_code[codes[i]] * nested_absmax[i / nested_blocksize];
      out[i] = p + offset;
    }
  }
};

/// Double-quantises NF4 block scales: offset = mean(absmax) (summed in double,
/// rounded to float), then blockwise 8-bit quantisation of absmax - offset in
/// blocks of 256 with dynamic_map_signed: nested_absmax = max |absmax - offset|,
/// q = dynamic_encode((absmax - offset)·(1/nested_absmax)).
inline DoubleQuantState double_quantize(const float* absmax, std::int64_t n) {
  DoubleQuantState s;
  s.nested_code = dynamic_map_signed;
  s.codes.resize(static_cast<std::size_t>(n));
  if (n == 0) return s;
  double sum = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(absmax[i])) lora::detail::fail("double_quantize: absmax[{}] is {}, expected a finite value", i, absmax[i]);
    sum += absmax[i];
  }
  s.offset = static_cast<float>(sum / static_cast<double>(n));
  const std::int64_t nb = num_blocks(n, nested_blocksize);
  s.nested_absmax.resize(static_cast<std::size_t>(nb));
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t begin = b * nested_blocksize, end = std::min(n, begin + nested_blocksize);
    float m = -FLT_MAX;
    for (std::int64_t i = begin; i < end; ++i) {
      const float a = std::fabs(absmax[i] - s.offset);
      m = a > m ? a : m;
    }
    s.nested_absmax[b] = m;
    const float inv = 1.0f / m;
    for (std::int64_t i = begin; i < end; ++i) s.codes[i] = dynamic_encode(s.nested_code, (absmax[i] - s.offset) * inv);
  }
  return s;
}

/// Storage cost of NF4 per parameter: 4 + 32/blocksize bits without double
/// quantisation (4.5 at 64); 4 + 8/blocksize + 32/(256·blocksize) with it
/// (≈ 4.127 at 64), ignoring the 256-entry map and the offset.
constexpr double nf4_bits_per_parameter(std::int64_t blocksize, bool double_quant) {
  const double bs = static_cast<double>(blocksize);
  return double_quant ? 4.0 + 8.0 / bs + 32.0 / (256.0 * bs) : 4.0 + 32.0 / bs;
}

}  // namespace lora::quant
