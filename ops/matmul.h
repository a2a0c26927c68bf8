// Matrix products on OpenBLAS (CPU). Tensors are row-major; a tensor of more
// than two dimensions is read as 2-D [rows, last dim].
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

// c[M,N] = alpha · op(a) · op(b) + beta · c, op(x) = xᵀ when trans_x.
void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha = 1.0,
            double beta = 0.0);

}  // namespace loom::ops
