#pragma once
// LORA_HOST_DEVICE marks a function that the CUDA kernels share with the CPU path
// (__host__ __device__ under nvcc, nothing otherwise), so that both run one definition.

#if defined(__CUDACC__)
#define LORA_HOST_DEVICE __host__ __device__
#else
#define LORA_HOST_DEVICE
#endif
