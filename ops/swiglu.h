// SwiGLU activation: h = SiLU(gate) ⊙ up, element-wise over [N, F].
// Backward: dgate, dup written.
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h);
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup);

}  // namespace loom::ops
