// The program from docs/getting-started.md, compiled with the build so it stays true.
#include <lora/lora.hpp>

#include <fmt/format.h>

int main() {
  using Mat = lora::Matrix<float>;          // row-major: tokens are rows
  Mat W = Mat::Random(4096, 4096) * 0.02f;  // frozen base weight [out x in]
  Mat X = Mat::Random(8, 4096);             // 8 tokens

  lora::LowRankAdapter<float> ad(/*in=*/4096, /*out=*/4096, /*r=*/16, /*alpha=*/32);
  lora::initialize(ad, lora::init_method::kaiming_uniform, /*seed=*/42);  // PEFT's default

  Mat Y = ad.apply(W, X);  // X·Wᵀ + (alpha/r)·(X·Aᵀ)·Bᵀ

  Mat dY = Mat::Random(8, 4096);  // ∂L/∂Y from upstream
  auto g = ad.backward(W, X, dY);  // g.dA, g.dB, g.dX
  ad.A() -= 1e-3f * g.dA;          // one SGD step
  ad.B() -= 1e-3f * g.dB;

  ad.merge(W);  // W += ΔW, for deployment
  fmt::print("scaling {:.1f}, |ΔW|_F = {:.4f}, trainable parameters {}, |Y|_F = {:.2f}\n", ad.scaling(),
             ad.delta_weight().norm(), ad.trainable_parameters(), Y.norm());
  try {
    lora::LowRankAdapter<float> bad(64, 32, 33, 8.0);
  } catch (const lora::error& e) {
    fmt::print("lora::error: {}\n", e.what());
  }
}
