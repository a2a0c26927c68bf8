#include "parallel/cp_attention.h"

#include "ops/add.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace loom {
namespace {

constexpr int kNoPeer = -1;

// ---- Chunk views and the per-pair op calls ----

struct ChunkArgs {
  const CpChunks& layout;
  const ops::TokenRows& local_rows;
  const ops::AttentionOptions& options;
  int64_t c() const { return layout.chunk; }
};

Tensor View(const Tensor& t, const CpChunks& l, int64_t row, int slot) { return t.Slice(l.offset(row, slot), l.chunk); }

// One row of C tokens with the chunk's doc ids (undefined: one document).
ops::TokenRows ChunkRows(int64_t c, const Tensor& docs) {
  ops::TokenRows r = ops::TokenRows::Uniform(1, c);
  r.doc_ids = docs;
  return r;
}

// Whether query chunk u may see any key of chunk w: causal order, and
// overlapping document ranges (ids are non-decreasing within a row).
bool PairVisible(const ops::AttentionOptions& o, int64_t u, int64_t w, const Tensor& qdocs, const Tensor& kdocs) {
  if (o.causal && w > u) return false;
  if (qdocs.defined()) {
    const int32_t* qd = qdocs.data<int32_t>();
    const int32_t* kd = kdocs.data<int32_t>();
    const int64_t n = qdocs.numel(), m = kdocs.numel();
    if (kd[m - 1] < qd[0] || kd[0] > qd[n - 1]) return false;
  }
  return true;
}

ops::AttentionOptions PairOptions(const ops::AttentionOptions& o, int64_t u, int64_t w, int64_t c) {
  ops::AttentionOptions p = o;
  p.q_offset = u * c;
  p.k_offset = w * c;
  return p;
}

// o, lse (one query chunk) ⊕= a block's partial (o_b, lse_b): the LSE merge
// for softmax, a plain sum for sigmoid.
template <typename T>
void MergeTyped(bool sigmoid, Tensor& o, Tensor& lse, const Tensor& ob, const Tensor& lseb) {
  T* op = o.data<T>();
  const T* bp = ob.data<T>();
  const int64_t rows = o.dim(0) * o.dim(1), d = o.dim(2);
  if (sigmoid) {
    for (int64_t i = 0; i < rows * d; ++i) op[i] += bp[i];
    return;
  }
  T* l = lse.data<T>();
  const T* lb = lseb.data<T>();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    if (lb[i] == neg_inf) continue;  // this block shows the query nothing
    if (l[i] == neg_inf) {
      l[i] = lb[i];
      std::memcpy(op + i * d, bp + i * d, sizeof(T) * d);
      continue;
    }
    const T m = std::max(l[i], lb[i]);
    const T wa = std::exp(l[i] - m), wb = std::exp(lb[i] - m), sum = wa + wb;
    for (int64_t j = 0; j < d; ++j) op[i * d + j] = (wa * op[i * d + j] + wb * bp[i * d + j]) / sum;
    l[i] = m + std::log(sum);
  }
}

// CUDA tensors merge on their device (ops::cuda::MergeAttentionPartial, lse f32).
void Merge(bool sigmoid, Tensor& o, Tensor& lse, const Tensor& ob, const Tensor& lseb) {
  if (!o.device().is_cpu()) return ops::cuda::MergeAttentionPartial(sigmoid, o, lse, ob, lseb);
  LOOM_DISPATCH_FLOAT(o.dtype(), T, [&] { MergeTyped<T>(sigmoid, o, lse, ob, lseb); });
}

template <typename T>
void AddTyped(Tensor& dst, const Tensor& src) {
  T* d = dst.data<T>();
  const T* s = src.data<T>();
  for (int64_t i = 0; i < dst.numel(); ++i) d[i] += s[i];
}
void Add(Tensor& dst, const Tensor& src) {
  LOOM_CHECK(dst.numel() == src.numel() && dst.dtype() == src.dtype(), "[cp_attention] add of ",
             ShapeString(src.shape()), " to ", ShapeString(dst.shape()));
  if (!dst.device().is_cpu()) return ops::AddInPlace(dst, src);
  LOOM_DISPATCH_FLOAT(dst.dtype(), T, [&] { AddTyped<T>(dst, src); });
}

// The lse the op writes for q: q's dtype on the CPU, f32 on a GPU.
DType LseType(const Tensor& q) { return q.device().is_cpu() ? q.dtype() : DType::kF32; }

// Scratch of one (query chunk, key block) pair, on q's device.
struct PairScratch {
  HeldTensor o, lse, dq, dk, dv;
  PairScratch(CpMemoryLedger* l, const Tensor& q, int64_t c, int64_t hk, int64_t d, bool backward) {
    const int64_t hq = q.dim(1);
    const DType dt = q.dtype();
    const Device dev = q.device();
    if (!backward) {
      o = HeldTensor(l, {c, hq, d}, dt, false, true, dev);
      lse = HeldTensor(l, {c, hq}, LseType(q), false, true, dev);
    } else {
      dq = HeldTensor(l, {c, hq, d}, dt, false, true, dev);
      dk = HeldTensor(l, {c, hk, d}, dt, false, true, dev);
      dv = HeldTensor(l, {c, hk, d}, dt, false, true, dev);
    }
  }
};

