// Memory per rank of one training step, from the model shapes alone (what
// `loom-train --dry-run` prints), without allocating anything.
//
// Persistent state, exact for the CPU trainer as it is (tests compare it
// with what Model and DataParallel allocate):
//   parameters + gradients: DataParallel's two flat buffers, each the sum of
//     the gradient buckets (built in backward order, cut at parallel.bucket_mb,
//     each padded to a multiple of the dp·cp group);
//   AdamW moments m, v: every local element twice, or with ZeRO-1 each
//     bucket's 1/(dp·cp) slice twice, plus the slice of reduced gradients.
// Activations: the live tensor bytes of one step above the persistent state,
// found by replaying the allocations and frees of model/*.cc in their order
// (block.cc, softmax_attention_layer.cc, lightning_attention_layer.cc,
// mlp.cc, model.cc, pipeline.cc), per micro-batch of T = micro_batch ·
// seq_len / cp tokens. Per block, saved for backward (e = dtype bytes, F the
// local SwiGLU width, h/hq/hk local heads, D head_dim):
//   block:     n1, x1, n2 [T,C] + rstd1, rstd2 [T]        = (3·T·C + 2·T)·e
//   SwiGLU:    gate, up, h [T,F]                          = 3·T·F·e
//   softmax:   q, o [T,hq,D], k, v [T,hk,D], lse [T,hq]    = T·(2·hq·D + 2·hk·D + hq)·e
//   lightning: qa,ka,va, q,k,v (SiLU), a, n + rstd (norm),
//              g, y (gate) [T,h,D]                        = T·h·(D·(4 + 3·silu + norm + 2·gate) + norm)·e
// and the block outputs [T,C] of every layer plus the embedding output.
// A block in model.recompute keeps none of its saved tensors after forward
// and re-creates them at the start of its backward. Transients on top: the
// lightning state [rows,h,D,D] in forward; in backward dx, dprev [T,C], the
// loss's logits block [128 rows, V] (512 rows, V/tp under TP), the SwiGLU
// backward's 3·T·F, the mixer backward's gradients.
// Pipeline parallelism replays parallel/pipeline_schedule.h: each stashed
// chunk input [T,C] between a micro-batch's forward and backward, every sent
// activation and gradient (kept until the step's sends complete), and the
// chunk's forward re-run at backward (model/pipeline.h).
// Not counted: context-parallel scheme buffers (ring/all-gather K/V, LASP
// states), communicator staging, std::vector scratch inside ops, and the
// ZeRO all-gather staging of the update (one bucket slice each, after the
// activations are freed).
#pragma once

#include <cstdint>
#include <string>

#include "model/dims.h"
#include "parallel/topology.h"

namespace loom {

struct MemoryEstimate {
  int64_t parameters = 0;       // elements this rank trains (its TP slices, its PP stage)
  int64_t param_bytes = 0;      // flat value buffer (with bucket padding)
  int64_t grad_bytes = 0;       // flat gradient buffer (+ the ZeRO reduced-gradient slices)
  int64_t optimizer_bytes = 0;  // AdamW m and v (sharded under ZeRO-1)
  int64_t activation_bytes = 0;  // peak live step tensors above the persistent state
  int64_t input_bytes = 0;       // tokens, targets, positions of the step's micro-batches
  int64_t total() const { return param_bytes + grad_bytes + optimizer_bytes + activation_bytes + input_bytes; }
};

struct MemoryEstimateOptions {
  Layout layout;
  int pp_rank = 0;
  bool zero = false;
  double bucket_mb = 25;
  int64_t micro_batch = 1;    // sequences per micro-batch
  int64_t seq_len = 1;        // tokens per sequence (before the CP split)
  int64_t micro_batches = 1;  // micro-batches per step on this rank
};

// dims as ModelDims::FromConfig gives them (padded_vocab for the layout's tp).
absl::StatusOr<MemoryEstimate> EstimateMemory(const ModelDims& dims, const MemoryEstimateOptions& options);

// Options from a validated config and a layout (pp_rank 0).
MemoryEstimateOptions MemoryEstimateOptionsFromConfig(const config::Config& config, const Layout& layout);

}  // namespace loom
