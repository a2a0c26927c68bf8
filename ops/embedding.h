// Token embedding: out[n] = table[ids[n]].
//   ids [N] i32 in [0, V), table [V, D], out [N, D]
// Backward: dtable[ids[n]] += dout[n] (accumulated).
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out);
void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable);

// A slice of the table: `table` holds global rows [first_row, first_row + V).
// Ids outside it give zero rows forward and no gradient backward (the
// vocab-parallel embedding sums the slices' outputs).
void EmbeddingForwardSlice(const Tensor& ids, const Tensor& table, int64_t first_row, Tensor& out);
void EmbeddingBackwardSlice(const Tensor& ids, const Tensor& dout, int64_t first_row, Tensor& dtable);

namespace cuda {
// ops/cuda/embedding.cu. ids i32, table and out f32 or bf16 (one dtype);
// dtable f32 (accumulated), dout f32 or bf16. The backward is deterministic
// (sorted by id, fixed-order sums) and takes 16·N + 8·ceil(N/32)·D bytes
// (plus the radix sort's temporary storage) of stream-ordered scratch.
void EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out, CudaStream stream = nullptr);
void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable, CudaStream stream = nullptr);
void EmbeddingForwardSlice(const Tensor& ids, const Tensor& table, int64_t first_row, Tensor& out,
                           CudaStream stream = nullptr);
void EmbeddingBackwardSlice(const Tensor& ids, const Tensor& dout, int64_t first_row, Tensor& dtable,
                            CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