// Query chunk (row, slot) of this rank against one key block of global
// chunk w: forward partial merged into o, lse.
void PairForward(const ChunkArgs& a, const Tensor& q, int64_t row, int slot, int64_t w, const Tensor& kb,
                 const Tensor& vb, const Tensor& kdocs, Tensor& o, Tensor& lse, PairScratch& s) {
  const int64_t u = a.layout.global_chunk(slot);
  const Tensor qdocs = a.local_rows.has_docs() ? View(a.local_rows.doc_ids, a.layout, row, slot) : Tensor();
  if (!PairVisible(a.options, u, w, qdocs, kdocs)) return;
  const ops::TokenRows qr = ChunkRows(a.c(), qdocs), kr = ChunkRows(a.c(), kdocs);
  ops::SoftmaxAttentionForward(View(q, a.layout, row, slot), kb, vb, qr, kr, PairOptions(a.options, u, w, a.c()),
                               s.o.t(), s.lse.t());
  Tensor oc = View(o, a.layout, row, slot);
  Tensor lc = a.options.sigmoid ? Tensor() : View(lse, a.layout, row, slot);
  Merge(a.options.sigmoid, oc, lc, s.o.t(), s.lse.t());
}

// The pair's share of the gradients: dq added to the local dq, dk/dv added
// to the block's accumulators. Returns false if the pair was skipped.
bool PairBackward(const ChunkArgs& a, const Tensor& q, const Tensor& o, const Tensor& lse, const Tensor& d_o,
                  int64_t row, int slot, int64_t w, const Tensor& kb, const Tensor& vb, const Tensor& kdocs,
                  Tensor& dq, Tensor& dk_acc, Tensor& dv_acc, PairScratch& s) {
  const int64_t u = a.layout.global_chunk(slot);
  const Tensor qdocs = a.local_rows.has_docs() ? View(a.local_rows.doc_ids, a.layout, row, slot) : Tensor();
  if (!PairVisible(a.options, u, w, qdocs, kdocs)) return false;
  const ops::TokenRows qr = ChunkRows(a.c(), qdocs), kr = ChunkRows(a.c(), kdocs);
  const Tensor lc = a.options.sigmoid ? Tensor() : View(lse, a.layout, row, slot);
  ops::SoftmaxAttentionBackward(View(q, a.layout, row, slot), kb, vb, View(o, a.layout, row, slot), lc,
                                View(d_o, a.layout, row, slot), qr, kr, PairOptions(a.options, u, w, a.c()),
                                s.dq.t(), s.dk.t(), s.dv.t());
  Tensor dqc = View(dq, a.layout, row, slot);
  Add(dqc, s.dq.t());
  Add(dk_acc, s.dk.t());
  Add(dv_acc, s.dv.t());
  return true;
}

void InitOutputs(const Tensor& q, const ops::AttentionOptions& options, Tensor& o, Tensor& lse) {
  if (!o.defined()) o = Tensor::Empty(q.shape(), q.dtype(), q.device());
  LOOM_CHECK(o.shape() == q.shape() && o.dtype() == q.dtype() && o.device() == q.device(), "[cp_attention] o is ",
             DTypeName(o.dtype()), " ", ShapeString(o.shape()), " on ", o.device().ToString(), ", expected ",
             DTypeName(q.dtype()), " ", ShapeString(q.shape()), " on ", q.device().ToString());
  o.Zero();
  if (!options.sigmoid) {
    if (!lse.defined()) lse = Tensor::Empty({q.dim(0), q.dim(1)}, LseType(q), q.device());
    LOOM_CHECK(lse.shape() == (Shape{q.dim(0), q.dim(1)}) && lse.dtype() == LseType(q) && lse.device() == q.device(),
               "[cp_attention] lse is ", DTypeName(lse.dtype()), " ", ShapeString(lse.shape()), ", expected ",
               DTypeName(LseType(q)), " [", q.dim(0), ", ", q.dim(1), "] on ", q.device().ToString());
    if (lse.device().is_cpu()) {
      lse.Fill(-std::numeric_limits<double>::infinity());
    } else {
      Tensor host = Tensor::Empty(lse.shape(), lse.dtype());
      host.Fill(-std::numeric_limits<double>::infinity());
      lse.CopyFrom(host);
    }
  }
}

void InitGrads(const Tensor& q, const Tensor& k, Tensor& dq, Tensor& dk, Tensor& dv) {
  for (auto [g, like] : {std::pair<Tensor*, const Tensor*>{&dq, &q}, {&dk, &k}, {&dv, &k}}) {
    if (!g->defined()) *g = Tensor::Empty(like->shape(), like->dtype(), like->device());
    LOOM_CHECK(g->shape() == like->shape() && g->dtype() == like->dtype() && g->device() == like->device(),
               "[cp_attention] gradient is ",
               ShapeString(g->shape()), ", expected ", ShapeString(like->shape()));
    g->Zero();
  }
}

absl::Status WaitAll(std::vector<CommHandle>& handles) {
  absl::Status first;
  for (CommHandle& h : handles) {
    absl::Status s = h.Wait();
    if (first.ok() && !s.ok()) first = s;
  }
  handles.clear();
  return first;
}

// ---- ring ----

// Message tags: one per (kind, row, slot), so the blocks of one step match
// whatever order MPI completes them in.
enum BlockKind { kK, kV, kDoc, kDk, kDv, kKinds };
int Tag(BlockKind kind, int64_t row, int slot) { return static_cast<int>((row * 2 + slot) * kKinds + kind); }

