// Grouped linear (the experts of an MoE layer): the R rows of x are G
// consecutive groups of rows[g] rows, and group g has its own weight:
//   y[g]  = x[g] · W_gᵀ            x [R, in], W_g [out, in], y [R, out]
// Backward:
//   dx[g] = dy[g] · W_g            (written, or added when accumulate_dx)
//   dW_g += dy[g]ᵀ · x[g]          (a group of 0 rows adds nothing)
// It is Linear (ops/linear.h) on each group's rows, in one call.
//
// The pair form (an expert's gate and up projections of one x): dy2
// [R, 2·out] holds [dya | dyb] in each row (ops/swiglu.h's backward):
//   dx[g] = dya[g] · Wa_g + dyb[g] · Wb_g   (written, or added when accumulate_dx)
//   dWa_g += dya[g]ᵀ · x[g],   dWb_g += dyb[g]ᵀ · x[g]
// On the GPU dx[g] is one GEMM of depth 2·out where Tensor::Stacked joins
// Wa_g and Wb_g (back to back in one buffer: model/param.h
// AllocateComputeCopies), else two; likewise [dWa_g; dWb_g] is one GEMM of
// 2·out rows where it joins dWa_g and dWb_g (parallel/data_parallel.h's flat
// gradients). With one group it is
// a SwiGLU MLP's gate/up backward (model/mlp.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void GroupedLinearForward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                          Tensor& y);
// dx may be null.
void GroupedLinearBackward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                           const Tensor& dy, Tensor* dx, const std::vector<Tensor*>& dw, bool accumulate_dx = false);
void GroupedLinearPairBackward(const Tensor& x, const std::vector<const Tensor*>& wa,
                               const std::vector<const Tensor*>& wb, const std::vector<int64_t>& rows, const Tensor& dy2,
                               Tensor& dx, const std::vector<Tensor*>& dwa, const std::vector<Tensor*>& dwb,
                               bool accumulate_dx = false);

namespace cuda {
// CUDA tensors (ops/cuda/grouped_linear.cu), the dtype contract of Linear:
// x, W_g, y, dy, dx all f32 or all bf16, dW_g f32 (bf16 products
// accumulated in f32 into the f32 gradient).
void GroupedLinearForward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                          Tensor& y, CudaStream stream = nullptr);
void GroupedLinearBackward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                           const Tensor& dy, Tensor* dx, const std::vector<Tensor*>& dw, bool accumulate_dx,
                           CudaStream stream = nullptr);
void GroupedLinearPairBackward(const Tensor& x, const std::vector<const Tensor*>& wa,
                               const std::vector<const Tensor*>& wb, const std::vector<int64_t>& rows, const Tensor& dy2,
                               Tensor& dx, const std::vector<Tensor*>& dwa, const std::vector<Tensor*>& dwb,
                               bool accumulate_dx, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
