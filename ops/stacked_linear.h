// Several projections of one input as one Linear (ops/linear.h): the
// attention's q, k and v.
//   y = x · [W_0; W_1; …]ᵀ         x [N, in], W_i [out_i, in], y [N, Σ out_i]
// Backward:
//   dx = dy · [W_0; W_1; …]         (written, or added when accumulate_dx)
//   dW_i += dy_iᵀ · x               dy_i: y's columns of block i
// One GEMM each way where Tensor::Stacked joins the W_i (a model's compute
// copies and DataParallel's flat buffers keep a layer's matrices back to
// back; model/param.h), and one for the dW_i where it joins those: a K or V
// projection of 4 KV heads is a thin GEMM (N = 256 at D = 64) that runs at
// half the tensor cores' rate on its own. Otherwise the composite form: the
// W_i copied into one matrix, the dW_i taken in a zeroed one and added.
#pragma once

#include <vector>

#include "runtime/tensor.h"

namespace loom::ops {

void StackedLinearForward(const Tensor& x, const std::vector<const Tensor*>& w, Tensor& y);
// dx may be null.
void StackedLinearBackward(const Tensor& x, const std::vector<const Tensor*>& w, const Tensor& dy, Tensor* dx,
                           const std::vector<Tensor*>& dw, bool accumulate_dx = false);

}  // namespace loom::ops
