// The CUDA runtime as Loom uses it. With LOOM_CUDA off these are stubs
// (runtime/no_cuda) that report "built without CUDA", so CPU code never
// needs an #ifdef.
#pragma once

#include <cstddef>

#include "runtime/status.h"

namespace loom {

// A cudaStream_t seen from code that does not include CUDA headers; nullptr
// is the default stream. Kernel launchers take one as their last argument.
using CudaStream = void*;

bool BuiltWithCuda();
int CudaDeviceCount();  // 0 when built without CUDA or no GPU is visible
void* CudaMalloc(size_t bytes, int device);
void CudaFree(void* ptr, int device);
// Page-locked host memory (fast, async-capable copies; MPI staging buffers).
void* CudaHostAlloc(size_t bytes);
void CudaHostFree(void* ptr);
// Copies between host and device memory (either side may be the host).
void CudaMemcpy(void* dst, const void* src, size_t bytes);
void CudaMemset(void* ptr, int value, size_t bytes);
void CudaSynchronize();

}  // namespace loom
