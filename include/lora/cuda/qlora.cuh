#pragma once
// QLoraLinear<S, lora::cuda>: a frozen NF4 base weight (quant::Nf4Tensor<cuda>) and a LoRA
// adapter (LowRankAdapter<S, cuda>) on the GPU, with the member functions of
// QLoraLinear<float, cpu> (lora/quant/qlora.hpp).

#include <lora/cuda/adapter.cuh>
#include <lora/cuda/nf4.cuh>
#include <lora/quant/qlora.hpp>

#include <memory>

namespace lora {

/// A QLoRA linear layer on an NVIDIA GPU: Y = X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ with activations and
/// adapter factors in S (bfloat16, half or float; arithmetic in float). As with
/// LowRankAdapter<S, cuda>, each product has a form that writes a caller's buffer and one
/// that returns a new DeviceMatrix. The base product takes the fused NF4 kernels for up to
/// 16 tokens (codes rounded to S, as bitsandbytes' 4-bit inference kernel does) and
/// dequantise + cuBLAS above; backward dequantises W too, into a stream-ordered temporary
/// (cudaMallocAsync: no synchronisation, and no dense copy of W kept). At decode sizes
/// forward() is one pass over W (NF4 product and low-rank term; see forward). The CPU
/// layer's int8 `fast` mode has no device counterpart. One layer is not for concurrent use
/// from several host threads (its scratch buffers).
///
///   auto layer = lora::QLoraLinear<lora::bfloat16, lora::cuda>::from_host(host_layer);
///   auto Y = layer.forward(X);          // X [T × in] on the device
///   auto g = layer.backward(X, dY);     // g.dA, g.dB (float), g.dX
template <class Scalar, ScalingPolicy Scaling>
class QLoraLinear<Scalar, cuda, Scaling> {
  static_assert(is_device_scalar_v<Scalar>, "QLoraLinear<S, cuda>: S must be float, bfloat16 or half");

 public:
  using scalar_type = Scalar;
  using device_type = cuda;
  using scaling_policy = Scaling;
  using adapter_type = LowRankAdapter<Scalar, cuda, Scaling>;
  using base_type = quant::Nf4Tensor<cuda>;
  using host_type = QLoraLinear<float, cpu, Scaling>;
  using view = DeviceView<Scalar>;
  using cview = DeviceView<const Scalar>;

  /// Adopts an NF4 base [out × in] and an adapter of that shape on the same context.
  QLoraLinear(base_type base, adapter_type adapter) : W_(std::move(base)), adapter_(std::move(adapter)) {
    if (W_.shape().size() != 2)
      detail::fail("QLoraLinear<cuda>: NF4 base weight must be 2-D [out x in], got {} dimensions", W_.shape().size());
    if (adapter_.fan_in_fan_out()) detail::fail("QLoraLinear<cuda>: fan_in_fan_out adapters are not supported");
    if (W_.rows() != adapter_.out_features() || W_.cols() != adapter_.in_features())
      detail::fail("QLoraLinear<cuda>: NF4 base weight has shape [{} x {}], adapter expects [out x in] = [{} x {}]",
                   W_.rows(), W_.cols(), adapter_.out_features(), adapter_.in_features());
    if (&W_.context() != &adapter_.context())
      detail::fail("QLoraLinear<cuda>: the NF4 base and the adapter are on different CUDA contexts");
  }
  /// Copies a host layer to the device: the NF4 codes as they are, the float factors rounded to S.
  static QLoraLinear from_host(const host_type& h, std::shared_ptr<CudaContext> ctx = {}) {
    if (!ctx) ctx = CudaContext::thread_default();
    return QLoraLinear(base_type::from_host(h.base(), ctx),
                       adapter_type::from_host(detail::with_scalar<Scalar>(h.adapter()), ctx));
  }
  /// The host layer (float factors; synchronises).
  host_type to_host() const {
    return host_type(W_.to_host(), detail::with_scalar<float>(adapter_.to_host()));
  }

  const base_type& base() const { return W_; }
  const adapter_type& adapter() const { return adapter_; }
  adapter_type& adapter() { return adapter_; }
  Index in_features() const { return W_.cols(); }
  Index out_features() const { return W_.rows(); }
  CudaContext& context() const { return adapter_.context(); }

  /// X·dequant(W)ᵀ for X [T × in] into Y [T × out].
  void base_forward(cview X, view Y) const {
    const Index T = X.rows, out = out_features(), in = in_features();
    if (X.cols != in) detail::fail("QLoraLinear<cuda>: input has {} columns, expected in_features = {}", X.cols, in);
    detail::require(Y.rows == T && Y.cols == out, "QLoraLinear<cuda>: ", "output Y", Y.rows, Y.cols, T, out);
    constexpr long V = 16 / sizeof(Scalar);
    if (T >= 1 && T <= 16 && in % 32 == 0 && X.ld % V == 0 && detail::aligned16<Scalar>(X.data))
      return detail::nf4_gemm<Scalar>(W_.parts(), X, Y, context());
    if (T == 0 || out == 0) return;
    auto D = dequantized();
    detail::gemm<Scalar, Scalar, Scalar>(context(), false, true, T, out, in, 1.f, X, cview(D.view()), 0.f, Y);
  }
  DeviceMatrix<Scalar> base_forward(cview X) const {
    DeviceMatrix<Scalar> y(X.rows, out_features());
    base_forward(X, y.view());
    return y;
  }

