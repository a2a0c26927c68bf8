// Token embedding: out[n] = table[ids[n]].
//   ids [N] i32 in [0, V), table [V, D], out [N, D]
// Backward: dtable[ids[n]] += dout[n] (accumulated).
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out);
void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable);

}  // namespace loom::ops
