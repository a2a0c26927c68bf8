// RMSNorm over the last dimension: y = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps).
//   x [N, D], w [D] (undefined Tensor: no weight), y [N, D], rstd [N]
// Per-head norm: view x as [N·H, Dh] with w [Dh].
// Backward: dx written, dw accumulated.
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

// Dispatches on the device of x: ops/cpu/rmsnorm.cc or ops/cuda/rmsnorm.cu.
void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                     Tensor& dw);

namespace cuda {
// f32 CUDA tensors, on the default stream. dw is accumulated deterministically
// (one thread a column walks the rows in order).
void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                     Tensor& dw);
}  // namespace cuda

}  // namespace loom::ops
