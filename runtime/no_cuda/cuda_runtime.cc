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
void CudaFree(void*, int) { NoCuda("CudaFree"); }
void* CudaHostAlloc(size_t) { NoCuda("CudaHostAlloc"); }
void CudaHostFree(void*) { NoCuda("CudaHostFree"); }
void CudaMemcpy(void*, const void*, size_t) { NoCuda("CudaMemcpy"); }
void CudaMemset(void*, int, size_t) { NoCuda("CudaMemset"); }
void CudaSynchronize() { NoCuda("CudaSynchronize"); }

}  // namespace loom
