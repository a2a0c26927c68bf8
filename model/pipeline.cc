#include "model/pipeline.h"

#include <map>

#include "parallel/pipeline_schedule.h"

namespace loom {
namespace {

// Tag of the message into virtual stage `stage` for micro-batch m: forward
// activations (dir 0) and gradients (dir 1).
int Tag(int micro, int stage, int stages, int dir) { return ((micro * stages) + stage) * 2 + dir; }

}  // namespace

absl::StatusOr<double> PipelineStepGradients(Model& model, Communicator& pp, const std::vector<Batch>& micro_batches,
                                             double normalizer) {
  const int p = pp.size(), r = pp.rank(), vpp = model.chunks(), m_count = static_cast<int>(micro_batches.size());
  const int stages = p * vpp;
  LOOM_ASSIGN_OR_RETURN(const std::vector<PipelineTask> schedule, PipelineSchedule(p, vpp, r, m_count));
  const int64_t c = model.dims().hidden;
  model.ZeroGrad();
  std::map<std::pair<int, int>, Tensor> inputs;  // (micro, chunk) -> the chunk's input
  std::vector<CommHandle> sends;
  std::vector<Tensor> sent;  // kept alive until the sends complete
  double loss = 0;
  for (const PipelineTask& task : schedule) {
    const int v = task.chunk, m = task.micro, s = v * p + r;
    const Batch& batch = micro_batches[m];
    const int64_t t = model.residual_tokens(batch);
    if (task.forward) {
      Tensor input;
      if (!model.first_stage(v)) {
        input = model.dims().Act({t, c});
        LOOM_RETURN_IF_ERROR(pp.Recv(input, (s - 1) % p, Tag(m, s, stages, 0)));
      }
      Tensor out = model.ChunkForward(v, batch, input);
      if (!model.last_stage(v)) {
        sent.push_back(out);
        sends.push_back(pp.StartSend(out, (s + 1) % p, Tag(m, s + 1, stages, 0)));
      }
      model.ReleaseChunk(v);
      inputs[{m, v}] = input;
    } else {
      // Gradients are final in the last micro-batch's backward of a chunk.
      model.set_grad_ready_armed(m == m_count - 1);
      model.ChunkForward(v, batch, inputs[{m, v}]);  // recompute
      inputs.erase({m, v});
      Tensor dout;
      if (!model.last_stage(v)) {
        dout = model.dims().Act({t, c});
        LOOM_RETURN_IF_ERROR(pp.Recv(dout, (s + 1) % p, Tag(m, s, stages, 1)));
      }
      ops::CrossEntropyResult ce;
      Tensor dx = model.ChunkBackward(v, batch, dout, normalizer, &ce);
      if (model.last_stage(v)) loss += ce.loss;
      loss += model.ChunkRouterLoss(v, batch, normalizer);  // from the recomputed forward
      if (!model.first_stage(v)) {
        sent.push_back(dx);
        sends.push_back(pp.StartSend(dx, (s - 1 + p) % p, Tag(m, s - 1, stages, 1)));
      }
    }
  }
  model.set_grad_ready_armed(true);
  model.UpdateMoeBias();
  for (CommHandle& h : sends) LOOM_RETURN_IF_ERROR(h.Wait());
  return loss;
}

absl::StatusOr<ops::CrossEntropyResult> PipelineEvaluate(Model& model, Communicator& pp,
                                                         const std::vector<Batch>& micro_batches,
                                                         std::vector<Tensor>* predictions) {
  const int p = pp.size(), r = pp.rank(), vpp = model.chunks();
  const int stages = p * vpp;
  const int64_t c = model.dims().hidden;
  ops::CrossEntropyResult total;
  predictions->assign(micro_batches.size(), Tensor());
  std::vector<CommHandle> sends;
  std::vector<Tensor> sent;
  for (size_t m = 0; m < micro_batches.size(); ++m) {
    const Batch& batch = micro_batches[m];
    for (int v = 0; v < vpp; ++v) {
      const int s = v * p + r;
      Tensor input;
      if (!model.first_stage(v)) {
        input = model.dims().Act({model.residual_tokens(batch), c});
        LOOM_RETURN_IF_ERROR(pp.Recv(input, (s - 1) % p, Tag(static_cast<int>(m), s, stages, 0)));
      }
      Tensor out = model.ChunkForward(v, batch, input);
      total.loss += model.ChunkRouterLoss(v, batch, 1.0);
      if (model.last_stage(v)) {
        Tensor predicted = Tensor::Empty({batch.tokens_count()}, DType::kI32, model.dims().device);
        const auto ce = model.ChunkLoss(out, batch, 1.0, &predicted);
        (*predictions)[m] = predicted.To(Device::Cpu());
        total.loss += ce.loss;
        total.counted += ce.counted;
      } else {
        sent.push_back(out);
        sends.push_back(pp.StartSend(out, (s + 1) % p, Tag(static_cast<int>(m), s + 1, stages, 0)));
      }
      model.ReleaseChunk(v);
    }
  }
  for (CommHandle& h : sends) LOOM_RETURN_IF_ERROR(h.Wait());
  return total;
}

}  // namespace loom
