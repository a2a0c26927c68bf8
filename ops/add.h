// Element-wise accumulate: acc += b (the residual stream and its gradient).
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void AddInPlace(Tensor& acc, const Tensor& b);

namespace cuda {
// CUDA tensors: f32 += f32, bf16 += bf16, or f32 += bf16 (ops/cuda/add.cu).
void AddInPlace(Tensor& acc, const Tensor& b, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
