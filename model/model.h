// Decoder-only language model from a layer pattern:
//   x = Embed(tokens); x = Block_l(x) for each layer; h = RMSNorm(x);
//   loss = CrossEntropy(h W_outᵀ, targets) / normalizer
//          + Σ_MoE, MoH layers router_loss · share,  share = the batch's target
//            tokens / normalizer (the router losses are per-call means, so
//            micro-batches add up to their token-weighted mean)
// W_out is the embedding table when tied. Explicit forward/backward, no
// autograd tape: each block keeps what its backward needs.
// Tensor parallel: the embedding and W_out are split by vocabulary rows
// (vocab-parallel embedding and cross-entropy), the blocks by heads and
// hidden units (parallel/tensor_parallel.h).
// Pipeline parallel: a rank holds `vpp` chunks of consecutive layers;
// chunk v of pipeline rank r is virtual stage s = v·pp + r and holds layers
// [s·L/(pp·vpp), (s+1)·L/(pp·vpp)). Virtual stage 0 also holds the
// embedding, the last one the final norm and W_out (model/pipeline.h runs
// the schedule).
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

struct PipelineParallel {
  int size = 1, rank = 0, vpp = 1;
};

class Model {
 public:
  explicit Model(const ModelDims& dims, const TensorParallel& tp = {}, const ContextParallel& cp = {},
                 const PipelineParallel& pp = {});

  // Forward and backward of one micro-batch (one pipeline stage only).
  // Parameter gradients accumulate; the loss is this batch's summed token
  // loss / normalizer (the global count of non-ignored tokens of the step).
  ops::CrossEntropyResult ForwardBackward(const Batch& batch, double normalizer);
  // One optimizer step's gradients: zeroes them, then runs ForwardBackward on
  // every micro-batch with the loss normalised by the step's total count of
  // target tokens (normalizer > 0 overrides the count: data parallelism uses
  // the global count over all ranks), so accumulation equals one large
  // batch. Returns the loss. Then applies the MoE routers' bias-balancing
  // update from this step's loads (outside the gradient; a no-op without
  // bias balancing).
  double StepGradients(const std::vector<Batch>& micro_batches, double normalizer = 0);
  // Forward only (one pipeline stage only). predictions (optional): argmax
  // token at every position.
  ops::CrossEntropyResult Evaluate(const Batch& batch, double normalizer, Tensor* predictions);

  // ---- Pipeline pieces: one model chunk of this rank.
  int chunks() const { return static_cast<int>(chunks_.size()); }
  bool first_stage(int chunk) const { return pp_.rank == 0 && chunk == 0; }
  bool last_stage(int chunk) const { return pp_.rank == pp_.size - 1 && chunk == pp_.vpp - 1; }
  // Runs chunk v from `input` [T, C] (the embedding on the first stage,
  // `input` unused) and returns its output, keeping what backward needs.
  Tensor ChunkForward(int chunk, const Batch& batch, const Tensor& input);
  // Backward of the chunk's last ChunkForward. The last stage computes the
  // loss (into *loss) and ignores dout; others take dout [T, C]. Returns the
  // gradient of the chunk's input (undefined on the first stage).
  Tensor ChunkBackward(int chunk, const Batch& batch, const Tensor& dout, double normalizer,
                       ops::CrossEntropyResult* loss);
  // Forward-only loss on the last stage from the chunk's output.
  ops::CrossEntropyResult ChunkLoss(const Tensor& output, const Batch& batch, double normalizer,
                                    Tensor* predictions);
  // Σ over the chunk's MoE and MoH blocks of router_loss · share (see the
  // top), from the chunk's last ChunkForward of `batch`.
  double ChunkRouterLoss(int chunk, const Batch& batch, double normalizer) const;
  // The MoE layers' selection-bias update from the step's loads (bias
  // balancing; model/moe.h), once a step after its last backward.
  void UpdateMoeBias();
  void ReleaseChunk(int chunk);
  // Tokens of a micro-batch's residual stream on this rank: all of them, or
  // 1/tp under sequence parallelism (what pipeline stages send).
  int64_t residual_tokens(const Batch& batch) const;

  const ParamList& params() const { return params_; }
  // MoE layers' routing of their last forward: (layer index, statistics).
  std::vector<std::pair<int, RoutingStats>> RoutingStatistics() const;
  // MoH layers' routing of their last forward over the routed heads (layers
  // with routed heads only): (layer index, statistics).
  std::vector<std::pair<int, RoutingStats>> MohStatistics() const;
  // This rank's MoE layers: (layer index, layer), e.g. to checkpoint their selection bias.
  std::vector<std::pair<int, MoeLayer*>> MoeLayers();
  // This rank's MoH layers' routers: (layer index, router), e.g. for decoding.
  std::vector<std::pair<int, MohRouter*>> MohRouters();
  const ModelDims& dims() const { return dims_; }
  void ZeroGrad();
  // bf16 runs: rewrites every matrix's bf16 copy (Param::compute) from its
  // master, after the masters changed outside the optimizer (a checkpoint
  // load). Nothing to do unless dims.mixed_bf16.
  void RefreshComputeWeights();
  // Called during backward with parameters whose gradient for the current
  // micro-batch is complete (data parallelism starts bucket reductions
  // from it), in the order backward finishes them, while armed.
  void set_grad_ready_hook(std::function<void(const ParamList&)> hook) { grad_ready_ = std::move(hook); }
  void set_grad_ready_armed(bool armed) { hook_armed_ = armed; }

 private:
  struct Chunk {
    std::vector<std::unique_ptr<DecoderBlock>> blocks;
    std::vector<Tensor> layer_inputs;  // input of each block, then the chunk's output
  };
  // f(global layer index, block) for this rank's blocks, in layer order.
  template <typename F>
  void ForEachBlock(F&& f) const {
    const int per_stage = dims_.layers / (pp_.size * pp_.vpp);
    for (int v = 0; v < pp_.vpp; ++v)
      for (size_t i = 0; i < chunks_[v].blocks.size(); ++i)
        f((v * pp_.size + pp_.rank) * per_stage + static_cast<int>(i), *chunks_[v].blocks[i]);
  }
  Tensor Embed(const Batch& batch);
  // The final RMSNorm of the last stage (saved for backward); returns its
  // output over all the micro-batch's tokens.
  Tensor FinalNorm(const Tensor& x);
  Param& output_param() { return dims_.tie_embeddings ? embed_ : lm_head_; }
  // Loss (and dh, dW_out when dh is non-null) of the final hidden state.
  ops::CrossEntropyResult Loss(const Tensor& h, const Batch& batch, double normalizer, Tensor* dh,
                               Tensor* predictions);
  static double RouterLossShare(const Batch& batch, double normalizer) {
    return normalizer > 0 ? static_cast<double>(batch.CountTargets()) / normalizer : 0.0;
  }
  void GradReady(const ParamList& params) {
    if (grad_ready_ && hook_armed_) grad_ready_(params);
  }

  ModelDims dims_;
  TensorParallel tp_;
  ContextParallel cp_;
  PipelineParallel pp_;
  std::function<void(const ParamList&)> grad_ready_;
  bool hook_armed_ = true;
  Param embed_, final_norm_, lm_head_;
  std::vector<Chunk> chunks_;
  ParamList params_;
  Tensor final_x_, final_rstd_;  // the last stage's final norm, for backward
};

}  // namespace loom
