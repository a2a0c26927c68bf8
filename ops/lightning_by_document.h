// Lightning attention (ops/lightning_attention.h) with documents inside a
// row or a chunk, composed from calls without documents: the CUDA kernels
// take no doc_ids, and the ops run these for them on the GPU (a packed text
// batch has documents inside its rows). The same math, since a state
// resets where the document changes:
// - the fused calls run each document as a row of its own: a row's
//   state_in goes to its first document and d_state_out to its last;
//   state_out comes from its last document and d_state_in from its first;
// - the chunk phases (LASP's) run on token ranges: the chunk state on the
//   chunk's last document, the intra-chunk output on each document, the
//   inter-chunk output on the tokens before the first boundary.
// Arguments, shapes and "written"/"accumulated" as in the ops. On the CPU
// the ops take doc_ids themselves; tests hold these to them.
#pragma once

#include "ops/lightning_attention.h"

namespace loom::ops::by_document {

void LightningAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                               const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                               Tensor& o, Tensor& state_out);
void LightningAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                                const Tensor& d_o, const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv,
                                Tensor& d_state_in);

bool LightningChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m);
void LightningChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                 const Tensor& dm, Tensor& dk, Tensor& dv);
void LightningIntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                         const Tensor& doc_ids, Tensor& o);
void LightningIntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv);
void LightningInterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o);
void LightningInterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                 const Tensor& d_o, Tensor& dq, Tensor& ds);

}  // namespace loom::ops::by_document
