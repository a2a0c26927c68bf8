// SiLU(x) = x · sigmoid(x), element-wise. y may alias x.
// Backward: dx = dy · s · (1 + x (1 − s)), s = sigmoid(x) (written).
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void SiluForward(const Tensor& x, Tensor& y);
void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx);

namespace cuda {
// f32 or bf16 CUDA tensors (one dtype), f32 math (ops/cuda/silu.cu).
void SiluForward(const Tensor& x, Tensor& y, CudaStream stream = nullptr);
void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
