#include "model/model.h"

#include <algorithm>

#include "ops/embedding.h"
#include "ops/rmsnorm.h"
#include "parallel/vocab_parallel_cross_entropy.h"

namespace loom {

Model::Model(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp)
    : dims_(dims), tp_(tp), cp_(cp) {
  const int64_t c = dims_.hidden;
  embed_.InitSharded("embed", {dims_.padded_vocab, c}, 0, tp.size, tp.rank, dims_.dtype, dims_.seed,
                     dims_.init_std);
  for (int l = 0; l < dims_.layers; ++l) blocks_.push_back(std::make_unique<DecoderBlock>(dims_, tp_, cp_, l));
  final_norm_.Init("final_norm", {c}, dims_.dtype, dims_.seed, 0, 1.0, /*decay=*/false);
  if (!dims_.tie_embeddings)
    lm_head_.InitSharded("lm_head", {dims_.padded_vocab, c}, 0, tp.size, tp.rank, dims_.dtype, dims_.seed,
                         dims_.init_std);
  params_.push_back(&embed_);
  for (auto& b : blocks_) b->CollectParams(params_);
  params_.push_back(&final_norm_);
  if (!dims_.tie_embeddings) params_.push_back(&lm_head_);
}

void Model::ZeroGrad() {
  for (Param* p : params_) p->grad.Zero();
}

Tensor Model::Trunk(const Batch& batch) {
  const int64_t t = batch.tokens_count(), c = dims_.hidden;
  layer_inputs_.assign(blocks_.size() + 1, Tensor());
  layer_inputs_[0] = Tensor::Empty({t, c}, dims_.dtype);
  if (tp_.size == 1) {
    ops::EmbeddingForward(batch.tokens, embed_.value, layer_inputs_[0]);
  } else {
    ops::EmbeddingForwardSlice(batch.tokens, embed_.value, embed_.split_start, layer_inputs_[0]);
    tp_.AllReduce(layer_inputs_[0]);
  }
  for (size_t l = 0; l < blocks_.size(); ++l) {
    layer_inputs_[l + 1] = Tensor::Empty({t, c}, dims_.dtype);
    blocks_[l]->Forward(layer_inputs_[l], batch, layer_inputs_[l + 1]);
  }
  final_x_ = Tensor::Empty({t, c}, dims_.dtype);
  final_rstd_ = Tensor::Empty({t}, dims_.dtype);
  ops::RmsNormForward(layer_inputs_.back(), final_norm_.value, dims_.norm_eps, final_x_, final_rstd_);
  return final_x_;
}

ops::CrossEntropyResult Model::Loss(const Tensor& h, const Batch& batch, double normalizer, Tensor* dh,
                                    Tensor* predictions) {
  ops::CrossEntropyOptions options;
  options.vocab = dims_.vocab;
  options.normalizer = normalizer;
  Param& out = output_param();
  Tensor* dw = dh != nullptr ? &out.grad : nullptr;
  if (tp_.size == 1) return ops::CrossEntropy(h, out.value, batch.targets, options, dh, dw, predictions);
  return VocabParallelCrossEntropy(h, out.value, out.split_start, batch.targets, options, tp_, dh, dw, predictions);
}

ops::CrossEntropyResult Model::Evaluate(const Batch& batch, double normalizer, Tensor* predictions) {
  Tensor h = Trunk(batch);
  auto result = Loss(h, batch, normalizer, nullptr, predictions);
  layer_inputs_.clear();
  for (auto& b : blocks_) b->ReleaseActivations();
  return result;
}

double Model::StepGradients(const std::vector<Batch>& micro_batches, double normalizer) {
  if (normalizer <= 0) {
    int64_t counted = 0;
    for (const Batch& b : micro_batches) counted += b.CountTargets();
    normalizer = static_cast<double>(std::max<int64_t>(counted, 1));
  }
  ZeroGrad();
  double loss = 0;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    // Gradients are final only in the last micro-batch's backward.
    hook_armed_ = i + 1 == micro_batches.size();
    loss += ForwardBackward(micro_batches[i], normalizer).loss;
  }
  hook_armed_ = true;
  return loss;
}

ops::CrossEntropyResult Model::ForwardBackward(const Batch& batch, double normalizer) {
  const int64_t t = batch.tokens_count(), c = dims_.hidden;
  Tensor h = Trunk(batch);
  Tensor dh = Tensor::Empty({t, c}, dims_.dtype);
  auto result = Loss(h, batch, normalizer, &dh, nullptr);
  if (!dims_.tie_embeddings) GradReady({&lm_head_});
  // Backward through the final norm and the blocks; dx carries the residual
  // stream's gradient from the top down.
  Tensor dx = Tensor::Empty({t, c}, dims_.dtype);
  ops::RmsNormBackward(layer_inputs_.back(), final_norm_.value, final_rstd_, dh, dx, final_norm_.grad);
  GradReady({&final_norm_});
  Tensor dprev = Tensor::Empty({t, c}, dims_.dtype);
  for (size_t l = blocks_.size(); l-- > 0;) {
    blocks_[l]->Backward(layer_inputs_[l], batch, dx, dprev);
    std::swap(dx, dprev);
    ParamList ready;
    blocks_[l]->CollectParams(ready);
    GradReady(ready);
  }
  if (tp_.size == 1) {
    ops::EmbeddingBackward(batch.tokens, dx, embed_.grad);
  } else {
    ops::EmbeddingBackwardSlice(batch.tokens, dx, embed_.split_start, embed_.grad);
  }
  GradReady({&embed_});
  layer_inputs_.clear();
  final_x_ = final_rstd_ = Tensor();
  return result;
}

}  // namespace loom
