// Token embedding: out[n] = table[ids[n]].
//   ids [N] i32 in [0, V), table [V, D], out [N, D]
// Backward: dtable[ids[n]] += dout[n] (accumulated).
#pragma once

#include "runtime/tensor.h"

namespace loom::ops {

void EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out);
void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable);

// A slice of the table: `table` holds global rows [first_row, first_row + V).
// Ids outside it give zero rows forward and no gradient backward (the
// vocab-parallel embedding sums the slices' outputs).
void EmbeddingForwardSlice(const Tensor& ids, const Tensor& table, int64_t first_row, Tensor& out);
void EmbeddingBackwardSlice(const Tensor& ids, const Tensor& dout, int64_t first_row, Tensor& dtable);

}  // namespace loom::ops
