// CUDA dtype conversion (see ops/convert.h): f32 → bf16 with round to
// nearest even (__float2bfloat16_rn), bf16 → f32 exactly.
#include <cuda_bf16.h>

#include <algorithm>

#include "ops/convert.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

template <typename From, typename To>
__device__ To Cast(From x);
template <> __device__ __nv_bfloat16 Cast(float x) { return __float2bfloat16_rn(x); }
template <> __device__ float Cast(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename From, typename To>
__global__ void ConvertKernel(const From* src, To* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = Cast<From, To>(src[i]);
}

}  // namespace

void Convert(const Tensor& src, Tensor& dst, CudaStream stream) {
  LOOM_CHECK(src.numel() == dst.numel() && !src.device().is_cpu() && src.device() == dst.device(), "[convert] ",
             ShapeString(src.shape()), " into ", ShapeString(dst.shape()), ": one CUDA device, same size");
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.dtype() == dst.dtype()) {
    LOOM_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), dst.nbytes(), cudaMemcpyDeviceToDevice,
                                    static_cast<cudaStream_t>(stream)));
    return;
  }
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  auto s = static_cast<cudaStream_t>(stream);
  if (src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16) {
    ConvertKernel<float, __nv_bfloat16><<<blocks, threads, 0, s>>>(
        static_cast<const float*>(src.raw()), static_cast<__nv_bfloat16*>(dst.raw()), n);
  } else if (src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32) {
    ConvertKernel<__nv_bfloat16, float><<<blocks, threads, 0, s>>>(
        static_cast<const __nv_bfloat16*>(src.raw()), static_cast<float*>(dst.raw()), n);
  } else {
    LOOM_CHECK(false, "[convert] ", DTypeName(src.dtype()), " → ", DTypeName(dst.dtype()), " on the GPU");
  }
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