// The K/V blocks (and doc ids) of one source rank, one per (row, slot).
struct RingBlocks {
  std::vector<HeldTensor> k, v, doc;
  // K/V blocks on `dev` (the device of k), doc ids on the host.
  void Allocate(CpMemoryLedger* l, const CpChunks& lay, int64_t hk, int64_t d, DType dt, bool docs, Device dev) {
    const int64_t n = lay.rows * 2;
    k.resize(n);
    v.resize(n);
    doc.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      k[i] = HeldTensor(l, {lay.chunk, hk, d}, dt, false, true, dev);
      v[i] = HeldTensor(l, {lay.chunk, hk, d}, dt, false, true, dev);
      if (docs) doc[i] = HeldTensor(l, {lay.chunk}, DType::kI32);
    }
  }
  // Views of this rank's own blocks (counted as inputs already).
  void Own(const CpChunks& lay, const Tensor& kk, const Tensor& vv, const ops::TokenRows& rows) {
    const int64_t n = lay.rows * 2;
    k.resize(n);
    v.resize(n);
    doc.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      k[i] = HeldTensor::Wrap(nullptr, View(kk, lay, i / 2, i % 2));
      v[i] = HeldTensor::Wrap(nullptr, View(vv, lay, i / 2, i % 2));
      if (rows.has_docs()) doc[i] = HeldTensor::Wrap(nullptr, View(rows.doc_ids, lay, i / 2, i % 2));
    }
  }
  void Exchange(Communicator& g, RingBlocks& next, bool docs, std::vector<CommHandle>& hs) const {
    const int p = g.rank(), cp = g.size(), to = (p + 1) % cp, from = (p + cp - 1) % cp;
    for (size_t i = 0; i < k.size(); ++i) {
      const int64_t r = i / 2;
      const int s = i % 2;
      hs.push_back(g.StartRecv(next.k[i].t(), from, Tag(kK, r, s)));
      hs.push_back(g.StartRecv(next.v[i].t(), from, Tag(kV, r, s)));
      if (docs) hs.push_back(g.StartRecv(next.doc[i].t(), from, Tag(kDoc, r, s)));
    }
    for (size_t i = 0; i < k.size(); ++i) {
      const int64_t r = i / 2;
      const int s = i % 2;
      hs.push_back(g.StartSend(k[i].t(), to, Tag(kK, r, s)));
      hs.push_back(g.StartSend(v[i].t(), to, Tag(kV, r, s)));
      if (docs) hs.push_back(g.StartSend(doc[i].t(), to, Tag(kDoc, r, s)));
    }
  }
};

int64_t SourceChunk(int src, int cp, int slot) { return slot == 0 ? src : 2 * cp - 1 - src; }

absl::Status RingForward(Communicator& g, const ChunkArgs& a, CpMemoryLedger* l, const Tensor& q, const Tensor& k,
                         const Tensor& v, Tensor& o, Tensor& lse) {
  const int p = g.rank(), cp = g.size();
  const bool docs = a.local_rows.has_docs();
  PairScratch scratch(l, q, a.c(), k.dim(1), k.dim(2), /*backward=*/false);
  RingBlocks cur;
  cur.Own(a.layout, k, v, a.local_rows);
  for (int s = 0; s < cp; ++s) {
    const int src = (p - s + cp) % cp;
    RingBlocks next;
    std::vector<CommHandle> hs;
    if (s + 1 < cp) {  // the next step's blocks travel while this one computes
      next.Allocate(l, a.layout, k.dim(1), k.dim(2), k.dtype(), docs, k.device());
      cur.Exchange(g, next, docs, hs);
    }
    for (int64_t r = 0; r < a.layout.rows; ++r)
      for (int qs = 0; qs < 2; ++qs)
        for (int ks = 0; ks < 2; ++ks) {
          const int64_t i = r * 2 + ks;
          PairForward(a, q, r, qs, SourceChunk(src, cp, ks), cur.k[i].t(), cur.v[i].t(),
                      docs ? cur.doc[i].t() : Tensor(), o, lse, scratch);
        }
    LOOM_RETURN_IF_ERROR(WaitAll(hs));
    cur = std::move(next);
  }
  return absl::OkStatus();
}

