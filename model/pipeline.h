// Pipeline parallelism over the ranks of a pipeline group (parallel.pp
// stages, parallel.vpp chunks per rank): runs a step's micro-batches in the
// 1F1B (or interleaved 1F1B) order of parallel/pipeline_schedule.h, sending
// activations [T, C] forward and their gradients backward (non-blocking
// sends, tagged by micro-batch and virtual stage).
// Memory: between a micro-batch's forward and its backward a rank keeps
// only the chunk's input; backward re-runs the chunk's forward first
// (activation recomputation), so one micro-batch's layer activations are
// live at a time.
#pragma once

#include <vector>

#include "model/model.h"
#include "parallel/communicator.h"

namespace loom {

// Zeroes the gradients and accumulates those of every micro-batch; returns
// this rank's part of the step's loss: the summed cross-entropy / normalizer
// on the last stage, plus on every stage its MoE and MoH layers' router
// losses (Model::ChunkRouterLoss). The parts summed over the pipeline group
// are the loss of one stage holding every layer.
absl::StatusOr<double> PipelineStepGradients(Model& model, Communicator& pp, const std::vector<Batch>& micro_batches,
                                             double normalizer);

// Forward only, micro-batch by micro-batch. On the last stage returns the
// summed loss and counted tokens, and fills predictions[i] (argmax tokens
// of micro-batch i); elsewhere zero tokens and undefined predictions. Every
// stage's loss includes its router losses (share: the batch's targets, as
// Model::Evaluate at normalizer 1), so summed over the group it is Evaluate's.
absl::StatusOr<ops::CrossEntropyResult> PipelineEvaluate(Model& model, Communicator& pp,
                                                         const std::vector<Batch>& micro_batches,
                                                         std::vector<Tensor>* predictions);

}  // namespace loom
