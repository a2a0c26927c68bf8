// runtime/cuda_runtime.h on the CUDA runtime API.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <ios>
#include <mutex>
#include <string>

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

namespace {

constexpr int kMaxDevices = 64;

// The device's stream-ordered pool, made to keep what is freed (release
// threshold unlimited) the first time a tensor is allocated there: after
// the first step, a step's allocations are served from the pool without
// cudaMalloc's device-wide synchronisation.
cudaMemPool_t Pool(int device) {
  static std::once_flag once[kMaxDevices];
  LOOM_CHECK(device >= 0 && device < kMaxDevices, "[cuda] device ", device);
  cudaMemPool_t pool;
  LOOM_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  std::call_once(once[device], [&] {
    uint64_t keep = UINT64_MAX;
    LOOM_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  });
  return pool;
}

uint64_t PoolAttribute(int device, cudaMemPoolAttr attr) {
  uint64_t value = 0;
  LOOM_CUDA_CHECK(cudaMemPoolGetAttribute(Pool(device), attr, &value));
  return value;
}

struct MemInfo {
  size_t free = 0, total = 0;
};
MemInfo DeviceMemory(int device) {  // cudaMemGetInfo of `device`, made current
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  MemInfo m;
  LOOM_CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  return m;
}

std::string GiB(double bytes) { return internal::StreamCat(std::fixed, std::setprecision(2), bytes / (1 << 30), " GiB"); }

// `bytes` from the pool of `device` (the current device), stream-ordered on
// `stream` (runtime/cuda_runtime.h: out of memory is one line and exit 3).
void* AllocFromPool(size_t bytes, int device, cudaStream_t stream) {
  void* ptr = nullptr;
  cudaError_t err = cudaMallocFromPoolAsync(&ptr, bytes, Pool(device), stream);
  if (err == cudaErrorMemoryAllocation) {
    // Blocks freed on other streams may still be queued, and the pool may
    // hold free blocks too fragmented for this one: finish the queued work,
    // hand the pool's unused memory back, and try once more.
    cudaGetLastError();
    LOOM_CUDA_CHECK(cudaDeviceSynchronize());
    LOOM_CUDA_CHECK(cudaMemPoolTrimTo(Pool(device), 0));
    err = cudaMallocFromPoolAsync(&ptr, bytes, Pool(device), stream);
  }
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    const MemInfo m = DeviceMemory(device);
    std::fflush(stdout);
    std::fprintf(stderr,
                 "loom: out of GPU memory on device %d: %s asked for; Loom's tensors hold %s (peak %s), "
                 "and the device has %s free of %s. A shorter train.seq_len or train.micro_batch, "
                 "model.recompute, or more parallel.tp, cp or pp ranks need less; `loom-train --dry-run` plans a "
                 "rank's memory.\n",
                 device, GiB(bytes).c_str(), GiB(PoolAttribute(device, cudaMemPoolAttrUsedMemCurrent)).c_str(),
                 GiB(PoolAttribute(device, cudaMemPoolAttrUsedMemHigh)).c_str(), GiB(m.free).c_str(),
                 GiB(m.total).c_str());
    std::_Exit(3);
  }
  LOOM_CUDA_CHECK(err);
  return ptr;
}

}  // namespace

void* CudaAllocAsync(size_t bytes, CudaStream stream) {
  int device = 0;
  LOOM_CUDA_CHECK(cudaGetDevice(&device));
  return AllocFromPool(bytes, device, static_cast<cudaStream_t>(stream));
}

void* CudaMalloc(size_t bytes, int device) {
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  return AllocFromPool(bytes, device, /*stream=*/nullptr);
}

void CudaFree(void* ptr, int device) {
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  LOOM_CUDA_CHECK(cudaFreeAsync(ptr, /*stream=*/nullptr));
}

int64_t CudaTensorBytes(int device) {
  return static_cast<int64_t>(PoolAttribute(device, cudaMemPoolAttrUsedMemCurrent));
}

int64_t PeakCudaTensorBytes(int device) {
  return static_cast<int64_t>(PoolAttribute(device, cudaMemPoolAttrUsedMemHigh));
}

void ResetPeakCudaTensorBytes(int device) {
  uint64_t zero = 0;  // the pool resets the high-water mark to the current use
  LOOM_CUDA_CHECK(cudaMemPoolSetAttribute(Pool(device), cudaMemPoolAttrUsedMemHigh, &zero));
}

int64_t CudaDeviceUsedBytes(int device) {
  const MemInfo m = DeviceMemory(device);
  return static_cast<int64_t>(m.total - m.free);
}

int64_t CudaDeviceTotalBytes(int device) { return static_cast<int64_t>(DeviceMemory(device).total); }

std::string CudaDeviceName(int device) {
  cudaDeviceProp prop;
  LOOM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

int CudaComputeCapability(int device) {
  int major = 0, minor = 0;
  LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor;
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

void CudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height) {
  LOOM_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, nullptr));
}

void CudaMemset(void* ptr, int value, size_t bytes) { LOOM_CUDA_CHECK(cudaMemset(ptr, value, bytes)); }

void CudaSynchronize() { LOOM_CUDA_CHECK(cudaDeviceSynchronize()); }

}  // namespace loom
