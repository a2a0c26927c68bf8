// ops/lightning_by_document.h: the lightning ops on pieces without
// documents (rows of their own, token ranges of a chunk).
#include "ops/lightning_by_document.h"

#include <utility>
#include <vector>

namespace loom::ops::by_document {
namespace {

// A per-row state [R, …] moved to per-document rows [N, …]: row r's to its
// first (or last) document, zeros elsewhere; undefined stays undefined.
Tensor StateToDocuments(const Tensor& state, const DocumentRows& docs, bool last) {
  if (!state.defined()) return state;
  Shape shape = state.shape();
  shape[0] = docs.first.back();
  Tensor out = Tensor::Zeros(shape, state.dtype(), state.device());
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(docs.first.size()); ++r) {
    Tensor to = out.Slice(last ? docs.first[r + 1] - 1 : docs.first[r], 1);
    to.CopyFrom(state.Slice(r, 1));
  }
  return out;
}

// The other way: row r's state from its first (or last) document, into
// `state` (allocated like per_doc when undefined).
void StateFromDocuments(const Tensor& per_doc, const DocumentRows& docs, bool last, Tensor& state) {
  const int64_t rows = static_cast<int64_t>(docs.first.size()) - 1;
  if (!state.defined()) {
    Shape shape = per_doc.shape();
    shape[0] = rows;
    state = Tensor::Empty(shape, per_doc.dtype(), per_doc.device());
  }
  for (int64_t r = 0; r < rows; ++r) {
    Tensor to = state.Slice(r, 1);
    to.CopyFrom(per_doc.Slice(last ? docs.first[r + 1] - 1 : docs.first[r], 1));
  }
}

// A chunk's documents as token ranges [begin, end), in order (none for an
// empty chunk).
std::vector<std::pair<int64_t, int64_t>> ChunkDocuments(const Tensor& doc_ids, int64_t tokens) {
  LOOM_CHECK(doc_ids.dtype() == DType::kI32 && doc_ids.shape() == Shape{tokens} && doc_ids.device().is_cpu(),
             "[lightning_attention] chunk doc_ids must be a CPU i32 [C] tensor, C = ", tokens);
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const int32_t* id = doc_ids.data<int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (t == 0 || id[t] != id[t - 1]) ranges.emplace_back(t, t);
    ranges.back().second = t + 1;
  }
  return ranges;
}

// t, or a new tensor of `shape` on like's device in like's dtype (zeros
// when `zero`): a token-indexed output filled through slices.
Tensor& Ready(Tensor& t, const Shape& shape, const Tensor& like, bool zero) {
  if (!t.defined())
    t = zero ? Tensor::Zeros(shape, like.dtype(), like.device()) : Tensor::Empty(shape, like.dtype(), like.device());
  return t;
}

Tensor Range(const Tensor& t, std::pair<int64_t, int64_t> r) { return t.Slice(r.first, r.second - r.first); }

}  // namespace

void LightningAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                               const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                               Tensor& o, Tensor& state_out) {
  const DocumentRows docs = SplitAtDocuments(rows);
  Tensor doc_state_out;
  ops::LightningAttentionForward(q, k, v, decay, docs.rows, options, StateToDocuments(state_in, docs, false), o,
                                 doc_state_out);
  StateFromDocuments(doc_state_out, docs, /*last=*/true, state_out);
}

void LightningAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                                const Tensor& d_o, const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv,
                                Tensor& d_state_in) {
  const DocumentRows docs = SplitAtDocuments(rows);
  Tensor doc_d_state_in;
  if (d_state_in.defined()) doc_d_state_in = StateToDocuments(d_state_in, docs, false);  // shaped for the call
  ops::LightningAttentionBackward(q, k, v, decay, docs.rows, options, StateToDocuments(state_in, docs, false), d_o,
                                  StateToDocuments(d_state_out, docs, true), dq, dk, dv, doc_d_state_in);
  if (d_state_in.defined()) StateFromDocuments(doc_d_state_in, docs, /*last=*/false, d_state_in);
}

bool LightningChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m) {
  const auto docs = ChunkDocuments(doc_ids, k.dim(0));
  if (docs.empty()) return ops::LightningChunkState(k, v, decay, Tensor(), m);
  ops::LightningChunkState(Range(k, docs.back()), Range(v, docs.back()), decay, Tensor(), m);
  return docs.size() > 1;
}

void LightningChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                 const Tensor& dm, Tensor& dk, Tensor& dv) {
  const auto docs = ChunkDocuments(doc_ids, k.dim(0));
  Ready(dk, k.shape(), k, true);
  Ready(dv, v.shape(), v, true);
  if (docs.empty()) return;
  Tensor dk_last = Range(dk, docs.back()), dv_last = Range(dv, docs.back());
  ops::LightningChunkStateBackward(Range(k, docs.back()), Range(v, docs.back()), decay, Tensor(), dm, dk_last,
                                   dv_last);
}

void LightningIntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                         const Tensor& doc_ids, Tensor& o) {
  Ready(o, v.shape(), v, false);
  for (const auto& doc : ChunkDocuments(doc_ids, q.dim(0))) {
    Tensor od = Range(o, doc);
    ops::LightningIntraChunk(Range(q, doc), Range(k, doc), Range(v, doc), decay, Tensor(), od);
  }
}

void LightningIntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv) {
  Ready(dq, q.shape(), q, true);
  Ready(dk, k.shape(), k, true);
  Ready(dv, v.shape(), v, true);
  for (const auto& doc : ChunkDocuments(doc_ids, q.dim(0))) {
    Tensor dqd = Range(dq, doc), dkd = Range(dk, doc), dvd = Range(dv, doc);
    ops::LightningIntraChunkBackward(Range(q, doc), Range(k, doc), Range(v, doc), decay, Tensor(), Range(d_o, doc),
                                     dqd, dkd, dvd);
  }
}

void LightningInterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o) {
  const auto docs = ChunkDocuments(doc_ids, q.dim(0));
  Ready(o, {q.dim(0), q.dim(1), s.dim(2)}, q, true);
  if (docs.empty()) return;
  Tensor first = Range(o, docs.front());
  ops::LightningInterChunk(Range(q, docs.front()), decay, Tensor(), s, first);
}

void LightningInterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                 const Tensor& d_o, Tensor& dq, Tensor& ds) {
  const auto docs = ChunkDocuments(doc_ids, q.dim(0));
  Ready(dq, q.shape(), q, true);
  if (docs.empty()) {
    ops::LightningInterChunkBackward(q, decay, Tensor(), s, d_o, dq, ds);
    return;
  }
  Tensor first = Range(dq, docs.front());
  ops::LightningInterChunkBackward(Range(q, docs.front()), decay, Tensor(), s, Range(d_o, docs.front()), first, ds);
}

}  // namespace loom::ops::by_document
