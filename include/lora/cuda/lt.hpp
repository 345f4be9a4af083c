#pragma once
// One row-major GEMM shape through cuBLASLt with the heuristic's candidate algorithms,
// so that a caller can time them once and keep the fastest (the fused forward does:
// see FusedWeight in adapter.cuh and docs/cuda.md). cublasGemmEx runs the heuristic's
// first choice, which is not always the fastest for the fused shapes (docs/performance.md).

#include <lora/cuda/runtime.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace lora::detail {

/// The largest power of two (at most 256) that divides the address.
inline unsigned pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  unsigned al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

/// Row-major C [M × N] = op(A)·op(B) (float accumulation, alpha 1, beta 0) for the leading
/// dimensions and pointer alignments of the operands it was planned with: cuBLASLt's
/// descriptors and up to max_candidates algorithms from its heuristic, best-ranked first.
class LtGemm {
 public:
  static constexpr int max_candidates = 8;

  template <class S, class SC>
  LtGemm(const CudaContext& ctx, bool transA, bool transB, Index M, Index N, Index K, DeviceView<const S> A,
         DeviceView<const S> B, DeviceView<SC> C)
      : M_(M), N_(N), K_(K), lda_(A.ld), ldb_(B.ld), ldc_(C.ld), transA_(transA), transB_(transB) {
    // As in detail::gemm: row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ.
    LORA_CUDA_CHECK(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = transB ? CUBLAS_OP_T : CUBLAS_OP_N, tb = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    LORA_CUDA_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    LORA_CUDA_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    LORA_CUDA_CHECK(cublasLtMatrixLayoutCreate(&la_, cuda_data_type<S>(), transB ? K : N, transB ? N : K, B.ld));
    LORA_CUDA_CHECK(cublasLtMatrixLayoutCreate(&lb_, cuda_data_type<S>(), transA ? M : K, transA ? K : M, A.ld));
    LORA_CUDA_CHECK(cublasLtMatrixLayoutCreate(&lc_, cuda_data_type<SC>(), N, M, C.ld));
    align_a_ = pointer_alignment(B.data);
    align_b_ = pointer_alignment(A.data);
    align_c_ = pointer_alignment(C.data);
    cublasLtMatmulPreference_t pref = nullptr;
    LORA_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const std::size_t ws = CudaContext::lt_workspace_bytes;
    const std::uint32_t aa = align_a_, ab = align_b_, ac = align_c_;
    LORA_CUDA_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    LORA_CUDA_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
    LORA_CUDA_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab)));
    LORA_CUDA_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac)));
    LORA_CUDA_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof(ac)));
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(ctx.lt(), op_, la_, lb_, lc_, lc_, pref, max_candidates, results_, &n_);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS) n_ = 0;  // no candidate: callers keep cublasGemmEx
  }
  ~LtGemm() {
    if (la_) cublasLtMatrixLayoutDestroy(la_);
    if (lb_) cublasLtMatrixLayoutDestroy(lb_);
    if (lc_) cublasLtMatrixLayoutDestroy(lc_);
    if (op_) cublasLtMatmulDescDestroy(op_);
  }
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  int candidates() const { return n_; }

  /// True when these operands have the planned shape, leading dimensions and at least the
  /// planned pointer alignments.
  template <class S, class SC>
  bool fits(bool transA, bool transB, Index M, Index N, Index K, DeviceView<const S> A, DeviceView<const S> B,
            DeviceView<SC> C) const {
    return transA == transA_ && transB == transB_ && M == M_ && N == N_ && K == K_ && A.ld == lda_ && B.ld == ldb_ &&
           C.ld == ldc_ && pointer_alignment(B.data) >= align_a_ && pointer_alignment(A.data) >= align_b_ &&
           pointer_alignment(C.data) >= align_c_;
  }

  /// C = op(A)·op(B) with candidate i (0 ≤ i < candidates(); check fits() first).
  template <class S, class SC>
  void run(const CudaContext& ctx, int i, DeviceView<const S> A, DeviceView<const S> B, DeviceView<SC> C) const {
    const float one = 1.f, zero = 0.f;
    LORA_CUDA_CHECK(cublasLtMatmul(ctx.lt(), op_, &one, B.data, la_, A.data, lb_, &zero, C.data, lc_, C.data, lc_,
                                   &results_[i].algo, ctx.lt_workspace(), CudaContext::lt_workspace_bytes,
                                   ctx.stream()));
  }

 private:
  Index M_, N_, K_, lda_, ldb_, ldc_;
  bool transA_, transB_;
  unsigned align_a_ = 0, align_b_ = 0, align_c_ = 0;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t la_ = nullptr, lb_ = nullptr, lc_ = nullptr;
  cublasLtMatmulHeuristicResult_t results_[max_candidates] = {};
  int n_ = 0;
};

}  // namespace lora::detail
