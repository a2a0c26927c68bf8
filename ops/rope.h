// Rotary position embedding, half-split pairing (Hugging Face Llama):
// dimension i pairs with i + D/2, angle = pos · theta^(−2i/D), i < D/2:
//   y[i]       = x[i] cos − x[i+D/2] sin
//   y[i+D/2]   = x[i+D/2] cos + x[i] sin
//   x, y [T, H, D], positions [T] i32. y may alias x.
// Backward is the inverse rotation: dx = Rᵀ dy (written; may alias dy).
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void RopeForward(const Tensor& x, const Tensor& positions, double theta, Tensor& y);
void RopeBackward(const Tensor& dy, const Tensor& positions, double theta, Tensor& dx);

}  // namespace loom::ops
