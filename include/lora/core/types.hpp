#pragma once
// Device tags, matrix aliases and storage scalars shared by every header.

#include <Eigen/Core>

#include <cstdint>
#include <type_traits>

// CUDA's 16-bit float types, named by scalar_traits<S>::device_type (only CUDA code uses them).
struct __nv_bfloat16;
struct __half;

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

/// What the library knows of a storage scalar: the one scalar trait, read by the CPU code,
/// the CUDA code and the file codecs alike. Defined for float, double, bfloat16 and half:
///   compute_type  what arithmetic runs in (16-bit floats are stored as such, computed in float)
///   device_type   the CUDA type with the same bits (__nv_bfloat16, __half; else itself)
///   name          torch's name of the dtype ("bfloat16")
///   on_cuda       whether the CUDA classes take it (double is host-only)
template <class Scalar>
struct scalar_traits;  // undefined: not a storage scalar
template <>
struct scalar_traits<float> {
  using compute_type = float;
  using device_type = float;
  static constexpr const char* name = "float32";
  static constexpr bool on_cuda = true;
};
template <>
struct scalar_traits<double> {
  using compute_type = double;
  using device_type = double;
  static constexpr const char* name = "float64";
  static constexpr bool on_cuda = false;
};
template <>
struct scalar_traits<bfloat16> {
  using compute_type = float;
  using device_type = ::__nv_bfloat16;  // declared above; complete where CUDA's headers are included
  static constexpr const char* name = "bfloat16";
  static constexpr bool on_cuda = true;
};
template <>
struct scalar_traits<half> {
  using compute_type = float;
  using device_type = ::__half;
  static constexpr const char* name = "float16";
  static constexpr bool on_cuda = true;
};

/// The type arithmetic is done in for a storage scalar.
template <class Scalar>
using compute_t = typename scalar_traits<Scalar>::compute_type;

/// float, double, bfloat16 or half.
template <class Scalar>
inline constexpr bool is_supported_scalar_v = requires { typename scalar_traits<Scalar>::compute_type; };

/// A scalar the CUDA classes take: float, bfloat16 or half.
template <class Scalar>
inline constexpr bool is_device_scalar_v = [] {
  if constexpr (is_supported_scalar_v<Scalar>)
    return scalar_traits<Scalar>::on_cuda;
  else
    return false;
}();

}  // namespace lora
