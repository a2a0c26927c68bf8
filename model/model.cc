#include "model/model.h"

#include <algorithm>

#include "ops/add.h"
#include "ops/convert.h"
#include "ops/embedding.h"
#include "ops/rmsnorm.h"
#include "parallel/vocab_parallel_cross_entropy.h"

namespace loom {

Model::Model(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp, const PipelineParallel& pp)
    : dims_(dims), tp_(tp), cp_(cp), pp_(pp) {
  const int64_t c = dims_.hidden;
  const int stages = pp_.size * pp_.vpp;
  LOOM_CHECK(dims_.layers % stages == 0, "[model] ", dims_.layers, " layers in ", stages, " pipeline stages");
  const int per_stage = dims_.layers / stages;
  chunks_.resize(pp_.vpp);
  for (int v = 0; v < pp_.vpp; ++v) {
    const int first_layer = (v * pp_.size + pp_.rank) * per_stage;
    for (int l = first_layer; l < first_layer + per_stage; ++l)
      chunks_[v].blocks.push_back(std::make_unique<DecoderBlock>(dims_, tp_, cp_, l));
  }
  const bool has_embed = first_stage(0), has_head = last_stage(pp_.vpp - 1);
  LOOM_CHECK(!dims_.tie_embeddings || pp_.size == 1, "[model] tied embeddings need pp = 1");
  if (has_embed || (has_head && dims_.tie_embeddings))
    embed_.InitSharded("embed", {dims_.padded_vocab, c}, 0, tp.size, tp.rank, dims_.dtype, dims_.seed,
                       dims_.init_std);
  if (has_head) {
    final_norm_.Init("final_norm", {c}, dims_.dtype, dims_.seed, 0, 1.0, /*decay=*/false);
    if (!dims_.tie_embeddings)
      lm_head_.InitSharded("lm_head", {dims_.padded_vocab, c}, 0, tp.size, tp.rank, dims_.dtype, dims_.seed,
                           dims_.init_std);
  }
  if (has_embed) params_.push_back(&embed_);
  for (auto& chunk : chunks_)
    for (auto& b : chunk.blocks) b->CollectParams(params_);
  if (has_head) {
    params_.push_back(&final_norm_);
    if (!dims_.tie_embeddings) params_.push_back(&lm_head_);
  }
  if (!dims_.device.is_cpu()) {
    for (Param* p : params_) {
      p->value = p->value.To(dims_.device);
      p->grad = Tensor::Zeros(p->grad.shape(), p->grad.dtype(), dims_.device);
    }
  }
  RefreshComputeWeights();
}

void Model::RefreshComputeWeights() {
  if (!dims_.mixed_bf16) return;
  AllocateComputeCopies(params_, dims_.act_dtype());  // the first call
  for (Param* p : params_)
    if (p->value.ndim() == 2) ops::Convert(p->value, p->compute);  // norms read the master
}

void Model::ZeroGrad() {
  for (Param* p : params_) p->grad.Zero();
}

Tensor Model::Embed(const Batch& batch) {
  Tensor x = dims_.Act({batch.tokens_count(), dims_.hidden});
  if (tp_.size == 1) {
    ops::EmbeddingForward(batch.tokens, embed_.weight(), x);
  } else {
    ops::EmbeddingForwardSlice(batch.tokens, embed_.weight(), embed_.split_start, x);
    if (tp_.sp()) return tp_.ScatterTokens(x);
    tp_.AllReduce(x);
  }
  return x;
}

int64_t Model::residual_tokens(const Batch& batch) const {
  return batch.tokens_count() / (tp_.sp() ? tp_.size : 1);
}

Tensor Model::FinalNorm(const Tensor& x) {
  const int64_t t = x.dim(0), c = dims_.hidden;
  final_x_ = dims_.Act({t, c});
  final_rstd_ = dims_.Stat({t});
  ops::RmsNormForward(x, final_norm_.value, dims_.norm_eps, final_x_, final_rstd_);
  return tp_.sp() ? tp_.GatherTokens(final_x_) : final_x_;
}

Tensor Model::ChunkForward(int v, const Batch& batch, const Tensor& input) {
  Chunk& chunk = chunks_[v];
  const int64_t t = residual_tokens(batch), c = dims_.hidden;
  chunk.layer_inputs.assign(chunk.blocks.size() + 1, Tensor());
  chunk.layer_inputs[0] = first_stage(v) ? Embed(batch) : input;
  for (size_t l = 0; l < chunk.blocks.size(); ++l) {
    chunk.layer_inputs[l + 1] = dims_.Act({t, c});
    chunk.blocks[l]->Forward(chunk.layer_inputs[l], batch, chunk.layer_inputs[l + 1]);
  }
  return chunk.layer_inputs.back();
}

ops::CrossEntropyResult Model::Loss(const Tensor& h, const Batch& batch, double normalizer, Tensor* dh,
                                    Tensor* predictions) {
  ops::CrossEntropyOptions options;
  options.vocab = dims_.vocab;
  options.normalizer = normalizer;
  Param& out = output_param();
  Tensor* dw = dh != nullptr ? &out.grad : nullptr;
  if (tp_.size == 1) return ops::CrossEntropy(h, out.weight(), batch.targets, options, dh, dw, predictions);
  return VocabParallelCrossEntropy(h, out.weight(), out.split_start, batch.targets, options, tp_, dh, dw, predictions);
}

ops::CrossEntropyResult Model::ChunkLoss(const Tensor& output, const Batch& batch, double normalizer,
                                         Tensor* predictions) {
  auto result = Loss(FinalNorm(output), batch, normalizer, nullptr, predictions);
  final_x_ = final_rstd_ = Tensor();
  return result;
}

Tensor Model::ChunkBackward(int v, const Batch& batch, const Tensor& dout, double normalizer,
                            ops::CrossEntropyResult* loss) {
  Chunk& chunk = chunks_[v];
  const int64_t t = residual_tokens(batch), c = dims_.hidden;
  Tensor dx = dims_.Act({t, c});
  if (last_stage(v)) {
    // Final norm, loss, and back to the residual stream.
    const Tensor h = FinalNorm(chunk.layer_inputs.back());
    Tensor dh = dims_.Act(h.shape());
    *loss = Loss(h, batch, normalizer, &dh, nullptr);
    if (!dims_.tie_embeddings) GradReady({&lm_head_});
    // Under sequence parallelism dh is whole on every rank (the vocab-parallel
    // cross-entropy sums it) and the norm saw only this rank's tokens.
    const Tensor dh_local = tp_.sp() ? tp_.LocalTokens(dh) : dh;
    Tensor dw = tp_.sp() ? Tensor::Zeros(final_norm_.grad.shape(), dims_.dtype, dims_.device) : final_norm_.grad;
    ops::RmsNormBackward(chunk.layer_inputs.back(), final_norm_.value, final_rstd_, dh_local, dx, dw);
    if (tp_.sp()) {
      tp_.AllReduce(dw);
      ops::AddInPlace(final_norm_.grad, dw);
    }
    GradReady({&final_norm_});
    final_x_ = final_rstd_ = Tensor();
  } else {
    dx.CopyFrom(dout);
  }
  Tensor dprev = dims_.Act({t, c});
  const double router_share = RouterLossShare(batch, normalizer);
  for (size_t l = chunk.blocks.size(); l-- > 0;) {
    chunk.blocks[l]->Backward(chunk.layer_inputs[l], batch, dx, dprev, router_share);
    std::swap(dx, dprev);
    ParamList ready;
    chunk.blocks[l]->CollectParams(ready);
    GradReady(ready);
  }
  chunk.layer_inputs.clear();
  if (!first_stage(v)) return dx;
  if (tp_.size == 1) {
    ops::EmbeddingBackward(batch.tokens, dx, embed_.grad);
  } else {
    ops::EmbeddingBackwardSlice(batch.tokens, tp_.sp() ? tp_.GatherTokens(dx) : dx, embed_.split_start,
                                embed_.grad);
  }
  GradReady({&embed_});
  return Tensor();
}

double Model::ChunkRouterLoss(int chunk, const Batch& batch, double normalizer) const {
  double sum = 0;
  for (const auto& b : chunks_[chunk].blocks) sum += b->router_loss();
  return sum * RouterLossShare(batch, normalizer);
}

std::vector<std::pair<int, RoutingStats>> Model::RoutingStatistics() const {
  std::vector<std::pair<int, RoutingStats>> out;
  ForEachBlock([&](int layer, DecoderBlock& b) {
    if (MoeLayer* moe = b.moe()) out.push_back({layer, moe->stats()});
  });
  return out;
}

std::vector<std::pair<int, RoutingStats>> Model::MohStatistics() const {
  std::vector<std::pair<int, RoutingStats>> out;
  ForEachBlock([&](int layer, DecoderBlock& b) {
    if (const MohRouter* moh = b.moh(); moh != nullptr && moh->routed_heads() > 0) out.push_back({layer, moh->stats()});
  });
  return out;
}

std::vector<std::pair<int, MoeLayer*>> Model::MoeLayers() {
  std::vector<std::pair<int, MoeLayer*>> out;
  ForEachBlock([&](int layer, DecoderBlock& b) {
    if (MoeLayer* moe = b.moe()) out.push_back({layer, moe});
  });
  return out;
}

std::vector<std::pair<int, MohRouter*>> Model::MohRouters() {
  std::vector<std::pair<int, MohRouter*>> out;
  ForEachBlock([&](int layer, DecoderBlock& b) {
    if (MohRouter* moh = b.moh()) out.push_back({layer, moh});
  });
  return out;
}

void Model::ReleaseChunk(int v) {
  chunks_[v].layer_inputs.clear();
  for (auto& b : chunks_[v].blocks) b->ReleaseActivations();
}

ops::CrossEntropyResult Model::Evaluate(const Batch& batch, double normalizer, Tensor* predictions) {
  LOOM_CHECK(pp_.size == 1, "[model] Evaluate runs one stage; pipelines use model/pipeline.h");
  Tensor out = ChunkForward(0, batch, Tensor());
  auto result = ChunkLoss(out, batch, normalizer, predictions);
  result.loss += ChunkRouterLoss(0, batch, normalizer);
  ReleaseChunk(0);
  return result;
}

ops::CrossEntropyResult Model::ForwardBackward(const Batch& batch, double normalizer) {
  LOOM_CHECK(pp_.size == 1, "[model] ForwardBackward runs one stage; pipelines use model/pipeline.h");
  ChunkForward(0, batch, Tensor());
  ops::CrossEntropyResult result;
  ChunkBackward(0, batch, Tensor(), normalizer, &result);
  result.loss += ChunkRouterLoss(0, batch, normalizer);
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
  UpdateMoeBias();
  return loss;
}

void Model::UpdateMoeBias() {
  for (auto& chunk : chunks_)
    for (auto& b : chunk.blocks)
      if (b->moe() != nullptr) b->moe()->UpdateBias();
}

}  // namespace loom
