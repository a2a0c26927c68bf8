// Softmax (or sigmoid) attention layer: GQA, half-split RoPE, causal.
//   q = RoPE(x W_qᵀ) [T, Hq, D], k = RoPE(x W_kᵀ), v = x W_vᵀ [T, Hk, D]
//   o = attention(q, k, v) [T, Hq, D], y = o W_oᵀ [T, C]
// W_q [Hq·D, C], W_k, W_v [Hk·D, C], W_o [C, Hq·D].
// Tensor parallel: each rank holds Hq/tp query and Hk/tp KV heads (rows of
// W_q, W_k, W_v; columns of W_o); y and dx are summed over the TP group.
// Context parallel: attention over the zig-zag chunks through the CP
// group's scheme (parallel/cp_attention.h); everything else is per token.
// Gradient rule: parameter gradients accumulate, dx is written.
#pragma once

#include <string>

#include "model/batch.h"
#include "model/dims.h"
#include "model/param.h"
#include "parallel/context_parallel.h"
#include "parallel/tensor_parallel.h"

namespace loom {

class SoftmaxAttentionLayer {
 public:
  SoftmaxAttentionLayer(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp,
                        const std::string& prefix);
  void Forward(const Tensor& x, const Batch& batch, Tensor& y);
  void Backward(const Tensor& x, const Batch& batch, const Tensor& dy, Tensor& dx);
  void ReleaseActivations();
  void CollectParams(ParamList& out) { out.insert(out.end(), {&wq_, &wk_, &wv_, &wo_}); }

 private:
  const ModelDims& dims_;
  TensorParallel tp_;
  ContextParallel cp_;
  CpAttentionSaved cp_saved_;
  int64_t hq_, hk_;  // local heads
  Param wq_, wk_, wv_, wo_;
  // Saved by Forward for Backward.
  Tensor q_, k_, v_;  // after RoPE
  Tensor o_;          // [T, Hq, D]
  Tensor lse_;        // [T, Hq]
};

}  // namespace loom
