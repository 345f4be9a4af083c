#pragma once
// lora::Nf4Tensor — a frozen weight stored as NF4 codes with (optionally
// double-quantised) block scales, the storage of a QLoRA base layer.

#include <lora/core/types.hpp>
#include <lora/error.hpp>
#include <lora/quant/double_quant.hpp>
#include <lora/quant/nf4.hpp>

#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

/// How to quantise.
struct Nf4Options {
  std::int64_t blocksize = 64;  ///< elements per absmax: a power of two from 32 to 4096
  bool double_quant = false;    ///< compress the absmax values (bitsandbytes' compress_statistics)
};

/// The scalar type a weight had before quantisation (bitsandbytes records it
/// as the dequantisation dtype: "float32", "bfloat16" or "float16").
enum class source_dtype { float32, bfloat16, float16 };

inline const char* source_dtype_name(source_dtype d) {
  switch (d) {
    case source_dtype::float32: return "float32";
    case source_dtype::bfloat16: return "bfloat16";
    case source_dtype::float16: return "float16";
  }
  return "float32";
}

template <class S>
constexpr source_dtype source_dtype_of() {
  if constexpr (std::is_same_v<S, bfloat16>)
    return source_dtype::bfloat16;
  else if constexpr (std::is_same_v<S, half>)
    return source_dtype::float16;
  else
    return source_dtype::float32;
}

}  // namespace lora

namespace lora::quant {

/// An NF4-quantised tensor on a device; `Nf4Tensor<cpu>` (alias `lora::Nf4Tensor`) is
/// defined here, `Nf4Tensor<cuda>` in lora/cuda.hpp. Both have `from_host(Nf4Tensor<cpu>)`
/// and `to_host()`, so device-generic code quantises once on the host and moves the codes.
template <class Device = cpu>
class Nf4Tensor;

/// An NF4-quantised tensor (any shape, usually a [out × in] weight) in host memory,
/// bit-identical to bitsandbytes' quantize_4bit(quant_type="nf4").
///
///   auto Wq = lora::Nf4Tensor::quantize(W, {.blocksize = 64, .double_quant = true});
///   lora::Matrix<float> W2 = Wq.dequantize<float>();   // code · absmax, per element
///   double bits = Wq.bits_per_parameter();             // ≈ 4.127
template <>
class Nf4Tensor<cpu> {
 public:
  using device_type = cpu;

  Nf4Tensor() = default;

  /// The same tensor (a copy): the CPU side of the device-generic `Nf4Tensor<D>::from_host`.
  static Nf4Tensor from_host(const Nf4Tensor& host) { return host; }
  /// A copy in host memory, as `Nf4Tensor<cuda>::to_host()` gives.
  Nf4Tensor to_host() const { return *this; }

  /// Quantises a matrix (float, double, bfloat16 or half; double is rounded to
  /// float first, as bitsandbytes only takes 16/32-bit floats).
  template <class Derived>
  static Nf4Tensor quantize(const Eigen::MatrixBase<Derived>& W, Nf4Options opts = {}) {
    using S = typename Derived::Scalar;
    if constexpr (std::is_same_v<S, double>) {
      const Matrix<float> Wf = W.template cast<float>();
      return quantize_values(Wf.data(), {Wf.rows(), Wf.cols()}, opts, source_dtype::float32);
    } else {
      const Matrix<S> Wr = W;  // row-major, contiguous
      return quantize_values(Wr.data(), {Wr.rows(), Wr.cols()}, opts, source_dtype_of<S>());
    }
  }

