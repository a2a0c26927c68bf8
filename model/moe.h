// Mixture-of-experts MLP:
//   y = Σ_j g_tj · Expert_e(t,j)(x_t) + Σ_s Shared_s(x_t)
// with the router of ops/moe_router.h (logits = x W_rᵀ, W_r [E, C]) and each
// expert a SwiGLU MLP of width moe.ffn with its own weights
// ("<prefix>experts.<e>.w_gate", ...; shared: "<prefix>shared.<s>.w_gate",
// a dense SwigluMlp).
//
// Permutation (ops/moe_permute.h): assignment (t, j) has id t·k + j; each
// expert takes its assignments in increasing id order (= global token
// order); their rows of x are gathered expert after expert into [S, C], the
// experts run as one grouped SwiGLU (ops/grouped_linear.h: each expert's
// rows times its own weights), and each token sums its k outputs scaled by
// the gates, in j order, then adds the shared experts': the result does not
// depend on anything but the inputs.
// Devices: the same code on the CPU (f32/f64) and on CUDA tensors (f32, or
// bf16 activations with f32 router statistics, gates and master gradients;
// docs/gpu.md). What crosses to the host each call: the router's [E]
// statistics (ops/moe_router.h), nothing else.
// Capacity (capacity_factor > 0): an expert keeps its first
// ceil(factor · T·k / E) assignments in token order; later ones are dropped
// (contribute nothing, their gate gets no gradient) and counted.
//
// Router loss: router_loss() = aux_coef · aux + z_coef · z of the last
// Forward (means over this call's tokens). The caller states its weight in
// the training loss (loss_scale, e.g. this micro-batch's share of the
// step's target tokens) and Backward seeds the router's backward with it.
//
// Data parallelism (MoeParallel::stats, the dp (× cp) group): the ranks'
// tokens of one call form one global micro-batch, in group-rank order. The
// router statistics are summed over the group before use (DESIGN.md, Global
// normalisation): with N = Σ_ranks T and load_e, Σ_t p_te summed over ranks,
//   aux = E Σ_e (load_e / (N k)) (Σ_t p_te / N),   z = Σ_t lse_t² / N,
// capacity = ceil(factor · N k / E), and expert e keeps its first `capacity`
// assignments in global token order (a rank keeps capacity minus the
// assignments of the lower ranks). router_loss() is then the global value
// on every rank; Backward sums loss_scale over the group (each rank's share
// of the global micro-batch) and seeds its local part of the router's
// backward with it, so the summed gradients are those of one process.
// Bias balancing uses the global loads, identically on every rank.
//
// Expert parallelism (MoeParallel::ep, parallel/expert_parallel.h): this
// rank holds experts [first, first + E/ep) only (global names); the rows of
// every kept assignment, in the order above (expert, then token), travel to
// their expert's owner and back. The same exchange runs locally without ep,
// so both give the same expert inputs and the same summation orders.
//
// Gradient rule: parameter gradients accumulate, dx is written.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/dims.h"
#include "model/mlp.h"
#include "model/param.h"
#include "ops/moe_permute.h"
#include "ops/moe_router.h"
#include "parallel/expert_parallel.h"

namespace loom {

class Communicator;

// How an MoE layer is spread over ranks: ModelDims::moe.parallel points at
// one (owned by the caller, alive as long as the model).
struct MoeParallel {
  Communicator* stats = nullptr;  // dp (× cp) group; null: this process alone
  Communicator* ep = nullptr;     // expert parallelism (parallel/expert_parallel.h); null: every expert here
};

// Routing of the last Forward, for logging. Load = assignments routed to an
// expert (before capacity drops), over the E experts; under data parallelism
// over the global micro-batch (the same on every rank).
struct RoutingStats {
  double load_min = 0, load_max = 0;
  double load_cv = 0;        // coefficient of variation: std / mean (population std)
  int64_t assignments = 0;   // T·k
  int64_t dropped = 0;       // assignments over capacity
};

class MoeLayer {
 public:
  MoeLayer(const ModelDims& dims, const std::string& prefix);
  // x [T, C] → y [T, C] = MoE(x) (+ residual when given), written.
  void Forward(const Tensor& x, Tensor& y, const Tensor* residual = nullptr);
  // dy [T, C] → dx [T, C] (written). loss_scale: weight of router_loss() in
  // the loss being differentiated.
  void Backward(const Tensor& x, const Tensor& dy, Tensor& dx, double loss_scale);
  double router_loss() const { return router_loss_; }
  const RoutingStats& stats() const { return stats_; }
  // Bias balancing: applies b_e += γ·sign(mean − load_e) with the loads of the
  // backward passes since the last call; a no-op without bias_balancing.
  void UpdateBias();
  const std::vector<double>& bias() const { return bias_; }
  void set_bias(const std::vector<double>& bias);  // a checkpoint's
  void ReleaseActivations();
  void CollectParams(ParamList& out);

 private:
  // One routed expert's SwiGLU weights (model/mlp.h's, the same names and
  // initialisation): W_gate, W_up [F, C], W_down [C, F].
  struct Expert {
    Param w_gate, w_up, w_down;
  };
  ModelDims expert_dims_;  // dims with ffn = moe.ffn; SwigluMlp keeps a reference
  MoeDims moe_;
  ops::MoeRouterOptions options_;
  Param router_;  // [E, C]
  std::vector<Expert> experts_;  // experts_[i]: expert first + i
  std::vector<std::unique_ptr<SwigluMlp>> shared_;
  Communicator* ep_ = nullptr;
  int first_expert_ = 0;
  std::vector<double> bias_;            // [E] selection bias
  std::vector<int64_t> pending_load_;   // [E] loads since the last UpdateBias
  double router_loss_ = 0;
  RoutingStats stats_;
  // Activations of the last Forward (S: this rank's kept assignments, R: the
  // rows of its local experts; S = R without ep).
  Tensor logits_;                               // [T, E]
  ops::MoeRouting routing_;
  std::vector<int64_t> global_load_;            // [E] load summed over the stats group
  int64_t global_tokens_ = 0;                   // N
  ops::MoePermutation perm_;                    // rows [T, k], counts [E]
  std::unique_ptr<ExpertExchange> exchange_;
  Tensor expert_x_;                             // [R, C] local experts' inputs, expert-major
  Tensor expert_gates_;                         // [R, 1] their rows' gates (routing_.gates' dtype)
  Tensor gate_, up_, h_;                        // [R, F]; h_ scaled by the row's gate

  std::vector<const Tensor*> ExpertWeights(Param Expert::*which) const;
  std::vector<Tensor*> ExpertGrads(Param Expert::*which);
};

}  // namespace loom