absl::Status RingBackward(Communicator& g, const ChunkArgs& a, CpMemoryLedger* l, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& d_o, Tensor& dq,
                          Tensor& dk, Tensor& dv) {
  const int p = g.rank(), cp = g.size(), to = (p + 1) % cp, from = (p + cp - 1) % cp;
  const bool docs = a.local_rows.has_docs();
  const CpChunks& lay = a.layout;
  const int64_t nb = lay.rows * 2, hk = k.dim(1), d = k.dim(2);
  PairScratch scratch(l, q, a.c(), hk, d, /*backward=*/true);
  RingBlocks cur;
  cur.Own(lay, k, v, a.local_rows);
  // dK/dV of the blocks being computed: this rank's share (acc), and the
  // sum of the ranks before it (incoming; absent at step 0).
  auto grad_blocks = [&](std::vector<HeldTensor>& dkb, std::vector<HeldTensor>& dvb, bool zero) {
    dkb.resize(nb);
    dvb.resize(nb);
    for (int64_t i = 0; i < nb; ++i) {
      dkb[i] = HeldTensor(l, {lay.chunk, hk, d}, k.dtype(), zero, true, k.device());
      dvb[i] = HeldTensor(l, {lay.chunk, hk, d}, k.dtype(), zero, true, k.device());
    }
  };
  // Accumulators: `in` arrives from p−1 for the current blocks (posted a step
  // early), `acc` is this step's share plus `in`, `sending` the previous
  // step's acc until its send completes.
  std::vector<HeldTensor> in_dk, in_dv, sending_dk, sending_dv;
  std::vector<CommHandle> grad_recv, grad_send;
  for (int s = 0; s < cp; ++s) {
    const int src = (p - s + cp) % cp;
    RingBlocks next;
    std::vector<CommHandle> kv;
    if (s + 1 < cp) {  // the next K/V blocks travel while this step computes
      next.Allocate(l, lay, hk, d, k.dtype(), docs, k.device());
      cur.Exchange(g, next, docs, kv);
    }
    std::vector<HeldTensor> acc_dk, acc_dv;
    grad_blocks(acc_dk, acc_dv, /*zero=*/true);
    for (int64_t r = 0; r < lay.rows; ++r)
      for (int qs = 0; qs < 2; ++qs)
        for (int ks = 0; ks < 2; ++ks) {
          const int64_t i = r * 2 + ks;
          PairBackward(a, q, o, lse, d_o, r, qs, SourceChunk(src, cp, ks), cur.k[i].t(), cur.v[i].t(),
                       docs ? cur.doc[i].t() : Tensor(), dq, acc_dk[i].t(), acc_dv[i].t(), scratch);
        }
    LOOM_RETURN_IF_ERROR(WaitAll(grad_recv));
    if (s > 0)
      for (int64_t i = 0; i < nb; ++i) {
        Add(acc_dk[i].t(), in_dk[i].t());
        Add(acc_dv[i].t(), in_dv[i].t());
      }
    LOOM_RETURN_IF_ERROR(WaitAll(grad_send));
    sending_dk.clear();
    sending_dv.clear();
    if (cp == 1) {
      for (int64_t i = 0; i < nb; ++i) {
        View(dk, lay, i / 2, i % 2).CopyFrom(acc_dk[i].t());
        View(dv, lay, i / 2, i % 2).CopyFrom(acc_dv[i].t());
      }
      return absl::OkStatus();
    }
    // Receive the next blocks' accumulators (after the last step: our own,
    // home after cp hops) and pass this step's on.
    grad_blocks(in_dk, in_dv, /*zero=*/false);
    for (int64_t i = 0; i < nb; ++i) {
      grad_recv.push_back(g.StartRecv(in_dk[i].t(), from, Tag(kDk, i / 2, i % 2)));
      grad_recv.push_back(g.StartRecv(in_dv[i].t(), from, Tag(kDv, i / 2, i % 2)));
    }
    for (int64_t i = 0; i < nb; ++i) {
      grad_send.push_back(g.StartSend(acc_dk[i].t(), to, Tag(kDk, i / 2, i % 2)));
      grad_send.push_back(g.StartSend(acc_dv[i].t(), to, Tag(kDv, i / 2, i % 2)));
    }
    sending_dk = std::move(acc_dk);
    sending_dv = std::move(acc_dv);
    LOOM_RETURN_IF_ERROR(WaitAll(kv));
    cur = std::move(next);
  }
  LOOM_RETURN_IF_ERROR(WaitAll(grad_recv));
  LOOM_RETURN_IF_ERROR(WaitAll(grad_send));
  for (int64_t i = 0; i < nb; ++i) {
    View(dk, lay, i / 2, i % 2).CopyFrom(in_dk[i].t());
    View(dv, lay, i / 2, i % 2).CopyFrom(in_dv[i].t());
  }
  return absl::OkStatus();
}

// ---- allgather (LASP-2H) ----

// [K|V] of every rank: [cp, 2, T, Hk, D], slice r from rank r.
absl::Status GatherKV(Communicator& g, CpMemoryLedger* l, const Tensor& k, const Tensor& v, HeldTensor& gathered) {
  const int64_t n = k.numel();
  HeldTensor mine(l, {2, k.dim(0), k.dim(1), k.dim(2)}, k.dtype(), false, /*token_major=*/false, k.device());
  mine.t().Slice(0, 1).CopyFrom(k.Reshape({1, k.dim(0), k.dim(1), k.dim(2)}));
  mine.t().Slice(1, 1).CopyFrom(v.Reshape({1, k.dim(0), k.dim(1), k.dim(2)}));
  gathered = HeldTensor(l, {g.size() * 2 * k.dim(0), k.dim(1), k.dim(2)}, k.dtype(), false, true, k.device());
  (void)n;
  return g.AllGather(mine.t(), gathered.t());
}

// Rank r's K (which = 0) or V (1) of (row, slot) inside the gathered buffer.
Tensor GatheredBlock(const Tensor& gathered, const CpChunks& lay, int r, int which, int64_t row, int slot) {
  const int64_t t = lay.local_tokens();
  return gathered.Slice((static_cast<int64_t>(r) * 2 + which) * t + lay.offset(row, slot), lay.chunk);
}

// Doc ids of every rank's tokens: [cp·T] i32 (one small all-gather), or undefined.
absl::Status GatherDocs(Communicator& g, CpMemoryLedger* l, const ops::TokenRows& rows, HeldTensor& docs) {
  if (!rows.has_docs()) return absl::OkStatus();
  docs = HeldTensor(l, {g.size() * rows.doc_ids.numel()}, DType::kI32, false, false);
  return g.AllGather(rows.doc_ids, docs.t());
}

