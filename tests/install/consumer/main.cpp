#include <lora/lora.hpp>

#include <cstdio>

int main() {
  lora::LowRankAdapter<double, lora::cpu, lora::rslora_scaling> ad(16, 8, 4, 8.0);
  lora::initialize(ad, lora::init_method::random, 1);
  const double s = ad.scaling();  // 8 / sqrt(4) = 4
  std::printf("scaling %.3f params %ld\n", s, static_cast<long>(ad.trainable_parameters()));
  return (s == 4.0 && ad.trainable_parameters() == 96 && ad.delta_weight().norm() > 0) ? 0 : 1;
}
