// Decoder-only language model from a layer pattern:
//   x = Embed(tokens); x = Block_l(x) for each layer; h = RMSNorm(x);
//   loss = CrossEntropy(h W_outᵀ, targets) / normalizer
// W_out is the embedding table when tied. Explicit forward/backward, no
// autograd tape: each block keeps what its backward needs.
#pragma once

#include <memory>
#include <vector>

#include "model/batch.h"
#include "model/block.h"
#include "model/dims.h"
#include "model/param.h"
#include "ops/cross_entropy.h"

namespace loom {

class Model {
 public:
  explicit Model(const ModelDims& dims);

  // Forward and backward of one micro-batch. Parameter gradients accumulate;
  // the loss is this batch's summed token loss / normalizer (the global count
  // of non-ignored tokens of the step).
  ops::CrossEntropyResult ForwardBackward(const Batch& batch, double normalizer);
  // One optimizer step's gradients: zeroes them, then runs ForwardBackward on
  // every micro-batch with the loss normalised by the step's total count of
  // target tokens, so accumulation equals one large batch. Returns the loss.
  double StepGradients(const std::vector<Batch>& micro_batches);
  // Forward only. predictions (optional): argmax token at every position.
  ops::CrossEntropyResult Evaluate(const Batch& batch, double normalizer, Tensor* predictions);

  const ParamList& params() const { return params_; }
  const ModelDims& dims() const { return dims_; }
  void ZeroGrad();

 private:
  // Embedding and blocks; fills layer_inputs_ (input of each block) and
  // returns the final normalised hidden state.
  Tensor Trunk(const Batch& batch);
  const Tensor& output_weight() const { return dims_.tie_embeddings ? embed_.value : lm_head_.value; }

  ModelDims dims_;
  Param embed_, final_norm_, lm_head_;
  std::vector<std::unique_ptr<DecoderBlock>> blocks_;
  ParamList params_;
  // Saved between Trunk and the backward pass.
  std::vector<Tensor> layer_inputs_;
  Tensor final_x_, final_rstd_;
};

}  // namespace loom
