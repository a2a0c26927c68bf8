// RMSNorm over the last dimension: y = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps).
//   x [N, D], w [D] (undefined Tensor: no weight), y [N, D], rstd [N]
// Per-head norm: view x as [N·H, Dh] with w [Dh].
// Backward: dx written, dw accumulated. With `add` (a residual's gradient,
// shaped like x; may be dx itself) dx = RMSNormᵀ(dy) + add, in one pass.
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

// Dispatches on the device of x: ops/cpu/rmsnorm.cc or ops/cuda/rmsnorm.cu.
void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                     Tensor& dw, const Tensor* add = nullptr);

namespace cuda {
// ops/cuda/rmsnorm.cu. x, y, dy, dx f32 or bf16 (one dtype); w, dw and rstd
// f32 whatever x is (the master weight, its gradient, the statistic; the CPU
// op keeps them in x's dtype). dw is accumulated deterministically (fixed
// row ranges per block, summed in a fixed order through blocks·D floats of
// stream-ordered scratch, blocks <= 2048 and fixed by the shape).
void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd,
                    CudaStream stream = nullptr);
void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                     Tensor& dw, const Tensor* add = nullptr, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