  /// Y = X·dequant(W)ᵀ + s·(X·Aᵀ)·Bᵀ (evaluation mode) into Y [T × out]. For 1…16 bf16/half
  /// tokens, blocksize 64, in % 256 == 0, in ≤ 4096, r % 16 == 0 and r ≤ in / 16 (r ≤ 256): one
  /// pass over W (detail::nf4_gemm_lora: s·X·Aᵀ rounded to S, by every block of the NF4 kernel
  /// for r = 16 and by a small kernel before it for more ranks, then the NF4 kernel adds its
  /// product with B in its epilogue, Y rounded once); otherwise the NF4 product, then s·X·Aᵀ,
  /// then a GEMM with β = 1.
  void forward(cview X, view Y) const {
    if constexpr (!std::is_same_v<Scalar, float>) {
      using D = detail::device_t<Scalar>;
      const Index T = X.rows, r = adapter_.rank();
      if (T >= 1 && T <= 16 && r % 16 == 0 && r / 16 <= detail::nf4_lora_max_jobs) {
        const std::size_t n = static_cast<std::size_t>(r / 16) * 256;
        if (xa_.size() < n) xa_ = DeviceBuffer<Scalar>(n);
        const cview A = adapter_.A(), B = adapter_.B();
        detail::Nf4RingLora<D> l;
        l.jobs = static_cast<int>(r / 16);
        l.xa = reinterpret_cast<D*>(xa_.data());
        for (int p = 0; p < l.jobs; ++p)
          l.job[p] = {reinterpret_cast<const D*>(A.data) + 16L * p * A.ld, A.ld,
                      reinterpret_cast<const D*>(B.data) + 16L * p, B.ld, 16,
                      static_cast<float>(adapter_.scaling()), (1u << T) - 1u};
        if (detail::nf4_gemm_lora<Scalar>(W_.parts(), X, Y, l, context())) return;
      }
    }
    base_forward(X, Y);
    const Index T = X.rows, r = adapter_.rank();
    if (T == 0) return;
    const std::size_t n = static_cast<std::size_t>(T * r);
    if (xa_.size() < n) xa_ = DeviceBuffer<Scalar>(n);
    const view xa{xa_.data(), T, r, r};
    detail::compute_xa<Scalar>(context(), X, adapter_.A(), false, xa, static_cast<float>(adapter_.scaling()));
    detail::gemm<Scalar, Scalar, Scalar>(context(), false, true, T, out_features(), r, 1.f, cview(xa), adapter_.B(),
                                         1.f, Y);
  }
  DeviceMatrix<Scalar> forward(cview X) const {
    DeviceMatrix<Scalar> y(X.rows, out_features());
    forward(X, y.view());
    return y;
  }

  /// Gradients for dY = ∂L/∂Y with W frozen: dB = s·dYᵀ·(X·Aᵀ), dA = s·(dY·B)ᵀ·X (float),
  /// dX = dY·dequant(W) + s·(dY·B)·A: LowRankAdapter<S, cuda>::backward on the dequantised W.
  DeviceGradients<Scalar> backward(cview X, cview dY) const {
    detail::require(dY.rows == X.rows && dY.cols == out_features(), "QLoraLinear<cuda>::backward: ", "dY", dY.rows,
                    dY.cols, X.rows, out_features());
    auto D = dequantized();
    return adapter_.backward(cview(D.view()), X, dY);
  }

  /// Merges the adapter into the NF4 base (dequantise, add, requantise, as
  /// QLoraLinear<float, cpu>::merge on the host copy, so the codes are the CPU's), then zeroes
  /// B so forward() stays (approximately) the same. Returns the added error. Synchronises.
  Nf4MergeReport merge() {
    host_type h = to_host();
    const Nf4MergeReport rep = h.merge();
    W_ = base_type::from_host(h.base(), W_.context_ptr());
    LORA_CUDA_CHECK(cudaMemsetAsync(adapter_.B().data, 0, static_cast<std::size_t>(out_features() * adapter_.rank()) *
                                                              sizeof(Scalar), context().stream()));
    return rep;
  }

 private:
  /// dequant(W) [out × in] in S, in a stream-ordered temporary.
  detail::StreamMatrix<Scalar> dequantized() const {
    detail::StreamMatrix<Scalar> D(out_features(), in_features(), context().stream());
    W_.dequantize_into(D.data());
    return D;
  }

  base_type W_;
  adapter_type adapter_;
  mutable DeviceBuffer<Scalar> xa_;
};

}  // namespace lora
