// Memory per rank of one training step, from the model shapes alone (what
// `loom-train --dry-run` prints), without allocating anything.
//
// Persistent state, exact for the CPU trainer as it is (tests compare it
// with what Model and ExpertDataParallel allocate):
//   parameters + gradients: DataParallel's two flat buffers, each the sum of
//     the gradient buckets (built in backward order, cut at parallel.bucket_mb,
//     each padded to a multiple of its group). Models with MoE layers have
//     two DataParallels (parallel/expert_parallel.h): the expert weights
//     (".moe.experts.", E/ep experts a rank) over the (dp/ep)·cp ranks
//     holding the same experts, everything else over dp·cp;
//   AdamW moments m, v: every local element twice, or with ZeRO-1 each
//     bucket's 1/group slice twice, plus the slice of reduced gradients;
//   bf16 runs: a bf16 copy of every 2-D parameter (Param::compute).
// MoE parameters (model/moe.cc; replicated over TP): the router [E, C], this
// ep rank's E/ep experts' w_gate, w_up [F_e, C], w_down [C, F_e], and each
// shared expert's three (a SwigluMlp of width F_e). MoH ('H', 'R' layers,
// model/moh.cc; replicated over TP): W_s [S, C], W_r [R, C], W_h [2, C]
// (ModelDims::MohRouterRows), each where it exists.
//
// Activations: the live tensor bytes of one step above the persistent state,
// found by replaying the allocations and frees of model/*.cc in their order
// (block.cc, softmax_attention_layer.cc, lightning_attention_layer.cc,
// moh.cc, mlp.cc, moe.cc, model.cc, pipeline.cc), per micro-batch of
// T = micro_batch · seq_len / cp tokens. Per block, saved for backward (e =
// activation bytes, s = statistics bytes: e on the CPU, 4 on the GPU; F the
// local SwiGLU width, h/hq/hk local heads, D head_dim; i32 = 4 bytes):
//   block:     n1, x1, n2 [T,C]·e + rstd1, rstd2 [T]·s
//   SwiGLU:    gate, up, h [T,F]                          = 3·T·F·e
//   softmax:   q, o [T,hq,D], k, v [T,hk,D] ·e, lse [T,hq]·s
//   lightning: qa,ka,va, q,k,v (SiLU), a, n (norm), g, y (gate) [T,h,D]·e,
//              rstd (norm) [T,h]·s
//   MoE:       logits [T,E]·e; routing (ops/moe_router.h): scores [T,E]·s,
//              experts [T,k] i32, gates [T,k]·s, lse [T]·s; permutation
//              (ops/moe_permute.h): rows [T,k], ids [S] i32; expert_x_ [S,C],
//              gate_, up_, h_ [S,F_e], returned_y_ [S,C] ·e; each shared
//              expert's gate, up, h [T,F_e]·e
//   MoH:       routed logits [T,R]·e and their routing (as MoE's, R heads),
//              gates [T,hq], shared scores [T,S], α [T,2] ·s, the skip mask
//              [H, ceil(T/block)] i32 (without CP; softmax layers only where
//              the kernels take it: the CPU, Loom's bf16 kernels), the gated
//              attention output [T,hq,D]·e; after GateBackward, dgates [T,hq]·s
// and the block outputs [T,C] of every layer plus the embedding output.
// MoE rows S (k = top_k): dropless every assignment, S = T·k; with
// model.moe.capacity_factor > 0 the bound min(T·k, E·capacity), capacity =
// ceil(factor · N·k / E) over the N = T·dp·cp tokens of the statistics
// group (exact when every expert is over capacity, else an upper bound).
// Under expert parallelism the rows a rank's experts receive (R) depend on
// the routing and are not known in advance: the plan takes the balanced
// case R = S, and counts the exchange's copies (the received and reordered
// buffers of each dispatch and combine).
// A block in model.recompute keeps none of its saved tensors after forward
// and re-creates them at the start of its backward. Transients on top: the
// lightning state [rows,h,D,D]·s in forward (live until the layer's forward
// returns, its n, g, y allocated meanwhile); MoH's shared and α logits; the
// MoE forward's shared-expert sum [T,C]; in backward dx, dprev [T,C], the
// loss's logits block [128 rows, V] (512 rows, V/tp under TP), the SwiGLU
// backward's 3·T·F, the mixer backward's gradients (MoH: the router's logit
// gradients, and the lightning op's masked copy of d_o), the MoE backward's
// dgates [T,k], dsent, dxe [S,C], dh, dgate, dup [S,F_e], the shared
// experts' dx [T,C] and backward, and dlogits [T,E].
// Pipeline parallelism replays parallel/pipeline_schedule.h: each stashed
// chunk input [T,C] between a micro-batch's forward and backward, every sent
// activation and gradient (kept until the step's sends complete), and the
// chunk's forward re-run at backward (model/pipeline.h).
// Not counted: context-parallel scheme buffers (ring/all-gather K/V, LASP
// states), sequence parallelism (planned as if off), communicator staging,
// std::vector scratch inside ops, the router statistics' small tensors
// ([E]-sized, on the host in GPU runs), kernel workspaces, and the ZeRO
// all-gather staging of the update (one bucket slice each, after the
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
  int64_t moe_rows = 0;          // planned expert rows [S, C] of one MoE layer and micro-batch (0: dense)
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
