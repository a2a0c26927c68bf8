// MoE router: scores, top-k selection, gate weights and the router losses.
//
//   logits  z = x W_rᵀ                               [T, E]  (the caller's linear)
//   scores  s = softmax(z) or sigmoid(z)            [T, E]
//   select  the k experts of largest s_te + b_e per token (b: balancing bias,
//           selection only, no gradient); ties go to the lower expert index
//   gates   g_tj = s_t,e(j), or with normalize_top_k g_tj = s_t,e(j) / Σ_l s_t,e(l)
//
// Load-balancing loss (Switch / GShard), f_e held constant:
//   f_e = load_e / (T·k)   (load_e: assignments of tokens to e)
//   P_e = (1/T) Σ_t p_te,  p = s for softmax, p = s / Σ_e s_te for sigmoid
//   aux = E · Σ_e f_e P_e            (1 when perfectly balanced)
// Router z-loss (ST-MoE): z = (1/T) Σ_t logsumexp(z_t)².
// Bias balancing (auxiliary-loss-free, DeepSeek-V3), after each step:
//   b_e += γ · sign(mean_e load − load_e)
//
// Backward: dlogits (written) from dgates [T, k] and the seeds daux, dz
// (the coefficients of aux and z in the loss):
//   ds_te  = daux · E f_e / T (through P, with the sigmoid's normalisation)
//          + Σ_j [e = e(j)] dg_tj  (through the gates, with normalisation:
//            ds_e(j) = (dg_tj − Σ_l dg_tl g_tl) / Σ_l s_t,e(l))
//   dz_te  = softmax: s_te (ds_te − Σ_e' ds_te' s_te');  sigmoid: ds_te s_te (1 − s_te)
//          + dz · 2 lse_t softmax(z_t)_e / T
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct MoeRouterOptions {
  int experts = 0;
  int top_k = 1;
  bool sigmoid = false;          // scores: sigmoid (true) or softmax
  bool normalize_top_k = false;  // gates sum to 1 over a token's k experts
};

struct MoeRouting {
  Tensor scores;                 // [T, E] s
  Tensor experts;                // [T, k] i32 chosen experts, best first
  Tensor gates;                  // [T, k] g
  Tensor lse;                    // [T]    logsumexp of the logits
  std::vector<int64_t> load;     // [E] assignments per expert
  std::vector<double> mean_prob; // [E] P_e
  double aux_loss = 0;           // E Σ f_e P_e
  double z_loss = 0;             // mean lse²
};

// logits [T, E] f32/f64 (CPU), f32/bf16 (CUDA, below). bias: empty or E values added to the scores for the
// selection only.
void MoeRouterForward(const Tensor& logits, const std::vector<double>& bias, const MoeRouterOptions& options,
                      MoeRouting& out);
// dgates [T, k] (zero where an assignment was dropped); dlogits [T, E] written.
void MoeRouterBackward(const Tensor& logits, const MoeRouting& routing, const Tensor& dgates, double daux,
                       double dz, const MoeRouterOptions& options, Tensor& dlogits);
// b_e += rate · sign(mean load − load_e).
void MoeBiasUpdate(const std::vector<int64_t>& load, double rate, std::vector<double>& bias);

namespace cuda {
// CUDA (ops/cuda/moe_router.cu), the same math and tie rule: logits and
// dlogits in the activations' dtype (f32 or bf16), scores, gates, lse and
// dgates f32 (statistics are f32 on the GPU), scores computed in f32 and
// compared as s + b in f64. One thread a token; the [E] statistics (load,
// Σ_t p_te, Σ_t lse²) are summed per expert in a fixed order (f64) and
// copied to the host, the one synchronisation of the router.
void MoeRouterForward(const Tensor& logits, const std::vector<double>& bias, const MoeRouterOptions& options,
                      MoeRouting& out, CudaStream stream = nullptr);
void MoeRouterBackward(const Tensor& logits, const MoeRouting& routing, const Tensor& dgates, double daux,
                       double dz, const MoeRouterOptions& options, Tensor& dlogits, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