  /// Quantises `numel(shape)` contiguous row-major values.
  template <class T>
  static Nf4Tensor quantize_values(const T* values, std::vector<std::int64_t> shape, Nf4Options opts = {},
                                   std::optional<source_dtype> dtype = std::nullopt) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, bfloat16> || std::is_same_v<T, half>,
                  "Nf4Tensor::quantize_values: values must be float, bfloat16 or half");
    detail::check_blocksize(opts.blocksize, "Nf4Tensor::quantize");
    Nf4Tensor t;
    t.shape_ = std::move(shape);
    t.numel_ = count(t.shape_);
    t.blocksize_ = opts.blocksize;
    t.dtype_ = dtype.value_or(source_dtype_of<T>());
    t.packed_.resize(static_cast<std::size_t>(quant::packed_bytes(t.numel_)));
    std::vector<float> absmax(static_cast<std::size_t>(quant::num_blocks(t.numel_, t.blocksize_)));
    quant::nf4_quantize(values, t.numel_, t.blocksize_, t.packed_.data(), absmax.data());
    t.set_scales(std::move(absmax), opts.double_quant);
    return t;
  }

  /// Adopts stored parts (e.g. read from a checkpoint) after checking their sizes.
  /// `absmax` are the float scales; pass `dq` instead for double-quantised ones.
  static Nf4Tensor from_parts(std::vector<std::int64_t> shape, std::int64_t blocksize, std::vector<std::uint8_t> packed,
                              std::vector<float> absmax, std::optional<quant::DoubleQuantState> dq,
                              source_dtype dtype = source_dtype::float32, const std::string& name = "nf4 tensor") {
    if (!quant::is_valid_blocksize(blocksize))
      lora::detail::fail("{}: blocksize must be a power of two from {} to {}, got {}", name, quant::nf4_min_blocksize,
                   quant::nf4_max_blocksize, blocksize);
    Nf4Tensor t;
    t.shape_ = std::move(shape);
    for (auto d : t.shape_)
      if (d < 0) lora::detail::fail("{}: negative dimension {} in shape", name, d);
    t.numel_ = count(t.shape_);
    t.blocksize_ = blocksize;
    t.dtype_ = dtype;
    const auto nb = quant::num_blocks(t.numel_, blocksize);
    if (static_cast<std::int64_t>(packed.size()) != quant::packed_bytes(t.numel_))
      lora::detail::fail("{}: {} packed bytes given, shape needs {} (two 4-bit codes per byte)", name, packed.size(),
                   quant::packed_bytes(t.numel_));
    t.packed_ = std::move(packed);
    if (dq) {
      if (static_cast<std::int64_t>(dq->codes.size()) != nb)
        lora::detail::fail("{}: {} quantised absmax codes given, expected {} (one per block of {})", name, dq->codes.size(),
                     nb, blocksize);
      const auto nnb = quant::num_blocks(nb, quant::nested_blocksize);
      if (static_cast<std::int64_t>(dq->nested_absmax.size()) != nnb)
        lora::detail::fail("{}: {} nested_absmax values given, expected {} (one per {} blocks)", name,
                     dq->nested_absmax.size(), nnb, quant::nested_blocksize);
      t.dq_ = std::move(*dq);
      t.absmax_ = t.dq_->restore();
    } else {
      if (static_cast<std::int64_t>(absmax.size()) != nb)
        lora::detail::fail("{}: {} absmax values given, expected {} (one per block of {})", name, absmax.size(), nb,
                     blocksize);
      t.absmax_ = std::move(absmax);
    }
    return t;
  }

  const std::vector<std::int64_t>& shape() const { return shape_; }
  std::int64_t numel() const { return numel_; }
  /// Rows and columns of a 2-D tensor (a 1-D tensor is [n × 1]).
  Index rows() const { return shape_.empty() ? 1 : static_cast<Index>(shape_[0]); }
  Index cols() const {
    if (shape_.size() < 2) return 1;
    return static_cast<Index>(numel_ / std::max<std::int64_t>(shape_[0], 1));
  }
  std::int64_t blocksize() const { return blocksize_; }
  bool double_quant() const { return dq_.has_value(); }
  source_dtype dtype() const { return dtype_; }
  void set_dtype(source_dtype d) { dtype_ = d; }

  /// Two codes per byte, first element in the high nibble; ceil(numel/2) bytes.
  const std::vector<std::uint8_t>& packed() const { return packed_; }
  /// The block scales as used by dequantisation (restored ones with double quantisation).
  const std::vector<float>& absmax() const { return absmax_; }
  /// The double-quantisation state, if any.
  const std::optional<quant::DoubleQuantState>& double_quant_state() const { return dq_; }

  /// The 4-bit code of flat element i.
  std::uint8_t code(std::int64_t i) const {
    const std::uint8_t b = packed_[static_cast<std::size_t>(i >> 1)];
    return (i & 1) ? (b & 0x0F) : (b >> 4);
  }

  /// Dequantises into `out` (numel values): nf4_code[c]·absmax in float32, then rounded to T.
  template <class T>
  void dequantize_into(T* out) const {
    quant::nf4_dequantize(packed_.data(), absmax_.data(), numel_, blocksize_, out);
  }
  /// Dequantises to a [rows × cols] matrix of float, bfloat16 or half (double: via float).
  template <class T = float>
  Matrix<T> dequantize() const {
    Matrix<T> m(rows(), cols());
    if constexpr (std::is_same_v<T, double>) {
      Matrix<float> f(rows(), cols());
      dequantize_into(f.data());
      m = f.cast<double>();
    } else {
      dequantize_into(m.data());
    }
    return m;
  }

  /// Bytes held: packed codes + scales (+ nested scales, map and offset).
  std::int64_t storage_bytes() const {
    std::int64_t b = static_cast<std::int64_t>(packed_.size());
    if (dq_)
      b += static_cast<std::int64_t>(dq_->codes.size() + 4 * dq_->nested_absmax.size() + 4 * 256 + 4);
    else
      b += static_cast<std::int64_t>(4 * absmax_.size());
    return b;
  }
  /// Nominal bits per parameter: 4 + 32/blocksize, or 4 + 8/blocksize + 32/(256·blocksize)
  /// with double quantisation (4.5 and ≈ 4.127 at blocksize 64).
  double bits_per_parameter() const { return quant::nf4_bits_per_parameter(blocksize_, double_quant()); }

  /// Replaces the contents by the quantisation of new values with the same options.
  template <class Derived>
  void requantize(const Eigen::MatrixBase<Derived>& W) {
    if (W.rows() != rows() || W.cols() != cols())
      lora::detail::fail("Nf4Tensor::requantize: new values have shape [{} x {}], expected [{} x {}]", W.rows(), W.cols(),
                   rows(), cols());
    const auto d = dtype_;
    auto shape = shape_;
    const Matrix<float> Wf = W.template cast<float>();
    *this = quantize_values(Wf.data(), std::move(shape), {blocksize_, double_quant()}, d);
  }

 private:
  static std::int64_t count(const std::vector<std::int64_t>& shape) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  void set_scales(std::vector<float> absmax, bool dq) {
    if (dq) {
      dq_ = quant::double_quantize(absmax.data(), static_cast<std::int64_t>(absmax.size()));
      absmax_ = dq_->restore();
    } else {
      dq_.reset();
      absmax_ = std::move(absmax);
    }
  }

  std::vector<std::int64_t> shape_;
  std::int64_t numel_ = 0;
  std::int64_t blocksize_ = 64;
  source_dtype dtype_ = source_dtype::float32;
  std::vector<std::uint8_t> packed_;
  std::vector<float> absmax_;
  std::optional<quant::DoubleQuantState> dq_;
};

}  // namespace lora::quant

namespace lora {
/// The host NF4 tensor, `quant::Nf4Tensor<cpu>`.
using Nf4Tensor = quant::Nf4Tensor<cpu>;
}  // namespace lora
