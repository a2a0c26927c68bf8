// Element-wise accumulate: acc += b (the residual stream and its gradient).
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void AddInPlace(Tensor& acc, const Tensor& b);

}  // namespace loom::ops
