// Lightning attention (Lightning Attention-2): causal linear attention with a
// per-head decay λ_h, no 1/√d scale, no feature map (the layer applies SiLU).
// For one head, positions r ≥ s of one document:
//   o_r = Σ_{s≤r} λ^(r−s) (q_r·k_s) v_s  +  [r in the row's first document] λ^(r+1) q_r S0
// and the final state S = Σ_{s in the last document} λ^(N−1−s) k_sᵀ v_s
// (+ λ^N S0 when the last document is the first).
//   q, k [T, H, Dk], v [T, H, Dv], o [T, H, Dv], decay [H] (λ_h ∈ (0, 1]),
//   states [R, H, Dk, Dv], one per row; all in the compute dtype (f32 on CPU
//   training: the state is fp32).
//
// The block algorithm works on blocks of `block` tokens: inside a block the
// masked left product [(Q Kᵀ) ⊙ M] V, M[r,c] = λ^(r−c) (r ≥ c, same document);
// across blocks the right product with the running state. DESIGN.md's three
// phases are exposed on one chunk (a contiguous token range of one row) so
// that LASP-2 can overlap its all-gather with them; the fused call is built
// from them.
#pragma once

#include <vector>

#include "ops/attention_seqs.h"
#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

// λ_h of DESIGN.md: ALiBi slopes for `heads` (interleaving the two nearest
// powers of two when heads is not one), scaled for layer l of L by
// (1 − l/(L−1) + 1e−5) (factor 1 when L = 1), λ = exp(−slope).
std::vector<double> AlibiSlopes(int heads);
std::vector<double> LightningDecay(int heads, int layer, int layers);

struct LightningOptions {
  int block = 64;  // tokens per block of the block algorithm
  // MoH (model/moh.h): which (head, block) outputs are computed. i32
  // [H, ceil(T / block)] on q's device, non-zero = computed; block b holds
  // the tokens [b·block, (b+1)·block) of q. An inactive pair's o is 0 and
  // its d_o is read as 0; its k, v still enter the state. A block of the
  // block algorithm whose tokens are all inactive is skipped (rows starting
  // at multiples of `block` make the two kinds of blocks the same).
  // Undefined: everything is computed. Fused calls only. CUDA: the bf16
  // kernels skip a 64-token chunk with no active token; the f32 kernels
  // compute everything and zero the inactive outputs (same results).
  Tensor active;
};

// Fused call over all rows. state_in (optional, undefined = zero) and
// state_out are [R, H, Dk, Dv].
void LightningAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                               const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                               Tensor& o, Tensor& state_out);
// d_state_out optional (undefined = zero); d_state_in written if defined.
// dq, dk, dv written.
void LightningAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                                const Tensor& d_o, const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv,
                                Tensor& d_state_in);

// The O(n²) definition, the reference the block algorithm is held to.
void LightningAttentionNaive(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                             const TokenRows& rows, const Tensor& state_in, Tensor& o, Tensor& state_out);

// ---- Phases on one chunk: q, k [C, H, Dk], v [C, H, Dv], doc_ids [C]
// (optional). "Boundary": a token whose document id differs from its
// predecessor's in the chunk.

// (1) Chunk memory state with zero initial state:
//     M = Σ_{j after the last boundary} λ^(C−1−j) k_jᵀ v_j   [H, Dk, Dv].
// Returns whether the chunk has a boundary.
bool LightningChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m);
void LightningChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                 const Tensor& dm, Tensor& dk, Tensor& dv);  // dk, dv accumulated

// (2) Intra-chunk output: o_i = Σ_{j≤i, same doc} λ^(i−j) (q_i·k_j) v_j (written).
void LightningIntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                         const Tensor& doc_ids, Tensor& o);
void LightningIntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk,
                                 Tensor& dv);  // accumulated

// (3) Inter-chunk output from a given state S [H, Dk, Dv]:
//     o_i += λ^(i+1) q_i S for i before the chunk's first boundary.
void LightningInterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o);
void LightningInterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                 const Tensor& d_o, Tensor& dq, Tensor& ds);  // accumulated

