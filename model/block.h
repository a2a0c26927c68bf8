// One decoder layer, pre-norm:
//   x1 = x + Mixer(RMSNorm(x)),  x2 = x1 + MLP(RMSNorm(x1))
// where the mixer is softmax ('S') or lightning ('L') attention, or MoH over
// either ('H', 'R': gated heads, model/moh.h), and the MLP is SwiGLU, or a
// mixture of experts when model.moe.experts > 0 (model/moe.h).
// MoE and MoH blocks also have a router loss (router_loss(), the sum of
// both); the caller weights it in the training loss and passes that weight
// to Backward.
// Sequence parallelism (TensorParallel::sp()): x, the norms and the residual
// adds hold this rank's 1/tp of the tokens; the mixer and the MLP get their
// input all-gathered over the tokens and their output reduce-scattered.
// Recomputation: a block marked `recompute` keeps only its input after
// Forward and re-runs Forward at the start of Backward.
// Gradient rule: parameter gradients accumulate; dx is written (the caller
// passes the residual-stream gradient in, the block returns it updated).
#pragma once

#include <memory>
#include <string>

#include "model/batch.h"
#include "model/dims.h"
#include "model/lightning_attention_layer.h"
#include "model/mlp.h"
#include "model/moe.h"
#include "model/param.h"
#include "model/softmax_attention_layer.h"

namespace loom {

class DecoderBlock {
 public:
  DecoderBlock(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp, int layer);
  // x [T, C] in, out [T, C].
  void Forward(const Tensor& x, const Batch& batch, Tensor& out);
  // dout [T, C] → dx [T, C] (written). x is the same input Forward saw.
  // router_loss_scale: the weight of router_loss() in the loss (MoE, MoH).
  void Backward(const Tensor& x, const Batch& batch, const Tensor& dout, Tensor& dx,
                double router_loss_scale = 0);
  void CollectParams(ParamList& out);
  void ReleaseActivations();  // after an evaluation-only forward
  char kind() const { return kind_; }
  // MoE: the last Forward's aux·coef + z·coef; MoH: its coef·L_b; summed.
  double router_loss() const;
  MoeLayer* moe() { return moe_.get(); }  // null unless MoE
  MohRouter* moh();                       // null unless H or R

 private:
  void ForwardKeepingActivations(const Tensor& x, const Batch& batch, Tensor& out);

  // dx = RMSNormᵀ(dn) + residual; the weight's gradient is summed over the
  // TP group when sequence parallelism gave this rank only some of the tokens.
  void NormBackward(const Tensor& x, Param& norm, const Tensor& rstd, const Tensor& dn, const Tensor& residual,
                    Tensor& dx);

  const ModelDims& dims_;
  TensorParallel tp_;
  char kind_;
  bool recompute_;
  Param norm1_, norm2_;
  std::unique_ptr<SoftmaxAttentionLayer> softmax_;
  std::unique_ptr<LightningAttentionLayer> lightning_;
  std::unique_ptr<SwigluMlp> mlp_;  // dense, or
  std::unique_ptr<MoeLayer> moe_;
  // Saved activations [T, C] (and [T] for the norms' rstd); with sequence
  // parallelism [T/tp, C], and the gathered norm outputs [T, C].
  Tensor n1_, rstd1_, x1_, n2_, rstd2_;
  Tensor n1_full_, n2_full_;
};

}  // namespace loom
