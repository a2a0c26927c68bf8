// One decoder layer, pre-norm:
//   x1 = x + Mixer(RMSNorm(x)),  x2 = x1 + SwiGLU(RMSNorm(x1))
// where the mixer is softmax ('S') or lightning ('L') attention.
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
#include "model/param.h"
#include "model/softmax_attention_layer.h"

namespace loom {

class DecoderBlock {
 public:
  DecoderBlock(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp, int layer);
  // x [T, C] in, out [T, C].
  void Forward(const Tensor& x, const Batch& batch, Tensor& out);
  // dout [T, C] → dx [T, C] (written). x is the same input Forward saw.
  void Backward(const Tensor& x, const Batch& batch, const Tensor& dout, Tensor& dx);
  void CollectParams(ParamList& out);
  void ReleaseActivations();  // after an evaluation-only forward
  char kind() const { return kind_; }

 private:
  void ForwardKeepingActivations(const Tensor& x, const Batch& batch, Tensor& out);

  const ModelDims& dims_;
  char kind_;
  bool recompute_;
  Param norm1_, norm2_;
  std::unique_ptr<SoftmaxAttentionLayer> softmax_;
  std::unique_ptr<LightningAttentionLayer> lightning_;
  SwigluMlp mlp_;
  // Saved activations [T, C] (and [T] for the norms' rstd).
  Tensor n1_, rstd1_, x1_, n2_, rstd2_;
};

}  // namespace loom
