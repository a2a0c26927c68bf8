// Cross-entropy fused with the output projection: logits = h · Wᵀ are made
// a block of rows at a time and never held whole.
//   h [N, D], W [Vp, D] (Vp ≥ vocab: rows ≥ vocab are padding, masked out),
//   targets [N] i32 (ignore_index: no loss, no gradient)
// loss = Σ_n −log softmax(logits_n)[target_n] / normalizer, where the
// normalizer is the (global) count of non-ignored tokens.
// Backward (same call): dh written, dW accumulated, both for that loss.
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct CrossEntropyOptions {
  int64_t vocab = 0;            // true vocab size; 0 = all rows of W
  int32_t ignore_index = -100;
  double normalizer = 1.0;      // divide the summed loss by this
};

struct CrossEntropyResult {
  double loss = 0;              // summed loss / normalizer
  int64_t counted = 0;          // non-ignored tokens in this call
};

// dh / dw may be null: loss only (evaluation). predictions, if non-null,
// gets the argmax token of every row ([N] i32).
CrossEntropyResult CrossEntropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                                const CrossEntropyOptions& options, Tensor* dh, Tensor* dw,
                                Tensor* predictions = nullptr);

namespace cuda {
// CUDA tensors (docs/gpu.md): h and W both f32 or both bf16, targets i32, dh
// in h's dtype (written), dW f32 (accumulated), predictions i32. Rows go in
// chunks of about 256 MiB of f32 logits; one device-to-host copy at the end.
// A target outside [0, vocab) that is not ignore_index fails the check after
// the work (the check needs that copy); its row counts as ignored.
CrossEntropyResult CrossEntropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                                const CrossEntropyOptions& options, Tensor* dh, Tensor* dw, Tensor* predictions,
                                CudaStream stream = nullptr);
// Rows per chunk for tests (0: the default, sized by the vocab).
void SetCrossEntropyChunkRowsForTesting(int64_t rows);
}  // namespace cuda

}  // namespace loom::ops
