// Cross-entropy fused with a vocab-parallel output projection (Megatron's
// vocab-parallel cross-entropy). Each TP rank holds rows [v0, v0 + Vl) of the
// output matrix W [Vp, D]; h [N, D] is the same on every rank.
// Per block of rows, with l = h W_localᵀ [B, Vl] (columns ≥ vocab masked):
//   m    = max over ranks of the local row maxima          (all-reduce max)
//   s    = Σ over ranks of Σ_c exp(l_c − m)                (all-reduce sum)
//   z_t  = the target's logit, from the rank that holds it (all-reduce sum)
//   loss = Σ_rows (m + log s − z_t) / normalizer           (same on every rank)
//   dl   = (exp(l − m − log s) − onehot_local(target)) / normalizer
//   dh   = Σ over ranks of dl W_local                      (all-reduce sum)
//   dW_local += dlᵀ h
// predictions: the global argmax (lowest index among equal maxima, as the
// single-process op).
#pragma once

#include "ops/cross_entropy.h"
#include "parallel/tensor_parallel.h"

namespace loom {

ops::CrossEntropyResult VocabParallelCrossEntropy(const Tensor& h, const Tensor& w_local, int64_t first_row,
                                                  const Tensor& targets, const ops::CrossEntropyOptions& options,
                                                  const TensorParallel& tp, Tensor* dh, Tensor* dw_local,
                                                  Tensor* predictions = nullptr);

}  // namespace loom
