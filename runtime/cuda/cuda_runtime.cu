// runtime/cuda_runtime.h on the CUDA runtime API.
#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"

namespace loom {

bool BuiltWithCuda() { return true; }

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

void* CudaMalloc(size_t bytes, int device) {
  void* ptr = nullptr;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  LOOM_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  return ptr;
}

void CudaFree(void* ptr, int device) {
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  LOOM_CUDA_CHECK(cudaFree(ptr));
}

void* CudaHostAlloc(size_t bytes) {
  void* ptr = nullptr;
  LOOM_CUDA_CHECK(cudaMallocHost(&ptr, bytes));
  return ptr;
}

void CudaHostFree(void* ptr) { LOOM_CUDA_CHECK(cudaFreeHost(ptr)); }

void CudaMemcpy(void* dst, const void* src, size_t bytes) {
  LOOM_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

void CudaMemset(void* ptr, int value, size_t bytes) { LOOM_CUDA_CHECK(cudaMemset(ptr, value, bytes)); }

void CudaSynchronize() { LOOM_CUDA_CHECK(cudaDeviceSynchronize()); }

}  // namespace loom
