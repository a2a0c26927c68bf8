// Output gate: y = x ⊙ sigmoid(g), element-wise.
// Backward: dx = dy ⊙ σ(g), dg = dy ⊙ x ⊙ σ(g)(1 − σ(g)) (written).
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void SigmoidGateForward(const Tensor& x, const Tensor& g, Tensor& y);
void SigmoidGateBackward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg);

}  // namespace loom::ops