absl::Status AllGatherForward(Communicator& g, const ChunkArgs& a, CpMemoryLedger* l, bool keep, const Tensor& q,
                              const Tensor& k, const Tensor& v, Tensor& o, Tensor& lse, CpAttentionSaved* saved) {
  const int cp = g.size();
  const CpChunks& lay = a.layout;
  HeldTensor gathered, docs;
  LOOM_RETURN_IF_ERROR(GatherKV(g, l, k, v, gathered));
  LOOM_RETURN_IF_ERROR(GatherDocs(g, l, a.local_rows, docs));
  PairScratch scratch(l, q, a.c(), k.dim(1), k.dim(2), false);
  for (int src = 0; src < cp; ++src)
    for (int64_t r = 0; r < lay.rows; ++r)
      for (int qs = 0; qs < 2; ++qs)
        for (int ks = 0; ks < 2; ++ks)
          PairForward(a, q, r, qs, SourceChunk(src, cp, ks), GatheredBlock(gathered.t(), lay, src, 0, r, ks),
                      GatheredBlock(gathered.t(), lay, src, 1, r, ks),
                      docs.t().defined() ? docs.t().Slice(src * lay.local_tokens() + lay.offset(r, ks), lay.chunk)
                                         : Tensor(),
                      o, lse, scratch);
  if (keep && saved) saved->gathered_kv = gathered.Detach();  // counted until CpAttentionSaved::Release
  return absl::OkStatus();
}

absl::Status AllGatherBackward(Communicator& g, const ChunkArgs& a, CpMemoryLedger* l, const Tensor& q,
                               const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                               const Tensor& d_o, CpAttentionSaved* saved, Tensor& dq, Tensor& dk, Tensor& dv) {
  const int cp = g.size();
  const CpChunks& lay = a.layout;
  const int64_t t = lay.local_tokens(), hk = k.dim(1), d = k.dim(2);
  HeldTensor gathered, docs;
  Tensor kv;
  if (saved && saved->gathered_kv.defined()) {
    kv = saved->gathered_kv;
  } else {
    LOOM_RETURN_IF_ERROR(GatherKV(g, l, k, v, gathered));
    kv = gathered.t();
  }
  LOOM_RETURN_IF_ERROR(GatherDocs(g, l, a.local_rows, docs));
  // dK|dV of every rank's keys, in the gather's order: slice r goes to rank r.
  HeldTensor grads(l, {cp * 2 * t, hk, d}, k.dtype(), /*zero=*/true, true, k.device());
  PairScratch scratch(l, q, a.c(), hk, d, true);
  for (int src = 0; src < cp; ++src)
    for (int64_t r = 0; r < lay.rows; ++r)
      for (int qs = 0; qs < 2; ++qs)
        for (int ks = 0; ks < 2; ++ks) {
          Tensor gk = GatheredBlock(grads.t(), lay, src, 0, r, ks), gv = GatheredBlock(grads.t(), lay, src, 1, r, ks);
          PairBackward(a, q, o, lse, d_o, r, qs, SourceChunk(src, cp, ks), GatheredBlock(kv, lay, src, 0, r, ks),
                       GatheredBlock(kv, lay, src, 1, r, ks),
                       docs.t().defined() ? docs.t().Slice(src * t + lay.offset(r, ks), lay.chunk) : Tensor(), dq, gk,
                       gv, scratch);
        }
  gathered.Release();
  if (saved && saved->gathered_kv.defined()) saved->Release(l);
  HeldTensor mine(l, {2 * t, hk, d}, k.dtype(), false, false, k.device());
  LOOM_RETURN_IF_ERROR(g.ReduceScatter(grads.t(), mine.t()));
  dk.CopyFrom(mine.t().Slice(0, t));
  dv.CopyFrom(mine.t().Slice(t, t));
  return absl::OkStatus();
}

// ---- ulysses ----
// The exchanges only move elements, so they work on bytes: `w` below is the
// bytes of one token's slice of one head (D elements, or 1 for the LSE).

char* Bytes(const Tensor& t) { return static_cast<char*>(t.raw()); }

// Pack [T, H, ·] into [cp, T, H/cp, ·]: slice j holds head group j. `out`
// advances by the slice's bytes per destination, so several tensors can be
// packed one after the other inside each slice.
void PackHeads(const Tensor& x, int cp, int64_t w, std::vector<char*>& out) {
  const int64_t tokens = x.dim(0), h = x.dim(1), hg = h / cp;
  for (int j = 0; j < cp; ++j) {
    CopyStrided(out[j], hg * w, Bytes(x) + j * hg * w, h * w, hg * w, tokens, x.device());
    out[j] += tokens * hg * w;
  }
}
// The inverse: slices [cp, T, H/cp, ·] -> x [T, H, ·].
void UnpackHeads(Tensor& x, int cp, int64_t w, std::vector<char*>& in) {
  const int64_t tokens = x.dim(0), h = x.dim(1), hg = h / cp;
  for (int j = 0; j < cp; ++j) {
    CopyStrided(Bytes(x) + j * hg * w, h * w, in[j], hg * w, hg * w, tokens, x.device());
    in[j] += tokens * hg * w;
  }
}
// Received slices [cp (source rank), T_local, hg, ·] -> x [rows·N, hg, ·] in
// global token order (zig-zag inverse), or the reverse when to_slices.
void SeqOrder(const CpChunks& lay, int64_t hg, int64_t w, std::vector<char*>& slices, char* x, bool to_slices,
              Device device) {
  const int cp = lay.cp;
  const int64_t c = lay.chunk, n = lay.seq_len(), per = hg * w;
  for (int src = 0; src < cp; ++src) {
    for (int64_t r = 0; r < lay.rows; ++r)
      for (int s = 0; s < 2; ++s) {
        const int64_t u = s == 0 ? src : 2 * cp - 1 - src;
        char* sp = slices[src] + (r * 2 + s) * c * per;
        char* xp = x + (r * n + u * c) * per;
        if (to_slices)
          CopyStrided(sp, 0, xp, 0, c * per, 1, device);
        else
          CopyStrided(xp, 0, sp, 0, c * per, 1, device);
      }
    slices[src] += lay.local_tokens() * per;
  }
}

