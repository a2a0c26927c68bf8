// Context-parallel softmax (and sigmoid) attention over a zig-zag layout
// (parallel/zigzag.h): `parallel.cp_softmax = ring | allgather | ulysses`.
// Each call equals ops::SoftmaxAttentionForward/Backward on the full
// sequence, restricted to this rank's tokens.
//
// Shapes (local, token-major, as the layers hold them; T = rows·2C):
//   q, o, d_o, dq [T, Hq, D]   k, v, dk, dv [T, Hk, D]   lse [T, Hq]
//   local_rows: the local Batch's token_rows (uniform rows of 2C tokens;
//   doc_ids [T] optional, the row's global ids).
//   options: causal, scale, sigmoid, sigmoid_bias as for the layer;
//   q_offset and k_offset must be 0 (the schemes set them per chunk).
// Query chunk u (global index) and key chunk w of one row are one call of
// the single-process op with q_offset = u·C, k_offset = w·C; under a causal
// mask the pair is skipped when w > u (fully masked).
//
// ring (Ring Attention, Liu et al., zig-zag as in Megatron-CP / zigzag ring
// flash attention): step s = 0..cp−1, rank p holds the K/V chunks of rank
// p−s; every K/V message is one chunk of one row, [C, Hk, D]. The next step's
// blocks are received (StartRecv) while the current ones are computed.
//   Forward, softmax: partials (o_b, lse_b) of each block merge as
//     m = max(lse, lse_b), lse' = m + log(e^(lse−m) + e^(lse_b−m)),
//     o' = (e^(lse−m) o + e^(lse_b−m) o_b) / (e^(lse−m) + e^(lse_b−m));
//   sigmoid: o' = o + o_b (no normaliser).
//   Backward: with the final o and lse, P = exp(S − lse) is the global
//   probability, so the op's backward on one (query chunk, key block) pair
//   gives that pair's exact share of dq, dk, dv (Δ = rowsum(dO ⊙ O) uses the
//   global O). dq sums locally; dK/dV accumulators travel round the ring
//   with the K/V (a block's accumulator arrives from p−1, gets this rank's
//   share, leaves for p+1) and come home after cp hops.
//
// allgather (LASP-2H): one all-gather of [K|V] (the Hk KV heads only),
// then the local query chunks against every visible key chunk, merged as in
// ring. Backward: gathered again (unless keep_gathered kept it in `saved`),
// the pairs' dK/dV summed into a [cp, T, Hk, D] buffer in the gather's
// rank-major order, and one reduce-scatter of [dK|dV] brings each rank its
// own keys' gradient.
//
// ulysses (DeepSpeed-Ulysses): one all-to-all turns [q|k|v] sequence shards
// into head shards (rank p: query heads [p·Hq/cp, (p+1)·Hq/cp) and KV heads
// [p·Hk/cp, ...) of the whole sequence), the single-process op runs on the
// full rows, one all-to-all brings [o|lse] back. Backward: all-to-all of d_o,
// the op's backward on the saved head shards, all-to-all of [dq|dk|dv].
// Needs Hq and Hk divisible by cp. The doc ids of the full rows come from one
// small all-gather of the local ids (forward only; saved).
//
// What a layer saves for backward: its local q, k, v, o, lse (as without
// CP) and the CpAttentionSaved filled by the forward (empty for ring and for
// allgather without keep_gathered; ulysses keeps the head shards, which are
// the same size as the local q, k, v, o, lse). Call Release() (or drop it)
// after backward.
#pragma once

#include <string_view>

#include "ops/attention_seqs.h"
#include "ops/softmax_attention.h"
#include "parallel/communicator.h"
#include "parallel/zigzag.h"

namespace loom {

enum class CpSoftmaxScheme { kRing, kAllGather, kUlysses };
// "ring" | "allgather" | "ulysses" (parallel.cp_softmax).
absl::StatusOr<CpSoftmaxScheme> ParseCpSoftmaxScheme(std::string_view name);
const char* CpSoftmaxSchemeName(CpSoftmaxScheme scheme);

struct CpAttentionOptions {
  CpSoftmaxScheme scheme = CpSoftmaxScheme::kRing;
  bool keep_gathered = false;         // allgather: keep [K|V] from forward to backward
  CpMemoryLedger* ledger = nullptr;   // optional: count the buffers held
};

struct CpAttentionSaved {
  Tensor gathered_kv;  // allgather + keep_gathered: [cp, 2, T, Hk, D]
  // ulysses: head shards of the full rows, [rows·N, H/cp, D] ([rows·N, Hq/cp] for lse)
  Tensor q_heads, k_heads, v_heads, o_heads, lse_heads;
  Tensor global_doc_ids;  // ulysses: [rows·N] i32 (if the rows have documents)
  int64_t bytes() const;
  void Release(CpMemoryLedger* ledger = nullptr);  // drops the tensors (and their ledger count)
};

// Refuses what a scheme cannot do, with the numbers and what to change
// (ulysses: heads and KV heads divisible by cp).
absl::Status CheckCpAttention(CpSoftmaxScheme scheme, int cp, int64_t heads, int64_t kv_heads);

// o and lse are written (lse: softmax only; it may be undefined for sigmoid).
absl::Status CpAttentionForward(Communicator& cp_group, const CpAttentionOptions& cp, const CpChunks& layout,
                                const Tensor& q, const Tensor& k, const Tensor& v, const ops::TokenRows& local_rows,
                                const ops::AttentionOptions& options, Tensor& o, Tensor& lse,
                                CpAttentionSaved* saved);

// dq, dk, dv written. `saved` is what the forward filled (may be nullptr for
// ring and for allgather without keep_gathered).
absl::Status CpAttentionBackward(Communicator& cp_group, const CpAttentionOptions& cp, const CpChunks& layout,
                                 const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                 const Tensor& lse, const Tensor& d_o, const ops::TokenRows& local_rows,
                                 const ops::AttentionOptions& options, CpAttentionSaved* saved, Tensor& dq,
                                 Tensor& dk, Tensor& dv);

}  // namespace loom
