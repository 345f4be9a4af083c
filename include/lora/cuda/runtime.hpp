#pragma once
// Device plumbing: lora::cuda (the device tag), lora::cuda_error, RAII device
// storage, streams, cuBLAS/cuSOLVER handles and a row-major GEMM wrapper.
// Needs the CUDA toolkit headers; kernels live in the .cuh files beside this.

#include <lora/core/types.hpp>
#include <lora/error.hpp>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora {

/// The CUDA device tag: `LowRankAdapter<bfloat16, lora::cuda>` keeps its
/// factors in device memory and runs through cuBLAS and our kernels.
struct cuda {
  static constexpr const char* name = "cuda";
};

/// A failed CUDA runtime, cuBLAS or cuSOLVER call. what() names the call and
/// the code ("cublasGemmEx(...) failed: CUBLAS_STATUS_INVALID_VALUE (7)").
class cuda_error : public error {
 public:
  cuda_error(std::string call, int code, const std::string& code_name)
      : error(fmt::format("{} failed: {} ({})", call, code_name, code)), call_(std::move(call)), code_(code) {}
  const std::string& call() const { return call_; }
  int code() const { return code_; }

 private:
  std::string call_;
  int code_;
};

namespace detail {
inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}
inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "CUSOLVER_STATUS_UNKNOWN";
  }
}
inline void check(cudaError_t e, const char* call) {
  if (e != cudaSuccess) throw cuda_error(call, static_cast<int>(e), cudaGetErrorName(e));
}
inline void check(cublasStatus_t e, const char* call) {
  if (e != CUBLAS_STATUS_SUCCESS) throw cuda_error(call, static_cast<int>(e), cublas_status_name(e));
}
inline void check(cusolverStatus_t e, const char* call) {
  if (e != CUSOLVER_STATUS_SUCCESS) throw cuda_error(call, static_cast<int>(e), cusolver_status_name(e));
}
}  // namespace detail

/// Checks a CUDA runtime / cuBLAS / cuSOLVER call; throws lora::cuda_error naming it.
#define LORA_CUDA_CHECK(expr) ::lora::detail::check((expr), #expr)
/// Checks the last kernel launch.
#define LORA_CUDA_CHECK_LAUNCH(what) ::lora::detail::check(cudaGetLastError(), what)

namespace detail {
/// The CUDA type a host storage scalar is bit-identical to (Eigen::bfloat16 ↔ __nv_bfloat16):
/// scalar_traits<S>::device_type (core/types.hpp); other element types (codes, indices) map to themselves.
template <class S>
struct device_type_of : std::type_identity<S> {};
template <class S>
  requires is_supported_scalar_v<S>
struct device_type_of<S> : std::type_identity<typename scalar_traits<S>::device_type> {};
template <class S>
using device_t = typename device_type_of<S>::type;

template <class S>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<S, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<S, double>)
    return CUDA_R_64F;
  else if constexpr (std::is_same_v<S, bfloat16> || std::is_same_v<S, __nv_bfloat16>)
    return CUDA_R_16BF;
  else
    return CUDA_R_16F;
}

/// After a cudaMemcpy[2D] from pageable host memory: that call returns once the host data is
/// staged, not once it is on the device, and the (legacy or per-thread) default stream it ran on
/// does not order the non-blocking streams our kernels run on. Waiting for that stream makes the
/// upload visible to a kernel launched next on any stream.
inline void wait_for_upload() { LORA_CUDA_CHECK(cudaStreamSynchronize(nullptr)); }
}  // namespace detail

/// Owning device memory for n elements of T (cudaMalloc / cudaFree), move-only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n_ > 0) LORA_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n_ * sizeof(T)));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  void reset() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// A non-owning row-major [rows × cols] window into device memory with leading
/// dimension ld ≥ cols (elements between row starts), like a strided torch view.
template <class S>
struct DeviceView {
  S* data = nullptr;
  Index rows = 0, cols = 0, ld = 0;

  /// Columns [c0, c0 + n) of every row.
  DeviceView col_block(Index c0, Index n) const { return {data + c0, rows, n, ld}; }
  /// Rows [r0, r0 + n).
  DeviceView row_block(Index r0, Index n) const { return {data + r0 * ld, n, cols, ld}; }
  template <class U = S, std::enable_if_t<!std::is_const_v<U>, int> = 0>
  operator DeviceView<const U>() const {
    return {data, rows, cols, ld};
  }
  bool contiguous() const { return ld == cols; }
};

