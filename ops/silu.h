// SiLU(x) = x · sigmoid(x), element-wise. y may alias x.
// Backward: dx = dy · s · (1 + x (1 − s)), s = sigmoid(x) (written).
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void SiluForward(const Tensor& x, Tensor& y);
void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx);

}  // namespace loom::ops
