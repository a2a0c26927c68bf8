// The CUDA runtime as Loom uses it. With LOOM_CUDA off these are stubs
// (runtime/no_cuda) that report "built without CUDA", so CPU code never
// needs an #ifdef.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/status.h"

namespace loom {

// A cudaStream_t seen from code that does not include CUDA headers; nullptr
// is the default stream. Kernel launchers take one as their last argument.
using CudaStream = void*;

bool BuiltWithCuda();
int CudaDeviceCount();  // 0 when built without CUDA or no GPU is visible
// Tensor memory: stream-ordered on the default stream, from the device's
// pool, which keeps freed blocks for reuse (docs/gpu.md).
void* CudaMalloc(size_t bytes, int device);
// Kernel scratch: stream-ordered on `stream`, from the current device's
// pool. Out of memory here and in CudaMalloc is a step too large for the
// GPU, not a bug: after one retry once the device has finished its queued
// frees, it prints the sizes and what lowers them (docs/metrics.md) and
// exits with status 3.
void* CudaAllocAsync(size_t bytes, CudaStream stream);
void CudaFree(void* ptr, int device);
// Bytes of the pool in use now, the most since the last reset, and a reset
// (peak := current).
int64_t CudaTensorBytes(int device);
int64_t PeakCudaTensorBytes(int device);
void ResetPeakCudaTensorBytes(int device);
// Device memory in use by anything (cudaMemGetInfo: total − free).
int64_t CudaDeviceUsedBytes(int device);
// The device's memory (cudaMemGetInfo's total); 0 when built without CUDA.
int64_t CudaDeviceTotalBytes(int device);
std::string CudaDeviceName(int device);
int CudaComputeCapability(int device);  // 90 for sm_90 (Hopper)
// Page-locked host memory (fast, async-capable copies; MPI staging buffers).
void* CudaHostAlloc(size_t bytes);
void CudaHostFree(void* ptr);
// Copies between host and device memory (either side may be the host).
void CudaMemcpy(void* dst, const void* src, size_t bytes);
// `height` rows of `width` bytes, row i from src + i·spitch to dst + i·dpitch,
// on the default stream after the work queued there (device memory).
void CudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height);
void CudaMemset(void* ptr, int value, size_t bytes);
void CudaSynchronize();

}  // namespace loom
