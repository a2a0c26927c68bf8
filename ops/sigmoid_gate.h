// Output gate: y = x ⊙ sigmoid(g), element-wise.
// Backward: dx = dy ⊙ σ(g), dg = dy ⊙ x ⊙ σ(g)(1 − σ(g)) (written).
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void SigmoidGateForward(const Tensor& x, const Tensor& g, Tensor& y);
void SigmoidGateBackward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg);

namespace cuda {
// f32 or bf16 CUDA tensors (one dtype), f32 math (ops/cuda/sigmoid_gate.cu).
void SigmoidGateForward(const Tensor& x, const Tensor& g, Tensor& y, CudaStream stream = nullptr);
void SigmoidGateBackward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                         CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
