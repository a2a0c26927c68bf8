// Stubs of runtime/cuda_runtime.h for the CPU-only build.
#include "runtime/cuda_runtime.h"

namespace loom {
namespace {
[[noreturn]] void NoCuda(const char* what) {
  LOOM_CHECK(false, "[cuda] ", what, ": Loom was built without CUDA (configure with -DLOOM_CUDA=ON)");
  std::abort();
}
}  // namespace

bool BuiltWithCuda() { return false; }
int CudaDeviceCount() { return 0; }
void* CudaMalloc(size_t, int) { NoCuda("CudaMalloc"); }
void* CudaAllocAsync(size_t, CudaStream) { NoCuda("CudaAllocAsync"); }
void CudaFree(void*, int) { NoCuda("CudaFree"); }
void* CudaHostAlloc(size_t) { NoCuda("CudaHostAlloc"); }
void CudaHostFree(void*) { NoCuda("CudaHostFree"); }
void CudaMemcpy(void*, const void*, size_t) { NoCuda("CudaMemcpy"); }
void CudaMemcpy2DAsync(void*, size_t, const void*, size_t, size_t, size_t) { NoCuda("CudaMemcpy2DAsync"); }
void CudaMemset(void*, int, size_t) { NoCuda("CudaMemset"); }
void CudaSynchronize() { NoCuda("CudaSynchronize"); }
int64_t CudaTensorBytes(int) { return 0; }
int64_t PeakCudaTensorBytes(int) { return 0; }
void ResetPeakCudaTensorBytes(int) {}
int64_t CudaDeviceUsedBytes(int) { return 0; }
int64_t CudaDeviceTotalBytes(int) { return 0; }
std::string CudaDeviceName(int) { NoCuda("CudaDeviceName"); }
int CudaComputeCapability(int) { NoCuda("CudaComputeCapability"); }

}  // namespace loom
