// Mixture-of-head attention (MoH, Jin et al. 2024): the gates of one H or R
// layer. Heads are experts: the layer's attention output o [T, H, D] is
// multiplied by g [T, H] before W_o, so y = Σ_i g_ti · o_ti W_O^i.
//   shared heads i < S:  g_ti = α1_t · Softmax(W_s x_t)_i
//   routed heads i ≥ S:  p_t = Softmax(W_r x_t) over the R = H − S routed
//                        heads; token t keeps its top-k (ties to the lower
//                        head), g_ti = α2_t · p_t,i−S when kept, else 0
//   [α1_t, α2_t] = Softmax(W_h x_t)   (a layer with one kind of head has no
//                                      W_h; that kind's α is 1)
//   W_s [S, C], W_r [R, C], W_h [2, C] ("<prefix>w_s", "w_r", "w_h").
// The routed part is the MoE router of ops/moe_router.h (softmax scores,
// un-normalised top-k gates). fixed_gates: g = 1 for shared and kept heads;
// no W_s, W_h; W_r only selects (and learns from the balance loss alone).
//
// Load balance over the routed heads (f_i held constant):
//   L_b = Σ_i f_i P_i,  f_i = load_i / T (fraction of tokens keeping head i),
//   P_i = (1/T) Σ_t p_ti,  so L_b = (k/R) · aux of ops/moe_router.h
// (which uses load_i / (T·k) and a factor R); router_loss() = coef · L_b.
// Data parallelism: as the MoE router (model/moe.h "Data parallelism"),
// load_i, Σ_t p_ti and T are summed over the stats group (dp × cp) in
// group-rank order before use, and Backward sums loss_scale over the group.
//
// Skipping: ActiveMask(B) says which (head, block of B tokens) have a
// non-zero gate for some token; the attention ops skip the rest (their
// outputs are multiplied by g = 0 anyway, and the router has no gradient
// through an unkept gate, so skipping changes nothing).
//
// Tensor parallelism: W_s, W_r, W_h are replicated, every TP rank computes
// the gates of all H heads from the same (gathered) x and keeps the columns
// of its H/tp heads; in backward the ranks' gate gradients are summed over
// the TP group into the whole [T, H] (each rank fills its own columns), the
// router's backward runs alike everywhere (equal replicated gradients), and
// only TP rank 0 adds the router's part of dx (the layer sums dx over TP).
//
// Devices (docs/gpu.md): on the GPU the logits are activations (bf16 in
// mixed precision), the scores, α, p and g [T, H] f32 (ops/moh_gate.h);
// everything stays on the device but the router's [R] statistics and the
// loss scale, which cross to the host as in the MoE router.
//
// Gradient rule: parameter gradients accumulate; Backward adds into dx.
#pragma once

#include <string>
#include <vector>

#include "model/dims.h"
#include "model/moe.h"
#include "model/param.h"
#include "ops/moe_router.h"
#include "ops/moh_gate.h"
#include "parallel/tensor_parallel.h"

namespace loom {

// The gating itself is ops::ApplyHeadGates / ops::HeadGatesBackward
// (ops/moh_gate.h), on [T, H·D] tensors whose head h of token t is the D
// values at t·H·D + h·D.

class MohRouter {
 public:
  // Gates of this TP rank's H/tp query heads (all dims.heads at tp 1);
  // prefix e.g. "layers.3.attn.moh.".
  MohRouter(const ModelDims& dims, const TensorParallel& tp, const std::string& prefix);
  // x [T, C] → this rank's gates [T, H/tp] (on x's device; x's dtype on
  // the CPU, f32 on the GPU), kept for Gate and GateBackward.
  const Tensor& Forward(const Tensor& x);
  // heads [T, H/tp·D] (any shape of that many elements) times the gates of
  // the last Forward: a new tensor of heads' shape.
  Tensor Gate(const Tensor& heads) const;
  // Gate's backward: d_gated → d_heads in place, and dL/dgates kept for
  // Backward. heads: what Gate took.
  void GateBackward(const Tensor& heads, Tensor& d_gated);
  // i32 [H/tp, ceil(T / block)] on x's device: 1 where some token of the
  // block has a non-zero gate for the head (every shared head; routed heads
  // some token kept). Of the last Forward.
  Tensor ActiveMask(int64_t block) const;
  // GateBackward's dL/dgates → dx [T, C] (added; TP rank 0 only) and the
  // router weights' gradients (accumulated). loss_scale: weight of
  // router_loss() in the loss.
  void Backward(const Tensor& x, Tensor& dx, double loss_scale);
  // aux_loss_coef · L_b of the last Forward (global under data parallelism).
  double router_loss() const { return router_loss_; }
  // Load of the R routed heads (assignments = N·k); zeros without routed heads.
  const RoutingStats& stats() const { return stats_; }
  int routed_heads() const { return routed_; }
  void CollectParams(ParamList& out);
  void ReleaseActivations();

 private:
  MohDims moh_;
  TensorParallel tp_;
  int heads_, shared_, routed_;
  bool mix_;  // both kinds of heads and learned gates: W_h exists
  ops::MoeRouterOptions options_;
  ops::MohGateOptions gate_options_;
  Param ws_, wr_, wh_;
  double router_loss_ = 0;
  RoutingStats stats_;
  // Activations of the last Forward.
  int64_t tokens_ = 0;
  Tensor gates_, dgates_;             // [T, H/tp] this rank's gates, their gradient
  Tensor shared_scores_;              // [T, S] Softmax(W_s x)
  Tensor alpha_;                      // [T, 2] Softmax(W_h x)
  Tensor routed_logits_;              // [T, R] W_r x
  ops::MoeRouting routing_;           // p, the kept heads, their p
  std::vector<int64_t> global_load_;  // [R] summed over the stats group
  int64_t global_tokens_ = 0;         // N
};

}  // namespace loom
