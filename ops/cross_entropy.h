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
// The default chunk of n rows: about 256 MiB of f32 logits, a multiple of
// 128 rows when that many fit (2,048 rows at Vp = 32,000).
inline int64_t CrossEntropyChunkRows(int64_t n, int64_t padded_vocab) {
  int64_t rows = (int64_t{256} << 20) / (padded_vocab * 4);
  rows = rows >= 128 ? rows / 128 * 128 : rows < 1 ? 1 : rows;
  return rows < n ? rows : n;
}
// bf16 backward: the bf16 logit gradients of up to 4 chunks are kept and the
// two gradient GEMMs run once for all of them (dW's f32 read and write then
// happen once per 4 chunks; the buffer is 500 MiB at Vp = 32,000).
constexpr int64_t kCrossEntropyGradChunks = 4;
inline int64_t CrossEntropyGradRows(int64_t n, int64_t chunk_rows) {
  const int64_t rows = kCrossEntropyGradChunks * chunk_rows;
  return rows < n ? rows : n;
}

// The per-row pieces of the vocab-parallel cross-entropy
// (parallel/vocab_parallel_cross_entropy.h) for one block of f32 logits
// [rows, Vl] of the vocab rows [v0, v0 + Vl); columns ≥ vocab are padding.
// Row statistics are f64 [rows]; between the calls the caller all-reduces
// them over the TP group.
//   local_max = max of the row's valid columns (−inf if none),
//   best      = the lowest global column holding it (INT64_MAX if none)
void VocabShardRowMax(const Tensor& logits, int64_t v0, int64_t vocab, Tensor& local_max, Tensor& best,
                      CudaStream stream = nullptr);
//   sum = Σ_c exp(l_c − max), zt = the target's logit if this shard holds
//   it (else 0), neg_best = −best where local_max == max (else −INT64_MAX),
//   so that an all-reduce max gives −(lowest global argmax)
void VocabShardSumExp(const Tensor& logits, int64_t v0, int64_t vocab, const Tensor& max, const Tensor& local_max,
                      const Tensor& best, const Tensor& targets, int32_t ignore_index, Tensor& sum, Tensor& zt,
                      Tensor& neg_best, CudaStream stream = nullptr);
//   row_loss = max + log sum − zt (f32, 0 on ignored rows); predictions =
//   −neg_best (if non-null); if grad is defined (f32 — it may be the logits
//   — or bf16 [rows, Vl]), grad = (softmax − onehot_local(target)) · scale.
void VocabShardSoftmaxGrad(const Tensor& logits, int64_t v0, int64_t vocab, const Tensor& max, const Tensor& sum,
                           const Tensor& zt, const Tensor& neg_best, const Tensor& targets, int32_t ignore_index,
                           double scale, Tensor& row_loss, Tensor* predictions, Tensor& grad,
                           CudaStream stream = nullptr);
// Σ row_loss in f64 (fixed order), the non-ignored targets, and a check that
// each is in [0, vocab): one device-to-host copy.
CrossEntropyResult SumRowLosses(const Tensor& row_loss, const Tensor& targets, int64_t vocab, int32_t ignore_index,
                                double normalizer, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
