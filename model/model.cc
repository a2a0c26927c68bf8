#include "model/model.h"

#include <algorithm>

#include "ops/embedding.h"
#include "ops/rmsnorm.h"

namespace loom {

Model::Model(const ModelDims& dims) : dims_(dims) {
  const int64_t c = dims_.hidden;
  embed_.Init("embed", {dims_.padded_vocab, c}, dims_.dtype, dims_.seed, dims_.init_std);
  for (int l = 0; l < dims_.layers; ++l) blocks_.push_back(std::make_unique<DecoderBlock>(dims_, l));
  final_norm_.Init("final_norm", {c}, dims_.dtype, dims_.seed, 0, 1.0, /*decay=*/false);
  if (!dims_.tie_embeddings) lm_head_.Init("lm_head", {dims_.padded_vocab, c}, dims_.dtype, dims_.seed, dims_.init_std);
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
  ops::EmbeddingForward(batch.tokens, embed_.value, layer_inputs_[0]);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    layer_inputs_[l + 1] = Tensor::Empty({t, c}, dims_.dtype);
    blocks_[l]->Forward(layer_inputs_[l], batch, layer_inputs_[l + 1]);
  }
  final_x_ = Tensor::Empty({t, c}, dims_.dtype);
  final_rstd_ = Tensor::Empty({t}, dims_.dtype);
  ops::RmsNormForward(layer_inputs_.back(), final_norm_.value, dims_.norm_eps, final_x_, final_rstd_);
  return final_x_;
}

ops::CrossEntropyResult Model::Evaluate(const Batch& batch, double normalizer, Tensor* predictions) {
  Tensor h = Trunk(batch);
  ops::CrossEntropyOptions options;
  options.vocab = dims_.vocab;
  options.normalizer = normalizer;
  auto result = ops::CrossEntropy(h, output_weight(), batch.targets, options, nullptr, nullptr, predictions);
  layer_inputs_.clear();
  for (auto& b : blocks_) b->ReleaseActivations();
  return result;
}

double Model::StepGradients(const std::vector<Batch>& micro_batches) {
  int64_t counted = 0;
  for (const Batch& b : micro_batches) {
    const int32_t* t = b.targets.data<int32_t>();
    for (int64_t i = 0; i < b.targets.numel(); ++i) counted += t[i] != -100;
  }
  ZeroGrad();
  double loss = 0;
  for (const Batch& b : micro_batches) loss += ForwardBackward(b, static_cast<double>(std::max<int64_t>(counted, 1))).loss;
  return loss;
}

ops::CrossEntropyResult Model::ForwardBackward(const Batch& batch, double normalizer) {
  const int64_t t = batch.tokens_count(), c = dims_.hidden;
  Tensor h = Trunk(batch);
  ops::CrossEntropyOptions options;
  options.vocab = dims_.vocab;
  options.normalizer = normalizer;
  Tensor dh = Tensor::Empty({t, c}, dims_.dtype);
  Param& out = dims_.tie_embeddings ? embed_ : lm_head_;
  auto result = ops::CrossEntropy(h, out.value, batch.targets, options, &dh, &out.grad);
  // Backward through the final norm and the blocks; dx carries the residual
  // stream's gradient from the top down.
  Tensor dx = Tensor::Empty({t, c}, dims_.dtype);
  ops::RmsNormBackward(layer_inputs_.back(), final_norm_.value, final_rstd_, dh, dx, final_norm_.grad);
  Tensor dprev = Tensor::Empty({t, c}, dims_.dtype);
  for (size_t l = blocks_.size(); l-- > 0;) {
    blocks_[l]->Backward(layer_inputs_[l], batch, dx, dprev);
    std::swap(dx, dprev);
  }
  ops::EmbeddingBackward(batch.tokens, dx, embed_.grad);
  layer_inputs_.clear();
  final_x_ = final_rstd_ = Tensor();
  return result;
}

}  // namespace loom
