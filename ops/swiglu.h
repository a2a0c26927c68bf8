// SwiGLU activation: h = SiLU(gate) ⊙ up, element-wise over [N, F].
// Backward: dgate, dup written.
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h);
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup);

namespace cuda {
// f32 or bf16 CUDA tensors (one dtype), f32 math (ops/cuda/swiglu.cu).
void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, CudaStream stream = nullptr);
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
                    CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
