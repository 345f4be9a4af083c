#pragma once
// lora on NVIDIA GPUs: the host-only set (lora/lora.hpp) plus the device
// specialisations. Compile with nvcc (the kernels live in .cuh files) and link
// the lora::cuda CMake target (cudart, cuBLAS, cuSOLVER).

// fmt's compile-time format checks do not survive nvcc's host pass; the
// lora::cuda target defines these too (they must precede the first fmt include).
#if defined(__NVCC__) && !defined(FMT_USE_CONSTEXPR)
#define FMT_USE_CONSTEXPR 1
#define FMT_CONSTEVAL
#endif

#include <lora/lora.hpp>

#include <lora/cuda/runtime.hpp>
#include <lora/cuda/kernels.cuh>
#include <lora/cuda/adapter.cuh>
#include <lora/cuda/dora.cuh>
#include <lora/cuda/module_adapter.cuh>
#include <lora/cuda/nf4.cuh>
#include <lora/cuda/ring.cuh>
#include <lora/cuda/qlora.cuh>
#include <lora/cuda/spectrum.cuh>
#include <lora/cuda/multi.cuh>