std::vector<char*> SlicePointers(const Tensor& buf, int cp) {
  std::vector<char*> p(cp);
  for (int j = 0; j < cp; ++j) p[j] = Bytes(buf) + j * (buf.nbytes() / cp);
  return p;
}

// Bytes per token and head of x [T, H, D] (or [T, H]: one element).
int64_t HeadBytes(const Tensor& x) { return (x.ndim() == 3 ? x.dim(2) : 1) * DTypeSize(x.dtype()); }

// A send and a receive buffer of `bytes` each, in the elements of xs (one
// dtype, one device).
std::pair<HeldTensor, HeldTensor> ExchangeBuffers(CpMemoryLedger* l, const std::vector<const Tensor*>& xs,
                                                  int64_t bytes) {
  const Tensor& x = *xs[0];
  for (const Tensor* t : xs)
    LOOM_CHECK(t->dtype() == x.dtype() && t->device() == x.device(), "[cp_attention] ulysses exchanges one dtype");
  const int64_t n = bytes / static_cast<int64_t>(DTypeSize(x.dtype()));
  return {HeldTensor(l, {n}, x.dtype(), false, false, x.device()), HeldTensor(l, {n}, x.dtype(), false, false, x.device())};
}

// Sequence shards [T, H·, ·] of the listed tensors -> head shards of the full
// rows [rows·N, H·/cp, ·], through one all-to-all.
absl::Status SeqToHeads(Communicator& g, CpMemoryLedger* l, const CpChunks& lay, const std::vector<const Tensor*>& xs,
                        std::vector<Tensor*> outs) {
  const int cp = g.size();
  int64_t per_slice = 0;
  for (const Tensor* x : xs) per_slice += x->dim(0) * (x->dim(1) / cp) * HeadBytes(*x);
  auto [send, recv] = ExchangeBuffers(l, xs, cp * per_slice);
  std::vector<char*> w = SlicePointers(send.t(), cp);
  for (const Tensor* x : xs) PackHeads(*x, cp, HeadBytes(*x), w);
  LOOM_RETURN_IF_ERROR(g.AllToAll(send.t(), recv.t()));
  send.Release();
  std::vector<char*> rp = SlicePointers(recv.t(), cp);
  for (size_t i = 0; i < xs.size(); ++i)
    SeqOrder(lay, xs[i]->dim(1) / cp, HeadBytes(*xs[i]), rp, Bytes(*outs[i]), /*to_slices=*/false, xs[i]->device());
  return absl::OkStatus();
}

// Head shards of the full rows -> sequence shards [T, H, ·] (one all-to-all).
absl::Status HeadsToSeq(Communicator& g, CpMemoryLedger* l, const CpChunks& lay, const std::vector<const Tensor*>& xs,
                        std::vector<Tensor*> outs) {
  const int cp = g.size();
  int64_t per_slice = 0;
  for (const Tensor* x : xs) per_slice += lay.local_tokens() * x->dim(1) * HeadBytes(*x);
  auto [send, recv] = ExchangeBuffers(l, xs, cp * per_slice);
  std::vector<char*> w = SlicePointers(send.t(), cp);
  for (const Tensor* x : xs) SeqOrder(lay, x->dim(1), HeadBytes(*x), w, Bytes(*x), /*to_slices=*/true, x->device());
  LOOM_RETURN_IF_ERROR(g.AllToAll(send.t(), recv.t()));
  send.Release();
  std::vector<char*> rp = SlicePointers(recv.t(), cp);
  for (size_t i = 0; i < xs.size(); ++i) UnpackHeads(*outs[i], cp, HeadBytes(*outs[i]), rp);
  return absl::OkStatus();
}

