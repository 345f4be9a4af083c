#pragma once
// One function template, unchanged on lora::cpu and lora::cuda: the adapter classes take the
// device as a template parameter and keep their member functions (from_host, apply, forward,
// backward, merge, …) across devices, so only moving the activations differs, and that is the
// two small overloads below. examples/device_generic.cpp runs it on the CPU; the CUDA tests
// (tests/cuda/device.cu) run it on both and compare.

#include <lora/lora.hpp>

namespace example {

/// A host matrix where lora::D's functions take it: itself on the CPU, a DeviceMatrix on a GPU.
template <class Device>
struct io;
template <>
struct io<lora::cpu> {
  static lora::Matrix<float> put(const lora::Matrix<float>& m) { return m; }
  static lora::Matrix<float> get(lora::Matrix<float> m) { return m; }
};
#ifdef __CUDACC__
template <>
struct io<lora::cuda> {
  static lora::DeviceMatrix<float> put(const lora::Matrix<float>& m) { return lora::DeviceMatrix<float>::from_host(m); }
  static lora::Matrix<float> get(const lora::DeviceMatrix<float>& m) { return m.to_host(); }
};
#endif

/// A DoRA projection followed by a QLoRA layer (NF4 base with double quantisation), forward
/// and the adapter gradients of the second layer, on any device:
///   H = (m ⊘ ‖W + s·B·A‖_row) ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ),   Y = H·dequant(W2)ᵀ + s2·(H·A2ᵀ)·B2ᵀ.
/// Returns Y and the gradient of ½‖Y‖² with respect to A2 (dY = Y), on the host.
template <class Device>
std::pair<lora::Matrix<float>, lora::Matrix<float>> dora_then_qlora(const lora::DoraAdapter<float>& dora_host,
                                                                    const lora::QLoraLinear<float>& qlora_host,
                                                                    const lora::Matrix<float>& W,
                                                                    const lora::Matrix<float>& X) {
  const auto dora = lora::DoraAdapter<float, Device>::from_host(dora_host);
  const auto layer = lora::QLoraLinear<float, Device>::from_host(qlora_host);
  const auto Wd = io<Device>::put(W);
  const auto Xd = io<Device>::put(X);
  const auto H = dora.apply(Wd, Xd);
  const auto Y = layer.forward(H);
  const auto g = layer.backward(H, Y);
  return {io<Device>::get(Y), io<Device>::get(g.dA)};
}

}  // namespace example
