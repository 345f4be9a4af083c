#pragma once
// Helpers shared by the CUDA tests (cuda.cu, multi.cu): tolerances, random host matrices,
// and NaN poisoning of device outputs so that an element a kernel fails to write fails.

#include <lora/cuda/runtime.hpp>

#include "support/catch.hpp"
#if __has_include(<catch2/catch_template_test_macros.hpp>)
#include <catch2/catch_template_test_macros.hpp>  // Catch2 v3
#endif
#include "support/reference.hpp"

#include <type_traits>

namespace lora::test {

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

}  // namespace lora::test