absl::Status UlyssesForward(Communicator& g, const ChunkArgs& a, CpMemoryLedger* l, const Tensor& q, const Tensor& k,
                            const Tensor& v, Tensor& o, Tensor& lse, CpAttentionSaved* saved) {
  const int cp = g.size();
  const CpChunks& lay = a.layout;
  const int64_t tokens = lay.rows * lay.seq_len(), hq = q.dim(1) / cp, hk = k.dim(1) / cp, d = q.dim(2);
  const Device dev = q.device();
  HeldTensor qh(l, {tokens, hq, d}, q.dtype(), false, true, dev), kh(l, {tokens, hk, d}, q.dtype(), false, true, dev);
  HeldTensor vh(l, {tokens, hk, d}, q.dtype(), false, true, dev), oh(l, {tokens, hq, d}, q.dtype(), false, true, dev);
  HeldTensor lh, docs;  // lse of the head shards (none for sigmoid)
  if (!a.options.sigmoid) lh = HeldTensor(l, {tokens, hq}, lse.dtype(), false, true, dev);
  LOOM_RETURN_IF_ERROR(SeqToHeads(g, l, lay, {&q, &k, &v}, {&qh.t(), &kh.t(), &vh.t()}));
  ops::TokenRows rows = ops::TokenRows::Uniform(lay.rows, lay.seq_len());
  if (a.local_rows.has_docs()) {  // host ids
    HeldTensor gathered;
    LOOM_RETURN_IF_ERROR(GatherDocs(g, l, a.local_rows, gathered));
    docs = HeldTensor(l, {tokens}, DType::kI32, false, false);
    std::vector<char*> sp = SlicePointers(gathered.t(), cp);
    SeqOrder(lay, 1, sizeof(int32_t), sp, Bytes(docs.t()), /*to_slices=*/false, Device::Cpu());
    rows.doc_ids = docs.t();
  }
  ops::SoftmaxAttentionForward(qh.t(), kh.t(), vh.t(), rows, rows, a.options, oh.t(), lh.t());
  if (a.options.sigmoid) {
    LOOM_RETURN_IF_ERROR(HeadsToSeq(g, l, lay, {&oh.t()}, {&o}));
  } else if (lse.dtype() == o.dtype()) {  // one exchange for both
    LOOM_RETURN_IF_ERROR(HeadsToSeq(g, l, lay, {&oh.t(), &lh.t()}, {&o, &lse}));
  } else {  // bf16 o, f32 lse
    LOOM_RETURN_IF_ERROR(HeadsToSeq(g, l, lay, {&oh.t()}, {&o}));
    LOOM_RETURN_IF_ERROR(HeadsToSeq(g, l, lay, {&lh.t()}, {&lse}));
  }
  if (saved) {  // the head shards stay for backward (same size as the local q, k, v, o, lse)
    saved->q_heads = qh.Detach();
    saved->k_heads = kh.Detach();
    saved->v_heads = vh.Detach();
    saved->o_heads = oh.Detach();
    saved->lse_heads = lh.Detach();
    saved->global_doc_ids = docs.Detach();
  }
  return absl::OkStatus();
}

absl::Status UlyssesBackward(Communicator& g, const ChunkArgs& a, CpMemoryLedger* l, const Tensor& d_o,
                             CpAttentionSaved* saved, Tensor& dq, Tensor& dk, Tensor& dv) {
  if (!saved || !saved->q_heads.defined())
    return absl::FailedPreconditionError("[cp_attention] ulysses backward needs the CpAttentionSaved of its forward");
  const CpChunks& lay = a.layout;
  const Tensor &qh = saved->q_heads, &kh = saved->k_heads, &vh = saved->v_heads;
  const Device dev = qh.device();
  HeldTensor doh(l, qh.shape(), qh.dtype(), false, true, dev);
  LOOM_RETURN_IF_ERROR(SeqToHeads(g, l, lay, {&d_o}, {&doh.t()}));
  ops::TokenRows rows = ops::TokenRows::Uniform(lay.rows, lay.seq_len());
  rows.doc_ids = saved->global_doc_ids;
  HeldTensor dqh(l, qh.shape(), qh.dtype(), false, true, dev), dkh(l, kh.shape(), kh.dtype(), false, true, dev);
  HeldTensor dvh(l, vh.shape(), vh.dtype(), false, true, dev);
  ops::SoftmaxAttentionBackward(qh, kh, vh, saved->o_heads, a.options.sigmoid ? Tensor() : saved->lse_heads,
                                doh.t(), rows, rows, a.options, dqh.t(), dkh.t(), dvh.t());
  doh.Release();
  saved->Release(l);
  return HeadsToSeq(g, l, lay, {&dqh.t(), &dkh.t(), &dvh.t()}, {&dq, &dk, &dv});
}

absl::Status CheckArgs(Communicator& g, const CpChunks& lay, const Tensor& q, const Tensor& k, const Tensor& v,
                       const ops::TokenRows& rows, const ops::AttentionOptions& options) {
  if (g.size() != lay.cp)
    return absl::InvalidArgumentError(
        absl::StrCat("[cp_attention] the cp group has ", g.size(), " ranks but the layout is for cp = ", lay.cp));
  if (g.rank() != lay.rank)
    return absl::InvalidArgumentError(
        absl::StrCat("[cp_attention] rank ", g.rank(), " of the cp group was given the layout of rank ", lay.rank));
  if (q.ndim() != 3 || k.ndim() != 3 || v.shape() != k.shape() || q.dim(0) != lay.local_tokens() ||
      k.dim(0) != lay.local_tokens())
    return absl::InvalidArgumentError(absl::StrCat("[cp_attention] q ", ShapeString(q.shape()), ", k ",
                                                   ShapeString(k.shape()), ", v ", ShapeString(v.shape()),
                                                   ": expected [rows·2C = ", lay.local_tokens(), ", H, D]"));
  if (options.q_offset != 0 || options.k_offset != 0)
    return absl::InvalidArgumentError("[cp_attention] q_offset and k_offset must be 0: the schemes set them per chunk");
  for (const Tensor* t : {&k, &v})
    if (t->device() != q.device())
      return absl::InvalidArgumentError(absl::StrCat("[cp_attention] q is on ", q.device().ToString(),
                                                     " but k or v on ", t->device().ToString()));
  if (rows.has_docs() && rows.doc_ids.numel() != lay.local_tokens())
    return absl::InvalidArgumentError(absl::StrCat("[cp_attention] doc_ids has ", rows.doc_ids.numel(),
                                                   " entries, expected ", lay.local_tokens()));
  return CheckCpAttention(CpSoftmaxScheme::kRing, g.size(), q.dim(1), k.dim(1));
}

}  // namespace

