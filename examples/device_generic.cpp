// examples/device_generic.hpp's function template on lora::cpu (the CUDA tests run the same
// template on lora::cuda and compare): a DoRA projection, then a QLoRA layer.

#include "device_generic.hpp"

#include <cstdio>

int main() {
  const lora::Index in = 256, hidden = 128, out = 64, r = 8, T = 4;
  lora::LowRankAdapter<float> a(in, hidden, r, 16.0), a2(hidden, out, r, 16.0);
  // Factors as after some training (PEFT starts B at zero).
  a.set_A(lora::Matrix<float>::Random(r, in) * 0.1f);
  a.set_B(lora::Matrix<float>::Random(hidden, r) * 0.1f);
  a2.set_A(lora::Matrix<float>::Random(r, hidden) * 0.1f);
  a2.set_B(lora::Matrix<float>::Random(out, r) * 0.1f);
  const lora::Matrix<float> W = lora::Matrix<float>::Random(hidden, in) * 0.05f;
  const lora::Matrix<float> W2 = lora::Matrix<float>::Random(out, hidden) * 0.05f;
  const lora::Matrix<float> X = lora::Matrix<float>::Random(T, in);
  const auto dora = lora::DoraAdapter<float>::from_weight(a, W);
  const lora::QLoraLinear<float> layer(lora::Nf4Tensor::quantize(W2, {.blocksize = 64, .double_quant = true}), a2);
  const auto [Y, dA2] = example::dora_then_qlora<lora::cpu>(dora, layer, W, X);
  std::printf("Y [%ld x %ld], |Y| = %.6f, |dA2| = %.6f\n", static_cast<long>(Y.rows()), static_cast<long>(Y.cols()),
              Y.norm(), dA2.norm());
  return 0;
}
