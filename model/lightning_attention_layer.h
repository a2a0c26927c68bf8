// Lightning attention layer (TransNormerLLM / MiniMax-01 form):
//   q, k, v = SiLU(x W_qᵀ), SiLU(x W_kᵀ), SiLU(x W_vᵀ)      [T, H, D]
//   a = lightning(q, k, v; λ_h of this layer)              [T, H, D]
//   y = (RMSNorm_head(a) ⊙ sigmoid(x W_gᵀ)) W_oᵀ           [T, C]
// No 1/√d scale, no RoPE. SiLU, the per-head norm and the gate are config
// switches (model.lightning_*). W_q, W_k, W_v, W_g [H·D, C], W_o [C, H·D],
// norm weight [D] shared by the heads.
// Tensor parallel: each rank holds H/tp heads (with their global decays);
// the norm weight is replicated and its gradient summed over the TP group;
// y and dx are summed over the TP group.
// Context parallel: the recurrence runs over the zig-zag chunks through the
// CP group's scheme (parallel/cp_lightning.h: LASP-1 or LASP-2).
// MoH ('R' layers, model/moh.h): the input of W_o is gated per head,
// y = (g ⊙ RMSNorm_head(a) ⊙ sigmoid(x W_gᵀ)) W_oᵀ, g [T, H]; without
// context parallelism the outputs of (head, block of lightning_block
// tokens) pairs no token gates are not computed, their k, v still enter the
// state (ops/lightning_attention.h LightningOptions::active). Under context
// parallelism every head is computed and multiplied by its gate (0 for
// those): the same result.
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

class LightningAttentionLayer {
 public:
  LightningAttentionLayer(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp, int layer,
                          const std::string& prefix, bool moh = false);
  // y = the layer of x, plus residual when given (TensorParallel::ProjectOutput).
  void Forward(const Tensor& x, const Batch& batch, Tensor& y, const Tensor* residual = nullptr);
  // router_loss_scale: the weight of the MoH router loss in the loss.
  void Backward(const Tensor& x, const Batch& batch, const Tensor& dy, Tensor& dx, double router_loss_scale = 0);
  void ReleaseActivations();
  void CollectParams(ParamList& out);
  MohRouter* moh() const { return moh_.get(); }
  // MoH: computes every head's output when false (tests compare the two).
  void set_skip_inactive_heads(bool skip) { skip_inactive_ = skip; }

 private:
  const ModelDims& dims_;
  TensorParallel tp_;
  ContextParallel cp_;
  CpLightningSaved cp_saved_;
  int64_t h_;     // local heads
  Tensor decay_;  // λ_h [H]
  Param wq_, wk_, wv_, wg_, wo_, norm_;
  // Saved by Forward for Backward.
  Tensor qa_, ka_, va_;  // projections before SiLU [T, H, D]
  Tensor q_, k_, v_;     // after SiLU (aliases of qa_.. when SiLU is off)
  Tensor a_;             // attention output [T, H, D]
  Tensor rstd_;          // per-head norm [T·H]
  Tensor n_;             // normalised a (alias of a_ when the norm is off)
  Tensor g_;             // gate pre-activation [T, H·D]
  Tensor y_;             // gated output [T, H·D]
  // MoH.
  std::unique_ptr<MohRouter> moh_;
  bool skip_inactive_ = true;
  Tensor active_;  // [H, ceil(T / lightning_block)] or undefined
  Tensor yg_;      // g ⊙ y_, the input of W_o (alias of y_ without MoH)
};

}  // namespace loom