absl::StatusOr<CpSoftmaxScheme> ParseCpSoftmaxScheme(std::string_view name) {
  if (name == "ring") return CpSoftmaxScheme::kRing;
  if (name == "allgather") return CpSoftmaxScheme::kAllGather;
  if (name == "ulysses") return CpSoftmaxScheme::kUlysses;
  return absl::InvalidArgumentError(
      absl::StrCat("[cp_attention] parallel.cp_softmax = \"", std::string(name), "\": expected ring, allgather or ulysses"));
}

const char* CpSoftmaxSchemeName(CpSoftmaxScheme scheme) {
  switch (scheme) {
    case CpSoftmaxScheme::kRing: return "ring";
    case CpSoftmaxScheme::kAllGather: return "allgather";
    case CpSoftmaxScheme::kUlysses: return "ulysses";
  }
  return "?";
}

int64_t CpAttentionSaved::bytes() const {
  int64_t b = 0;
  for (const Tensor* t : {&gathered_kv, &q_heads, &k_heads, &v_heads, &o_heads, &lse_heads, &global_doc_ids})
    if (t->defined()) b += static_cast<int64_t>(t->nbytes());
  return b;
}

void CpAttentionSaved::Release(CpMemoryLedger* ledger) {
  for (Tensor* t : {&gathered_kv, &q_heads, &k_heads, &v_heads, &o_heads, &lse_heads, &global_doc_ids}) {
    if (ledger && t->defined()) ledger->Drop(*t);
    *t = Tensor();
  }
}

absl::Status CheckCpAttention(CpSoftmaxScheme scheme, int cp, int64_t heads, int64_t kv_heads) {
  if (kv_heads <= 0 || heads % kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat("[cp_attention] model.heads = ", heads,
                                                   " is not a multiple of model.kv_heads = ", kv_heads));
  if (scheme == CpSoftmaxScheme::kUlysses && (heads % cp != 0 || kv_heads % cp != 0))
    return absl::InvalidArgumentError(absl::StrCat(
        "[cp_attention] parallel.cp_softmax = ulysses splits heads over the cp ranks: model.heads = ", heads,
        " and model.kv_heads = ", kv_heads, " must both be divisible by parallel.cp = ", cp,
        "; change parallel.cp (or the head counts), or use parallel.cp_softmax = ring or allgather"));
  return absl::OkStatus();
}

absl::Status CpAttentionForward(Communicator& cp_group, const CpAttentionOptions& cp, const CpChunks& layout,
                                const Tensor& q, const Tensor& k, const Tensor& v, const ops::TokenRows& local_rows,
                                const ops::AttentionOptions& options, Tensor& o, Tensor& lse,
                                CpAttentionSaved* saved) {
  LOOM_RETURN_IF_ERROR(CheckArgs(cp_group, layout, q, k, v, local_rows, options));
  LOOM_RETURN_IF_ERROR(CheckCpAttention(cp.scheme, cp_group.size(), q.dim(1), k.dim(1)));
  InitOutputs(q, options, o, lse);
  CpMemoryLedger* l = cp.ledger;
  HeldTensor in_q = HeldTensor::Wrap(l, q), in_k = HeldTensor::Wrap(l, k), in_v = HeldTensor::Wrap(l, v);
  HeldTensor out_o = HeldTensor::Wrap(l, o), out_l = HeldTensor::Wrap(l, options.sigmoid ? Tensor() : lse);
  const ChunkArgs a{layout, local_rows, options};
  switch (cp.scheme) {
    case CpSoftmaxScheme::kRing: return RingForward(cp_group, a, l, q, k, v, o, lse);
    case CpSoftmaxScheme::kAllGather: return AllGatherForward(cp_group, a, l, cp.keep_gathered, q, k, v, o, lse, saved);
    case CpSoftmaxScheme::kUlysses: return UlyssesForward(cp_group, a, l, q, k, v, o, lse, saved);
  }
  return absl::InternalError("[cp_attention] unknown scheme");
}

absl::Status CpAttentionBackward(Communicator& cp_group, const CpAttentionOptions& cp, const CpChunks& layout,
                                 const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                 const Tensor& lse, const Tensor& d_o, const ops::TokenRows& local_rows,
                                 const ops::AttentionOptions& options, CpAttentionSaved* saved, Tensor& dq,
                                 Tensor& dk, Tensor& dv) {
  LOOM_RETURN_IF_ERROR(CheckArgs(cp_group, layout, q, k, v, local_rows, options));
  LOOM_RETURN_IF_ERROR(CheckCpAttention(cp.scheme, cp_group.size(), q.dim(1), k.dim(1)));
  InitGrads(q, k, dq, dk, dv);
  CpMemoryLedger* l = cp.ledger;
  std::vector<HeldTensor> io;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &o, &lse, &d_o, &dq, &dk, &dv})
    if (!(t == &lse && options.sigmoid)) io.push_back(HeldTensor::Wrap(l, *t));
  const ChunkArgs a{layout, local_rows, options};
  switch (cp.scheme) {
    case CpSoftmaxScheme::kRing: return RingBackward(cp_group, a, l, q, k, v, o, lse, d_o, dq, dk, dv);
    case CpSoftmaxScheme::kAllGather:
      return AllGatherBackward(cp_group, a, l, q, k, v, o, lse, d_o, saved, dq, dk, dv);
    case CpSoftmaxScheme::kUlysses: return UlyssesBackward(cp_group, a, l, d_o, saved, dq, dk, dv);
  }
  return absl::InternalError("[cp_attention] unknown scheme");
}

}  // namespace loom