/// Owning row-major device matrix of a storage scalar S (float, bfloat16, half, ...).
template <class S>
class DeviceMatrix {
 public:
  DeviceMatrix() = default;
  DeviceMatrix(Index rows, Index cols)
      : rows_(rows), cols_(cols), buf_(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols)) {}

  /// Copies a host matrix to the device (complete on return: any stream may read it).
  static DeviceMatrix from_host(const MatrixRef<S>& m) {
    DeviceMatrix d(m.rows(), m.cols());
    d.upload(m);
    return d;
  }
  void upload(const MatrixRef<S>& m) {
    if (m.rows() != rows_ || m.cols() != cols_)
      detail::fail("DeviceMatrix::upload: host matrix is [{} x {}], expected [{} x {}]", m.rows(), m.cols(), rows_,
                   cols_);
    if (size() == 0) return;
    LORA_CUDA_CHECK(cudaMemcpy2D(buf_.data(), cols_ * sizeof(S), m.data(), m.outerStride() * sizeof(S),
                                 cols_ * sizeof(S), rows_, cudaMemcpyHostToDevice));
    detail::wait_for_upload();
  }
  /// Copies to a host matrix (synchronises the device first).
  Matrix<S> to_host() const {
    Matrix<S> m(rows_, cols_);
    if (size() == 0) return m;
    LORA_CUDA_CHECK(cudaDeviceSynchronize());
    LORA_CUDA_CHECK(cudaMemcpy(m.data(), buf_.data(), size() * sizeof(S), cudaMemcpyDeviceToHost));
    return m;
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  std::size_t size() const { return buf_.size(); }
  S* data() { return buf_.data(); }
  const S* data() const { return buf_.data(); }
  DeviceView<S> view() { return {data(), rows_, cols_, cols_}; }
  DeviceView<const S> view() const { return {data(), rows_, cols_, cols_}; }
  operator DeviceView<S>() { return view(); }
  operator DeviceView<const S>() const { return view(); }

 private:
  Index rows_ = 0, cols_ = 0;
  DeviceBuffer<S> buf_;
};

/// Copies a (possibly strided) device view to a host matrix.
template <class S>
Matrix<std::remove_const_t<S>> to_host(DeviceView<S> v) {
  Matrix<std::remove_const_t<S>> m(v.rows, v.cols);
  if (v.rows == 0 || v.cols == 0) return m;
  LORA_CUDA_CHECK(cudaDeviceSynchronize());
  LORA_CUDA_CHECK(cudaMemcpy2D(m.data(), v.cols * sizeof(S), v.data, v.ld * sizeof(S), v.cols * sizeof(S), v.rows,
                               cudaMemcpyDeviceToHost));
  return m;
}
/// Copies a host matrix into a (possibly strided) device view of the same shape.
template <class S>
void upload(const MatrixRef<S>& m, DeviceView<S> v) {
  if (m.rows() != v.rows || m.cols() != v.cols)
    detail::fail("lora::upload: host matrix is [{} x {}], device view is [{} x {}]", m.rows(), m.cols(), v.rows,
                 v.cols);
  if (v.rows == 0 || v.cols == 0) return;
  LORA_CUDA_CHECK(cudaMemcpy2D(v.data, v.ld * sizeof(S), m.data(), m.outerStride() * sizeof(S), v.cols * sizeof(S),
                               v.rows, cudaMemcpyHostToDevice));
  detail::wait_for_upload();
}

