// Context-parallel lightning attention over a zig-zag layout
// (parallel/zigzag.h): `parallel.cp_linear = lasp1 | lasp2`. Each call equals
// ops::LightningAttentionForward/Backward on the full rows (zero initial
// state, no final state), restricted to this rank's tokens.
//
// Shapes (local, token-major; T = rows·2C): q, k, dq, dk [T, H, Dk],
// v, o, d_o, dv [T, H, Dv], decay [H] (λ_h ∈ (0, 1]); states [H, Dk, Dv] per
// row and chunk. local_rows: the local Batch's token_rows (doc_ids optional,
// the row's global ids); layout.starts_document says which chunks begin a
// document at their first token.
//
// Math (DESIGN.md, LASP-2 with decay). Chunk u of a row (global index,
// u = 0..2cp−1), local position j, λ = λ_h:
//   M_u   = Σ_{j ≥ last document start inside u} λ^(C−1−j) k_jᵀ v_j   (LightningChunkState)
//   cut_u = u has a boundary inside it, or u starts a document (u = 0 does)
//   S_0 = 0,  S_{u+1} = M_u + [not cut_u] λ^C S_u      (the state entering chunk u+1)
//         = Σ_{a ≤ w ≤ u} λ^(C(u−w)) M_w, a the last chunk ≤ u with a cut
//   o_i   = intra_i + [u does not start a document] [i before u's first
//           inner boundary] λ^(i+1) q_i S_u           (LightningIntraChunk, LightningInterChunk)
// Backward, with dS_u = Σ_i λ^(i+1) q_iᵀ do_i over the same i (the inter
// phase's d-state, 0 if u starts a document) and G_u = ∂L/∂S_u:
//   G_{2cp} = 0,  G_u = dS_u + [not cut_u] λ^C G_{u+1}
//   ∂L/∂M_u = G_{u+1} = Σ_{t > u} λ^(C(t−1−u)) dS_t over t up to the first
//             cut after u (t itself may have one: S_t is still read)
//   dk_j, dv_j of chunk u += LightningChunkStateBackward(dM = G_{u+1});
//   dq += inter backward with S_u; intra backward is local.
//
// lasp1 (a chain): the owner of chunk u receives S_u from the owner of
// u−1 and sends S_{u+1} to the owner of u+1: 0 → 1 → … → cp−1 → (cp−1's own
// chunk cp) → cp−2 → … → 0. The intra phase and M_u are computed before
// waiting. Backward passes G the other way. Every message is one state
// [rows, H, Dk, Dv]; ranks keep their incoming S_u for backward.
//
// lasp2: each rank computes M_u for its two chunks per row, then ONE
// all-gather of [M_u | cut_u] ([2, rows, H·Dk·Dv + 1] per rank) is started
// and the intra phase runs while it travels (overlap); then each rank forms
// its chunks' S_t with the decay weights and adds the inter term. Backward:
// the local dS_t of both chunks go out in ONE all-gather ([2, rows, H·Dk·Dv]
// per rank, started before the intra backward runs), and each rank forms
// G_{u+1} for its chunks from all dS_t and the cut flags of the forward. (A
// reduce-scatter of per-chunk G contributions would move the same bytes;
// the all-gather keeps the sums in one place and in chunk order.) Exact for
// λ < 1 and λ = 1 (only powers of λ appear).
//
// What a layer saves for backward: its local q, k, v (as without CP) and the
// CpLightningSaved of the forward: the entering states S_u of its two chunks
// per row ([2, rows, H, Dk, Dv], slot-major) and, for lasp2, the 2cp cut flags per row.
#pragma once

#include <string_view>

#include "ops/attention_seqs.h"
#include "parallel/communicator.h"
#include "parallel/zigzag.h"

namespace loom {

enum class CpLinearScheme { kLasp1, kLasp2 };
// "lasp1" | "lasp2" (parallel.cp_linear).
absl::StatusOr<CpLinearScheme> ParseCpLinearScheme(std::string_view name);
const char* CpLinearSchemeName(CpLinearScheme scheme);

struct CpLightningOptions {
  CpLinearScheme scheme = CpLinearScheme::kLasp2;
  CpMemoryLedger* ledger = nullptr;  // optional: count the buffers held
};

struct CpLightningSaved {
  Tensor entering;            // S_u of (local chunk s, row r) at s·rows + r: [2·rows, H, Dk, Dv]
  std::vector<uint8_t> cuts;  // lasp2: cut_u of every chunk, [rows, 2cp]
  void Release(CpMemoryLedger* ledger = nullptr);
};

// o written.
absl::Status CpLightningForward(Communicator& cp_group, const CpLightningOptions& cp, const CpChunks& layout,
                                const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const ops::TokenRows& local_rows, Tensor& o, CpLightningSaved* saved);

// dq, dk, dv written; `saved` is what the forward filled.
absl::Status CpLightningBackward(Communicator& cp_group, const CpLightningOptions& cp, const CpChunks& layout,
                                 const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const ops::TokenRows& local_rows, const Tensor& d_o, CpLightningSaved* saved,
                                 Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace loom
