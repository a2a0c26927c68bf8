// Softmax (or sigmoid) attention layer: GQA, half-split RoPE, causal.
//   q = RoPE(x W_qᵀ) [T, Hq, D], k = RoPE(x W_kᵀ), v = x W_vᵀ [T, Hk, D]
//   (one GEMM x · [W_q; W_k; W_v]ᵀ, ops/stacked_linear.h, and one pass
//   that rotates and unpacks its rows, ops/rope.h RopeQkvForward)
//   o = attention(q, k, v) [T, Hq, D], y = o W_oᵀ [T, C]
// W_q [Hq·D, C], W_k, W_v [Hk·D, C], W_o [C, Hq·D].
// Tensor parallel: each rank holds Hq/tp query and Hk/tp KV heads (rows of
// W_q, W_k, W_v; columns of W_o); y and dx are summed over the TP group.
// Context parallel: attention over the zig-zag chunks through the CP
// group's scheme (parallel/cp_attention.h); everything else is per token.
// MoH ('H' layers, model/moh.h): o is multiplied by the gates g [T, Hq]
// before W_o, y = (g ⊙ o) W_oᵀ; without context parallelism the
// (head, block of kMohBlock queries) pairs no token gates are not computed
// (ops/softmax_attention.h AttentionOptions::active). Under context
// parallelism every head is computed and the ungated outputs are multiplied
// by 0: the same result (the CP schemes take no mask).
// Gradient rule: parameter gradients accumulate, dx is written.
#pragma once

#include <memory>
#include <string>

#include "model/batch.h"
#include "model/dims.h"
#include "model/moh.h"
#include "model/param.h"
#include "parallel/context_parallel.h"
#include "parallel/tensor_parallel.h"

namespace loom {

class SoftmaxAttentionLayer {
 public:
  SoftmaxAttentionLayer(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp,
                        const std::string& prefix, bool moh = false);
  // y = the layer of x, plus residual when given (TensorParallel::ProjectOutput).
  void Forward(const Tensor& x, const Batch& batch, Tensor& y, const Tensor* residual = nullptr);
  // router_loss_scale: the weight of the MoH router loss in the loss.
  void Backward(const Tensor& x, const Batch& batch, const Tensor& dy, Tensor& dx, double router_loss_scale = 0);
  void ReleaseActivations();
  void CollectParams(ParamList& out);
  MohRouter* moh() const { return moh_.get(); }
  // MoH: computes every head when false (tests compare the two).
  void set_skip_inactive_heads(bool skip) { skip_inactive_ = skip; }
  static constexpr int64_t kMohBlock = 64;  // queries per MoH skip block

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
  // MoH.
  std::unique_ptr<MohRouter> moh_;
  bool skip_inactive_ = true;
  Tensor active_;  // [Hq, ceil(T / kMohBlock)] or undefined: what the attention computed
  Tensor gated_;   // g ⊙ o [T, Hq, D], the input of W_o
};

}  // namespace loom
