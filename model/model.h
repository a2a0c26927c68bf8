// Decoder-only language model from a layer pattern:
//   x = Embed(tokens); x = Block_l(x) for each layer; h = RMSNorm(x);
//   loss = CrossEntropy(h W_outᵀ, targets) / normalizer
// W_out is the embedding table when tied. Explicit forward/backward, no
// autograd tape: each block keeps what its backward needs.
// Tensor parallel: the embedding and W_out are split by vocabulary rows
// (vocab-parallel embedding and cross-entropy), the blocks by heads and
// hidden units (parallel/tensor_parallel.h).
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "model/batch.h"
#include "model/block.h"
#include "model/dims.h"
#include "model/param.h"
#include "ops/cross_entropy.h"
#include "parallel/context_parallel.h"
#include "parallel/tensor_parallel.h"

namespace loom {

class Model {
 public:
  explicit Model(const ModelDims& dims, const TensorParallel& tp = {}, const ContextParallel& cp = {});

  // Forward and backward of one micro-batch. Parameter gradients accumulate;
  // the loss is this batch's summed token loss / normalizer (the global count
  // of non-ignored tokens of the step).
  ops::CrossEntropyResult ForwardBackward(const Batch& batch, double normalizer);
  // One optimizer step's gradients: zeroes them, then runs ForwardBackward on
  // every micro-batch with the loss normalised by the step's total count of
  // target tokens, so accumulation equals one large batch. Returns the loss.
  // normalizer > 0 overrides the count (data parallelism: the global count
  // of the step's target tokens over all ranks).
  double StepGradients(const std::vector<Batch>& micro_batches, double normalizer = 0);
  // Forward only. predictions (optional): argmax token at every position.
  ops::CrossEntropyResult Evaluate(const Batch& batch, double normalizer, Tensor* predictions);

  const ParamList& params() const { return params_; }
  // Called during backward with parameters whose gradient for the current
  // micro-batch is complete (data parallelism starts bucket reductions
  // from it), in the order backward finishes them.
  void set_grad_ready_hook(std::function<void(const ParamList&)> hook) { grad_ready_ = std::move(hook); }
  const ModelDims& dims() const { return dims_; }
  void ZeroGrad();

 private:
  // Embedding and blocks; fills layer_inputs_ (input of each block) and
  // returns the final normalised hidden state.
  Tensor Trunk(const Batch& batch);
  Param& output_param() { return dims_.tie_embeddings ? embed_ : lm_head_; }
  // Loss (and dh, dW_out when dh is non-null) of the final hidden state.
  ops::CrossEntropyResult Loss(const Tensor& h, const Batch& batch, double normalizer, Tensor* dh,
                               Tensor* predictions);
  void GradReady(const ParamList& params) {
    if (grad_ready_ && hook_armed_) grad_ready_(params);
  }

  ModelDims dims_;
  TensorParallel tp_;
  ContextParallel cp_;
  std::function<void(const ParamList&)> grad_ready_;
  bool hook_armed_ = true;
  Param embed_, final_norm_, lm_head_;
  std::vector<std::unique_ptr<DecoderBlock>> blocks_;
  ParamList params_;
  // Saved between Trunk and the backward pass.
  std::vector<Tensor> layer_inputs_;
  Tensor final_x_, final_rstd_;
};

}  // namespace loom