// ---- CUDA kernels (ops/cuda/lightning_attention.cu), sm_90a ----
// Same math and argument order as above, with these types: q, k, v, o, d_o,
// dq, dk, dv bf16 [T, H, D] on one CUDA device, Dk = Dv = D in {64, 128};
// decay f32 [H] on that device (λ in (0, 1], not checked there); states,
// m, s, dm, ds f32 on the device. cu_seqlens stays a CPU tensor (the
// launcher plans segments on the host); doc_ids are refused with an error
// (the ops run them per document: ops/lightning_by_document.h). active (optional): MoH's mask,
// LightningOptions::active on the device with its block. Outputs are allocated by the caller;
// "written" and "accumulated" as above (o of the inter phase, dq/dk/dv of
// the phases' backwards and ds accumulate in place). Everything runs on
// `stream`, asynchronously. The workspace holds device scratch (the
// per-segment states, 64 KiB per 1,024 tokens and head at D = 128) and the
// uploaded segment plan; it grows on first use (cudaMalloc, which
// synchronises), so keep one per stream across calls.
namespace cuda {

struct LightningWorkspace {
  Tensor buffer;                    // device scratch, f32
  std::vector<int32_t> planned_cu;  // the cu_seqlens whose plan is in buffer
};

void LightningAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                               const TokenRows& rows, const Tensor& state_in, Tensor& o, Tensor& state_out,
                               LightningWorkspace& workspace, CudaStream stream, const Tensor& active = Tensor(),
                               int64_t active_block = 64);
void LightningAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const TokenRows& rows, const Tensor& state_in, const Tensor& d_o,
                                const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_state_in,
                                LightningWorkspace& workspace, CudaStream stream, const Tensor& active = Tensor(),
                                int64_t active_block = 64);
bool LightningChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m,
                         LightningWorkspace& workspace, CudaStream stream);
void LightningChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                 const Tensor& dm, Tensor& dk, Tensor& dv, LightningWorkspace& workspace,
                                 CudaStream stream);
void LightningIntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                         const Tensor& doc_ids, Tensor& o, LightningWorkspace& workspace, CudaStream stream);
void LightningIntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv,
                                 LightningWorkspace& workspace, CudaStream stream);
void LightningInterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o,
                         CudaStream stream);
void LightningInterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                 const Tensor& d_o, Tensor& dq, Tensor& ds, LightningWorkspace& workspace,
                                 CudaStream stream);

// f32 kernels (ops/cuda/lightning_attention_f32.cu) for fp32 GPU runs: the
// fused calls and the chunk phases, every product an f32 FMA (no tensor cores, so they agree
// with the CPU to about 1e-5). q, k, v, o, d_o, dq, dk, dv f32 [T, H, D],
// Dk = Dv = D in {16, 32, 64, 128}; decay, states and their gradients f32,
// all on one CUDA device; cu_seqlens on the host, rows tiling [0, T); no
// doc_ids. Outputs written; runs on `stream` with stream-ordered scratch.
void LightningAttentionF32Forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                  const TokenRows& rows, const Tensor& state_in, Tensor& o, Tensor& state_out,
                                  CudaStream stream = nullptr);
void LightningAttentionF32Backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                   const TokenRows& rows, const Tensor& state_in, const Tensor& d_o,
                                   const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_state_in,
                                   CudaStream stream = nullptr);
// The three phases on one chunk, f32 (what LASP-1/2 call on the GPU): same
// math, "written" and "accumulated" as the CPU phases; no doc_ids.
bool LightningF32ChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m,
                            CudaStream stream = nullptr);
void LightningF32ChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                    const Tensor& dm, Tensor& dk, Tensor& dv, CudaStream stream = nullptr);
void LightningF32IntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                            const Tensor& doc_ids, Tensor& o, CudaStream stream = nullptr);
void LightningF32IntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                    const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv,
                                    CudaStream stream = nullptr);
void LightningF32InterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o,
                            CudaStream stream = nullptr);
void LightningF32InterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                    const Tensor& d_o, Tensor& dq, Tensor& ds, CudaStream stream = nullptr);

}  // namespace cuda

}  // namespace loom::ops