/// RAII CUDA stream (non-blocking).
class Stream {
 public:
  Stream() { LORA_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void synchronize() const { LORA_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

namespace detail {
class Planner;
}

/// The stream, cuBLAS handle (tensor cores, float accumulation) and cuSOLVER
/// handle (created on first use) that device operations run on, the GEMM workspace
/// cuBLAS and cuBLASLt share, and the planner (plan.hpp) that keeps the choices made
/// for the fused adapter GEMMs of this context, keyed by shape. Queue work on one
/// context from one host thread at a time (its scratch is reused in stream order).
class CudaContext {
 public:
  CudaContext() {
    LORA_CUDA_CHECK(cublasCreate(&blas_));
    LORA_CUDA_CHECK(cublasSetStream(blas_, stream_.get()));
    LORA_CUDA_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
    // cuBLAS's own workspace, set explicitly so that it never allocates while a CUDA graph
    // is captured on this stream (cublasSetStream resets it, so it comes after).
    LORA_CUDA_CHECK(cudaMalloc(&workspace_, lt_workspace_bytes));
    LORA_CUDA_CHECK(cublasSetWorkspace(blas_, workspace_, lt_workspace_bytes));
  }
  ~CudaContext() {
    planner_.reset();
    if (workspace_) cudaFree(workspace_);
    if (lt_) cublasLtDestroy(lt_);
    if (solver_) cusolverDnDestroy(solver_);
    if (blas_) cublasDestroy(blas_);
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  cudaStream_t stream() const { return stream_.get(); }
  cublasHandle_t blas() const { return blas_; }
  cusolverDnHandle_t solver() {
    if (!solver_) {
      LORA_CUDA_CHECK(cusolverDnCreate(&solver_));
      LORA_CUDA_CHECK(cusolverDnSetStream(solver_, stream_.get()));
    }
    return solver_;
  }
  void synchronize() const { stream_.synchronize(); }
  /// cuBLASLt handle (created on first use) and its workspace (lt_workspace_bytes of device
  /// memory, the one cuBLAS uses too; stream-ordered like everything on this context).
  cublasLtHandle_t lt() const {
    if (!lt_) LORA_CUDA_CHECK(cublasLtCreate(&lt_));
    return lt_;
  }
  static constexpr std::size_t lt_workspace_bytes = std::size_t{32} << 20;
  void* lt_workspace() const { return workspace_; }
  /// The choices made for this context's fused GEMM shapes and the scratch they use
  /// (detail::Planner, lora/cuda/plan.hpp, which defines this function).
  detail::Planner& planner() const;

  /// One context per host thread, on the current device.
  static std::shared_ptr<CudaContext> thread_default() {
    thread_local std::shared_ptr<CudaContext> ctx = std::make_shared<CudaContext>();
    return ctx;
  }

 private:
  Stream stream_;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  mutable cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  mutable std::once_flag planner_once_;
  mutable std::shared_ptr<detail::Planner> planner_;  // shared_ptr: Planner is incomplete here
};

namespace detail {
/// Row-major C = alpha·op(A)·op(B) + beta·C through cublasGemmEx with float
/// accumulation (CUBLAS_COMPUTE_32F; bf16/half use tensor cores; float stays
/// IEEE float). C may be float while A and B are 16-bit.
template <class SA, class SB, class SC>
void gemm(const CudaContext& ctx, bool transA, bool transB, Index M, Index N, Index K, float alpha,
          DeviceView<const SA> A, DeviceView<const SB> B, float beta, DeviceView<SC> C) {
  static_assert(std::is_same_v<SA, SB>, "gemm: A and B must have the same scalar type");
  if (M == 0 || N == 0) return;
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ over the same buffers.
  LORA_CUDA_CHECK(cublasGemmEx(ctx.blas(), transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                               static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B.data,
                               cuda_data_type<SB>(), static_cast<int>(B.ld), A.data, cuda_data_type<SA>(),
                               static_cast<int>(A.ld), &beta, C.data, cuda_data_type<SC>(), static_cast<int>(C.ld),
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/// A stream-ordered temporary matrix (cudaMallocAsync / cudaFreeAsync on one stream: no
/// synchronisation), for operands that live only as long as the products that read them (the
/// dequantised NF4 weight of a product or a backward).
template <class T>
class StreamMatrix {
 public:
  StreamMatrix(Index rows, Index cols, cudaStream_t stream) : rows_(rows), cols_(cols), stream_(stream) {
    if (rows * cols > 0)
      LORA_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&p_), static_cast<std::size_t>(rows * cols) * sizeof(T),
                                      stream));
  }
  ~StreamMatrix() {
    if (p_) cudaFreeAsync(p_, stream_);
  }
  StreamMatrix(StreamMatrix&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), rows_(o.rows_), cols_(o.cols_), stream_(o.stream_) {}
  StreamMatrix(const StreamMatrix&) = delete;
  StreamMatrix& operator=(const StreamMatrix&) = delete;
  T* data() { return p_; }
  DeviceView<T> view() { return {p_, rows_, cols_, cols_}; }

 private:
  T* p_ = nullptr;
  Index rows_, cols_;
  cudaStream_t stream_;
};

/// Fails with "<who><what> has shape [rows x cols], expected [want_rows x want_cols]" unless ok.
inline void require(bool ok, const std::string& who, const char* what, Index rows, Index cols, Index want_rows,
                    Index want_cols) {
  if (!ok) fail("{}{} has shape [{} x {}], expected [{} x {}]", who, what, rows, cols, want_rows, want_cols);
}
}  // namespace detail

}  // namespace lora
