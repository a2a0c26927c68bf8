// CUDA element-wise accumulate acc += b (see ops/add.h): f32 += f32,
// bf16 += bf16 (the sum rounded once, from f32), and f32 += bf16 (a bf16
// gradient into an f32 accumulator).
#include "ops/add.h"
#include "ops/cuda/elementwise.cuh"

namespace loom::ops::cuda {
namespace {

template <typename A, typename B>
__global__ void AddKernel(A* acc, const B* b, int64_t n, bool vectorized) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t vecs = vectorized ? n / kVec : 0;
  for (int64_t v = tid; v < vecs; v += stride) {
    float a[kVec], x[kVec];
    LoadVec(acc + v * kVec, a);
    LoadVec(b + v * kVec, x);
#pragma unroll
    for (int e = 0; e < kVec; ++e) a[e] += x[e];
    StoreVec(acc + v * kVec, a);
  }
  for (int64_t i = vecs * kVec + tid; i < n; i += stride) acc[i] = FromF32<A>(ToF32(acc[i]) + ToF32(b[i]));
}

template <typename A, typename B>
void Launch(Tensor& acc, const Tensor& b, CudaStream stream) {
  A* pa = static_cast<A*>(acc.raw());
  const B* pb = static_cast<const B*>(b.raw());
  const bool vectorized = Aligned16(pa) && Aligned16(pb);
  const int64_t n = acc.numel();
  AddKernel<<<GridFor(vectorized ? (n + kVec - 1) / kVec : n), 256, 0, Native(stream)>>>(pa, pb, n, vectorized);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void AddInPlace(Tensor& acc, const Tensor& b, CudaStream stream) {
  NvtxRange range("AddInPlace");
  LOOM_CHECK(!acc.device().is_cpu() && b.device() == acc.device() && b.numel() == acc.numel(), "[add] CUDA: ",
             ShapeString(acc.shape()), " on ", acc.device().ToString(), " += ", ShapeString(b.shape()), " on ",
             b.device().ToString());
  const DType da = acc.dtype(), db = b.dtype();
  LOOM_CHECK((da == db && (da == DType::kF32 || da == DType::kBF16)) || (da == DType::kF32 && db == DType::kBF16),
             "[add] CUDA: ", DTypeName(da), " += ", DTypeName(db), " (f32 += f32, bf16 += bf16 or f32 += bf16)");
  if (acc.numel() == 0) return;
  LOOM_CUDA_CHECK(cudaSetDevice(acc.device().index));
  if (da == DType::kF32 && db == DType::kF32) {
    Launch<float, float>(acc, b, stream);
  } else if (da == DType::kF32) {
    Launch<float, nv_bf16>(acc, b, stream);
  } else {
    Launch<nv_bf16, nv_bf16>(acc, b, stream);
  }
}

}  // namespace loom::ops::cuda
