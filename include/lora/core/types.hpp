#pragma once
// Device tags, matrix aliases and storage scalars shared by every header.

#include <Eigen/Core>

#include <cstdint>
#include <type_traits>

namespace lora {

/// Device tags pick the backend of the same operation, as thrust::host and
/// thrust::device do. `cpu` runs on Eigen; `cuda` is defined in lora/cuda.hpp.
struct cpu {
  static constexpr const char* name = "cpu";
};
struct cuda;

using Index = Eigen::Index;

/// Row-major, like torch tensors and safetensors files: a [rows x cols] tensor
/// maps onto a Matrix without a copy. Tokens are rows.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
template <class Scalar>
using MatrixRef = Eigen::Ref<const Matrix<Scalar>>;
template <class Scalar>
using MatrixMap = Eigen::Map<Matrix<Scalar>>;
template <class Scalar>
using ConstMatrixMap = Eigen::Map<const Matrix<Scalar>>;

using bfloat16 = Eigen::bfloat16;
using half = Eigen::half;

/// The type arithmetic is done in for a storage scalar: 16-bit floats are
/// stored as such and computed in float.
template <class Scalar>
struct compute_type {
  using type = Scalar;
};
template <>
struct compute_type<bfloat16> {
  using type = float;
};
template <>
struct compute_type<half> {
  using type = float;
};
template <class Scalar>
using compute_t = typename compute_type<Scalar>::type;

template <class Scalar>
inline constexpr bool is_supported_scalar_v =
    std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double> ||
    std::is_same_v<Scalar, bfloat16> || std::is_same_v<Scalar, half>;

}  // namespace lora
