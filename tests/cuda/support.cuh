#pragma once
// Helpers shared by the CUDA tests (one file per header: adapter.cu, dora.cu, nf4.cu, qlora.cu,
// multi.cu, spectrum.cu, lt.cu; device.cu runs one body on lora::cpu and lora::cuda):
// tolerances, random host matrices, NaN poisoning of device outputs so that an element a
// kernel fails to write fails, and the host/device moves of a device-generic test body.

#include <lora/cuda/runtime.hpp>

#include "support/catch.hpp"
#if __has_include(<catch2/catch_template_test_macros.hpp>)
#include <catch2/catch_template_test_macros.hpp>  // Catch2 v3
#endif
#include "support/reference.hpp"

#include <type_traits>

namespace lora::test {

template <class E>
MatD d(const Eigen::MatrixBase<E>& m) {
  return m.template cast<double>();
}

/// Relative tolerance of a GPU result against float64: bf16/half 1e-2, float 1e-5.
template <class S>
double tol() {
  return std::is_same_v<S, float> ? 1e-5 : 1e-2;
}

/// Fresh N(0, scale²) matrix, drawn in double and rounded to S.
template <class S>
Matrix<S> rand_s(Index r, Index c, Generator& g, double scale = 1.0) {
  return random_matrix<double>(r, c, g, scale).template cast<S>();
}

/// Fills a device view with 0xFF bytes (NaN in bf16, half and float).
template <class S>
void poison(DeviceView<S> v) {
  if (v.rows > 0 && v.cols > 0) {
    LORA_CUDA_CHECK(cudaMemset2D(v.data, v.ld * sizeof(S), 0xFF, v.cols * sizeof(S), v.rows));
    // The memset runs on the legacy default stream, which the library's non-blocking streams do
    // not wait for: finish it before the kernel under test is queued (under racecheck it once
    // landed after the kernel and turned correct outputs back into NaN).
    LORA_CUDA_CHECK(cudaDeviceSynchronize());
  }
}

/// X in the first columns of a NaN-poisoned [rows × (cols + extra)] device matrix (the fused
/// paths' padded input and gradient).
template <class S>
DeviceMatrix<S> upload_padded(const Matrix<S>& X, Index extra) {
  DeviceMatrix<S> p(X.rows(), X.cols() + extra);
  poison(p.view());
  upload<S>(X, p.view().col_block(0, X.cols()));
  return p;
}

/// A device-generic test body's moves: on<D>(M) puts a host matrix where lora::D's functions
/// take it (the matrix itself on the CPU, a DeviceMatrix on the GPU); host(x) brings a result
/// back as a float64 matrix.
template <class Device>
struct device_io;
template <>
struct device_io<cpu> {
  template <class S>
  static Matrix<S> put(const Matrix<S>& m) {
    return m;
  }
};
template <>
struct device_io<cuda> {
  template <class S>
  static DeviceMatrix<S> put(const Matrix<S>& m) {
    return DeviceMatrix<S>::from_host(m);
  }
};
template <class Device, class S>
auto on(const Matrix<S>& m) {
  return device_io<Device>::put(m);
}
template <class E>
MatD host(const Eigen::MatrixBase<E>& m) {
  return m.template cast<double>();
}
template <class S>
MatD host(const DeviceMatrix<S>& m) {
  return m.to_host().template cast<double>();
}
/// A [n] vector as an [n × 1] matrix (DoRA's magnitude gradient is a Vector on the CPU, a
/// [out × 1] DeviceMatrix on the GPU).
inline MatD column(const MatD& m) {
  return m.cols() == 1 ? m : MatD(m.transpose());
}

}  // namespace lora::test
