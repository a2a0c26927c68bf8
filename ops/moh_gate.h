// MoH gates (model/moh.h; Jin et al. 2024): what sits between the router
// logits and the attention heads of an H or R layer, per token t.
//
//   s_t = Softmax(z_s,t)  [S]    shared scores (z_s = W_s x, the caller's linear)
//   α_t = Softmax(z_h,t)  [2]    (z_h = W_h x)
//   (e_tj, p_tj), j < k          the routed heads kept by ops/moe_router.h and their p
//   g_ti     = α1_t s_ti                 shared heads i < S
//   g_t,S+e  = α2_t p_tj  (e = e_tj)     kept routed heads, every other routed head 0
// A layer with one kind of head has no z_h (that kind's α is 1); fixed_gates:
// g = 1 for shared and kept heads (no z_s, no z_h).
//
// Backward from dg [T, H] (written outputs):
//   dα1 = Σ_i dg_ti s_ti,   ds_ti = α1 dg_ti,   dz_s = s ⊙ (ds − Σ_i ds_i s_i)
//   dα2 = Σ_j dg_t,S+e_tj p_tj,   dp_tj = α2 dg_t,S+e_tj (the router's dgates)
//   dz_h = α ⊙ (dα − Σ dα α)
//
// Active mask (what the attention ops skip): i32 [H, ceil(T / block)],
//   active[h, b] = 1 if h < S or some token of block b keeps h.
// Head gating on o [T, H, D] (or [T, H·D]):
//   out_th = g_th o_th;   backward d_o_th = g_th dout_th, dg_th = dout_th · o_th.
//
// Dtypes: CPU tensors all of one floating dtype (f32, f64). CUDA tensors
// (ops/cuda/moh_gate.cu): logits, their gradients, o, out, dout, d_o in the
// activations' dtype (f32 or bf16); scores, α, p, gates and their gradients
// f32 (statistics are f32 on the GPU); experts and the mask i32. Outputs that
// are undefined are allocated on the inputs' device.
#pragma once

#include <cstdint>

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct MohGateOptions {
  int heads = 0;   // H
  int shared = 0;  // S; the routed heads are the other H − S
  int top_k = 0;   // k (unused without routed heads)
  bool fixed_gates = false;
};

// shared_logits [T, S] (undefined when fixed_gates or S = 0), alpha_logits
// [T, 2] (undefined when the layer has one kind of head or fixed gates),
// experts i32 [T, k] and routed_gates [T, k] (undefined when S = H).
// gates [T, H] (allocated by the caller: its device and dtype decide) and
// shared_scores [T, S], alpha [T, 2] (kept for the backward; allocated here,
// undefined without their logits) written.
void MohGatesForward(const Tensor& shared_logits, const Tensor& alpha_logits, const Tensor& experts,
                     const Tensor& routed_gates, const MohGateOptions& options, Tensor& shared_scores, Tensor& alpha,
                     Tensor& gates);
// dgates [T, H] → dshared_logits [T, S], dalpha_logits [T, 2] (each written
// when its forward input was defined) and drouted_gates [T, k] (written when
// there are routed heads); outputs left undefined are allocated (CUDA:
// give the logit gradients, whose dtype is the activations'). With
// fixed_gates nothing has a gradient: no call.
void MohGatesBackward(const Tensor& shared_scores, const Tensor& alpha, const Tensor& experts,
                      const Tensor& routed_gates, const Tensor& dgates, const MohGateOptions& options,
                      Tensor& dshared_logits, Tensor& dalpha_logits, Tensor& drouted_gates);
// active i32 [H, ceil(tokens / block)] written; experts undefined: no routed heads.
void MohActiveMask(const Tensor& experts, const MohGateOptions& options, int64_t tokens, int64_t block,
                   Tensor& active);

// o [T, H·D] (any shape of that many elements), gates [T, H]; out written (may alias o).
void ApplyHeadGates(const Tensor& o, const Tensor& gates, Tensor& out);
// d_o written (may alias dout), dgates [T, H] written.
void HeadGatesBackward(const Tensor& o, const Tensor& gates, const Tensor& dout, Tensor& d_o, Tensor& dgates);
// x [T, H, D]: x_th = 0 where active[h, t / block] = 0 (for attention kernels
// that compute every head: their outputs then equal a skipping kernel's).
void ZeroInactiveHeads(const Tensor& active, int64_t block, Tensor& x);

namespace cuda {
// The same on CUDA tensors (dtypes above), on `stream`; no synchronisation.
void MohGatesForward(const Tensor& shared_logits, const Tensor& alpha_logits, const Tensor& experts,
                     const Tensor& routed_gates, const MohGateOptions& options, Tensor& shared_scores, Tensor& alpha,
                     Tensor& gates, CudaStream stream = nullptr);
void MohGatesBackward(const Tensor& shared_scores, const Tensor& alpha, const Tensor& experts,
                      const Tensor& routed_gates, const Tensor& dgates, const MohGateOptions& options,
                      Tensor& dshared_logits, Tensor& dalpha_logits, Tensor& drouted_gates, CudaStream stream = nullptr);
void MohActiveMask(const Tensor& experts, const MohGateOptions& options, int64_t tokens, int64_t block,
                   Tensor& active, CudaStream stream = nullptr);
void ApplyHeadGates(const Tensor& o, const Tensor& gates, Tensor& out, CudaStream stream = nullptr);
void HeadGatesBackward(const Tensor& o, const Tensor& gates, const Tensor& dout, Tensor& d_o, Tensor& dgates,
                       CudaStream stream = nullptr);
void ZeroInactiveHeads(const Tensor& active, int64_t block, Tensor& x, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
