// Linear layer without bias: y = x · Wᵀ (+ residual).
//   x [N, in], W [out, in], y [N, out], residual like y (a skip connection,
//   added in the GEMM's epilogue on the GPU; may be y itself)
// Backward: dx = dy · W (written, or added when accumulate_dx: a layer whose
// input feeds several projections sums their input gradients), dW += dyᵀ · x.
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void LinearForward(const Tensor& x, const Tensor& w, Tensor& y, const Tensor* residual = nullptr);
// dx may be null (the input needs no gradient, e.g. the embedding output).
void LinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw,
                    bool accumulate_dx = false);

namespace cuda {
// CUDA tensors (docs/gpu.md): x, W, y, dy, dx all f32 or all bf16; dW f32,
// accumulated (for bf16 a bf16·bf16 → f32 GEMM with C = D = dW).
void LinearForward(const Tensor& x, const Tensor& w, Tensor& y, const Tensor* residual = nullptr,
                   CudaStream stream = nullptr);
void LinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, bool accumulate_dx,
                    CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
