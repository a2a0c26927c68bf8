#include "parallel/cp_lightning.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "ops/lightning_attention.h"

namespace loom {
namespace {

// Tags of the lasp1 chains: up (0 → cp−1 over the first chunks), down
// (cp−1 → 0 over the second chunks), and their backward mirrors.
enum ChainTag { kUp = 100, kDown = 101, kGradDown = 102, kGradUp = 103 };

struct Local {
  const CpChunks& lay;
  const Tensor &q, &k, &v, &decay;
  const ops::TokenRows& rows;
  int64_t h, dk, dv;
  Tensor decay_host;  // λ on the host in the states' dtype, for the chains below
  Tensor Q(int64_t r, int s) const { return q.Slice(lay.offset(r, s), lay.chunk); }
  Tensor K(int64_t r, int s) const { return k.Slice(lay.offset(r, s), lay.chunk); }
  Tensor V(int64_t r, int s) const { return v.Slice(lay.offset(r, s), lay.chunk); }
  Tensor Docs(int64_t r, int s) const {
    return rows.has_docs() ? rows.doc_ids.Slice(lay.offset(r, s), lay.chunk) : Tensor();
  }
  bool InnerBoundary(int64_t r, int s) const {
    if (!rows.has_docs()) return false;
    const int32_t* d = rows.doc_ids.data<int32_t>() + lay.offset(r, s);
    for (int64_t i = 1; i < lay.chunk; ++i)
      if (d[i] != d[i - 1]) return true;
    return false;
  }
  bool Cut(int64_t r, int s) const { return lay.starts_doc(r, s) || InnerBoundary(r, s); }
  int64_t state() const { return h * dk * dv; }
};

// States ([H, Dk, Dv] per chunk) live on the host, where the chains below
// combine them (a few per row: small next to the chunks); the phases of CUDA
// tensors get device copies. Their dtype: q's on the CPU, f32 on a GPU (the
// lightning states are f32 there, docs/gpu.md).
DType StateType(const Tensor& q) { return q.device().is_cpu() ? q.dtype() : DType::kF32; }

// `host` itself for CPU phases; else a device tensor like it (a copy if asked).
Tensor OnPhaseDevice(const Tensor& host, const Local& a, bool copy) {
  if (a.q.device().is_cpu()) return host;
  Tensor d = Tensor::Empty(host.shape(), host.dtype(), a.q.device());
  if (copy) d.CopyFrom(host);
  return d;
}
// Brings a phase's state result back to the host (no-op on the CPU).
void ToHost(const Tensor& phase, Tensor host) {
  if (phase.raw() != host.raw()) host.CopyFrom(phase);
}

// One state of a [n, H, Dk, Dv] buffer.
Tensor StateAt(const Tensor& states, int64_t i, const Local& a) {
  return states.Slice(i, 1).Reshape({a.h, a.dk, a.dv});
}

// s = [not cut] λ_h^C s + m, per head (m nullptr: no add).
template <typename T>
void DecayAddTyped(T* s, const T* m, const Tensor& decay, int64_t c, bool cut, int64_t per_head) {
  for (int64_t h = 0; h < decay.numel(); ++h) {
    const T w = cut ? T(0) : static_cast<T>(std::pow(decay.Get(h), static_cast<double>(c)));
    for (int64_t i = h * per_head; i < (h + 1) * per_head; ++i) s[i] = w * s[i] + (m ? m[i] : T(0));
  }
}
void DecayAdd(void* s, const void* m, const Tensor& decay, const Local& a, bool cut) {
  LOOM_CHECK(decay.device().is_cpu(), "[cp_lightning] DecayAdd reads λ on the host");
  LOOM_DISPATCH_FLOAT(decay.dtype(), T, [&] {
    DecayAddTyped<T>(static_cast<T*>(s), static_cast<const T*>(m), decay, a.lay.chunk, cut, a.dk * a.dv);
  });
}

absl::Status WaitAll(std::vector<CommHandle>& hs) {
  absl::Status first;
  for (CommHandle& h : hs) {
    absl::Status s = h.Wait();
    if (first.ok() && !s.ok()) first = s;
  }
  hs.clear();
  return first;
}

void IntraForward(const Local& a, Tensor& o) {
  for (int64_t r = 0; r < a.lay.rows; ++r)
    for (int s = 0; s < 2; ++s) {
      Tensor oc = o.Slice(a.lay.offset(r, s), a.lay.chunk);
      ops::LightningIntraChunk(a.Q(r, s), a.K(r, s), a.V(r, s), a.decay, a.Docs(r, s), oc);
    }
}

void InterForward(const Local& a, const Tensor& entering, Tensor& o) {
  for (int64_t r = 0; r < a.lay.rows; ++r)
    for (int s = 0; s < 2; ++s) {
      if (a.lay.starts_doc(r, s)) continue;  // nothing before this chunk is visible
      Tensor oc = o.Slice(a.lay.offset(r, s), a.lay.chunk);
      ops::LightningInterChunk(a.Q(r, s), a.decay, a.Docs(r, s),
                               OnPhaseDevice(StateAt(entering, s * a.lay.rows + r, a), a, true), oc);
    }
}

// Local M_u of both chunks: [2·rows, H, Dk, Dv].
void ChunkStates(const Local& a, Tensor& m) {
  for (int64_t r = 0; r < a.lay.rows; ++r)
    for (int s = 0; s < 2; ++s) {
      Tensor mc = StateAt(m, s * a.lay.rows + r, a);
      Tensor phase = OnPhaseDevice(mc, a, false);
      ops::LightningChunkState(a.K(r, s), a.V(r, s), a.decay, a.Docs(r, s), phase);
      ToHost(phase, mc);
    }
}

// ---- lasp1 ----

absl::Status Lasp1Forward(Communicator& g, const Local& a, CpMemoryLedger* l, Tensor& o, CpLightningSaved* saved) {
  const int p = g.rank(), cp = g.size();
  const int64_t rows = a.lay.rows;
  const DType dt = StateType(a.q);
  HeldTensor m(l, {2 * rows, a.h, a.dk, a.dv}, dt, false, false);
  HeldTensor entering(l, {2 * rows, a.h, a.dk, a.dv}, dt, /*zero=*/true, false);
  HeldTensor out_up(l, {rows, a.h, a.dk, a.dv}, dt, false, false), out_down(l, {rows, a.h, a.dk, a.dv}, dt, false, false);
  // Everything that does not need the incoming state runs first.
  ChunkStates(a, m.t());
  IntraForward(a, o);
  std::vector<CommHandle> sends;
  Tensor in0 = entering.t().Slice(0, rows), in1 = entering.t().Slice(rows, rows);
  // Chunk p: S_p from p − 1, S_{p+1} to p + 1 (or to our own chunk cp).
  if (p > 0) LOOM_RETURN_IF_ERROR(g.Recv(in0, p - 1, kUp));
  out_up.t().CopyFrom(in0);
  for (int64_t r = 0; r < rows; ++r)
    DecayAdd(StateAt(out_up.t(), r, a).raw(), StateAt(m.t(), r, a).raw(), a.decay_host, a, a.Cut(r, 0));
  if (p + 1 < cp)
    sends.push_back(g.StartSend(out_up.t(), p + 1, kUp));
  else
    in1.CopyFrom(out_up.t());
  // Chunk 2cp−1−p: S from p + 1 (or from chunk cp−1 above), S_next to p − 1.
  if (p + 1 < cp) LOOM_RETURN_IF_ERROR(g.Recv(in1, p + 1, kDown));
  if (p > 0) {
    out_down.t().CopyFrom(in1);
    for (int64_t r = 0; r < rows; ++r)
      DecayAdd(StateAt(out_down.t(), r, a).raw(), StateAt(m.t(), rows + r, a).raw(), a.decay_host, a, a.Cut(r, 1));
    sends.push_back(g.StartSend(out_down.t(), p - 1, kDown));
  }
  InterForward(a, entering.t(), o);
  LOOM_RETURN_IF_ERROR(WaitAll(sends));
  if (saved) saved->entering = entering.Detach();
  return absl::OkStatus();
}

// Gradient of one chunk given G_{u+1} (`g_next`): dk, dv of M_u; dq and dS_u
// of the inter term; returns G_u = dS_u + [not cut] λ^C G_{u+1} in `g_out`.
void ChunkBackward(const Local& a, const Tensor& entering, int64_t r, int s, const Tensor& g_next,
                   const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv, Tensor g_out) {
  Tensor dkc = dk.Slice(a.lay.offset(r, s), a.lay.chunk), dvc = dv.Slice(a.lay.offset(r, s), a.lay.chunk);
  ops::LightningChunkStateBackward(a.K(r, s), a.V(r, s), a.decay, a.Docs(r, s), OnPhaseDevice(g_next, a, true), dkc,
                                   dvc);
  g_out.CopyFrom(g_next);
  DecayAdd(g_out.raw(), nullptr, a.decay_host, a, a.Cut(r, s));
  if (!a.lay.starts_doc(r, s)) {
    Tensor dqc = dq.Slice(a.lay.offset(r, s), a.lay.chunk);
    Tensor g_phase = OnPhaseDevice(g_out, a, true);
    ops::LightningInterChunkBackward(a.Q(r, s), a.decay, a.Docs(r, s),
                                     OnPhaseDevice(StateAt(entering, s * a.lay.rows + r, a), a, true),
                                     d_o.Slice(a.lay.offset(r, s), a.lay.chunk), dqc, g_phase);
    ToHost(g_phase, g_out);
  }
}

void IntraBackward(const Local& a, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv) {
  for (int64_t r = 0; r < a.lay.rows; ++r)
    for (int s = 0; s < 2; ++s) {
      const int64_t at = a.lay.offset(r, s), c = a.lay.chunk;
      Tensor dqc = dq.Slice(at, c), dkc = dk.Slice(at, c), dvc = dv.Slice(at, c);
      ops::LightningIntraChunkBackward(a.Q(r, s), a.K(r, s), a.V(r, s), a.decay, a.Docs(r, s), d_o.Slice(at, c), dqc,
                                       dkc, dvc);
    }
}

absl::Status Lasp1Backward(Communicator& g, const Local& a, CpMemoryLedger* l, const Tensor& d_o,
                           const CpLightningSaved& saved, Tensor& dq, Tensor& dk, Tensor& dv) {
  const int p = g.rank(), cp = g.size();
  const int64_t rows = a.lay.rows;
  const DType dt = StateType(a.q);
  IntraBackward(a, d_o, dq, dk, dv);
  // G_{u+1} of the second chunk (u = 2cp−1−p) comes from p − 1 (0 at the end
  // of the row); G_u goes to p + 1, or to our own first chunk when p = cp−1.
  HeldTensor g_in(l, {rows, a.h, a.dk, a.dv}, dt, /*zero=*/true, false);
  HeldTensor g_mid(l, {rows, a.h, a.dk, a.dv}, dt, false, false), g_out(l, {rows, a.h, a.dk, a.dv}, dt, false, false);
  std::vector<CommHandle> sends;
  if (p > 0) LOOM_RETURN_IF_ERROR(g.Recv(g_in.t(), p - 1, kGradDown));
  for (int64_t r = 0; r < rows; ++r)
    ChunkBackward(a, saved.entering, r, 1, StateAt(g_in.t(), r, a), d_o, dq, dk, dv, StateAt(g_mid.t(), r, a));
  if (p + 1 < cp) {
    sends.push_back(g.StartSend(g_mid.t(), p + 1, kGradDown));
    LOOM_RETURN_IF_ERROR(g.Recv(g_in.t(), p + 1, kGradUp));  // G_{p+1}
  } else {
    g_in.t().CopyFrom(g_mid.t());  // G_cp, from our own chunk cp
  }
  for (int64_t r = 0; r < rows; ++r)
    ChunkBackward(a, saved.entering, r, 0, StateAt(g_in.t(), r, a), d_o, dq, dk, dv, StateAt(g_out.t(), r, a));
  if (p > 0) sends.push_back(g.StartSend(g_out.t(), p - 1, kGradUp));
  return WaitAll(sends);
}

// ---- lasp2 ----

absl::Status Lasp2Forward(Communicator& g, const Local& a, CpMemoryLedger* l, Tensor& o, CpLightningSaved* saved) {
  const int cp = g.size();
  const int64_t rows = a.lay.rows, n = a.state(), width = n + 1;
  const DType dt = StateType(a.q);
  HeldTensor m(l, {2 * rows, a.h, a.dk, a.dv}, dt, false, false);
  ChunkStates(a, m.t());
  // [M_u | cut_u] of (slot, row), slot-major.
  HeldTensor mine(l, {2 * rows, width}, dt, false, false);
  HeldTensor all(l, {cp * 2 * rows, width}, dt, false, false);
  LOOM_DISPATCH_FLOAT(dt, T, [&] {
    for (int64_t i = 0; i < 2 * rows; ++i) {
      T* row = mine.t().data<T>() + i * width;
      std::memcpy(row, m.t().data<T>() + i * n, sizeof(T) * n);
      row[n] = a.Cut(i % rows, static_cast<int>(i / rows)) ? T(1) : T(0);
    }
  });
  m.Release();
  CommHandle gather = g.StartAllGather(mine.t(), all.t());
  IntraForward(a, o);  // overlaps the gather
  LOOM_RETURN_IF_ERROR(gather.Wait());
  mine.Release();
  HeldTensor entering(l, {2 * rows, a.h, a.dk, a.dv}, dt, /*zero=*/true, false);
  std::vector<uint8_t> cuts(rows * 2 * cp);
  LOOM_DISPATCH_FLOAT(dt, T, [&] {
    const T* base = all.t().data<T>();
    auto entry = [&](int64_t u, int64_t r) {
      return base + ((CpChunks::Owner(u, cp) * 2 + CpChunks::Slot(u, cp)) * rows + r) * width;
    };
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t u = 0; u < 2 * cp; ++u) cuts[r * 2 * cp + u] = entry(u, r)[n] != T(0);
    for (int s = 0; s < 2; ++s)
      for (int64_t r = 0; r < rows; ++r) {
        T* st = entering.t().data<T>() + (s * rows + r) * n;  // S_t = Σ_{a≤u<t} λ^(C(t−1−u)) M_u
        for (int64_t u = 0; u < a.lay.global_chunk(s); ++u)
          DecayAdd(st, entry(u, r), a.decay_host, a, cuts[r * 2 * cp + u]);
      }
  });
  all.Release();
  InterForward(a, entering.t(), o);
  if (saved) {
    saved->entering = entering.Detach();
    saved->cuts = std::move(cuts);
  }
  return absl::OkStatus();
}

absl::Status Lasp2Backward(Communicator& g, const Local& a, CpMemoryLedger* l, const Tensor& d_o,
                           const CpLightningSaved& saved, Tensor& dq, Tensor& dk, Tensor& dv) {
  const int cp = g.size();
  const int64_t rows = a.lay.rows;
  const DType dt = StateType(a.q);
  if (saved.cuts.size() != static_cast<size_t>(rows * 2 * cp))
    return absl::FailedPreconditionError("[cp_lightning] lasp2 backward needs the CpLightningSaved of its forward");
  // dS_t of the inter term of both local chunks (0 where a chunk starts a document).
  HeldTensor ds(l, {2 * rows, a.h, a.dk, a.dv}, dt, /*zero=*/true, false);
  for (int s = 0; s < 2; ++s)
    for (int64_t r = 0; r < rows; ++r) {
      if (a.lay.starts_doc(r, s)) continue;
      const int64_t at = a.lay.offset(r, s), c = a.lay.chunk;
      Tensor dqc = dq.Slice(at, c), dsc = StateAt(ds.t(), s * rows + r, a);
      Tensor ds_phase = OnPhaseDevice(dsc, a, true);
      ops::LightningInterChunkBackward(a.Q(r, s), a.decay, a.Docs(r, s),
                                       OnPhaseDevice(StateAt(saved.entering, s * rows + r, a), a, true),
                                       d_o.Slice(at, c), dqc, ds_phase);
      ToHost(ds_phase, dsc);
    }
  HeldTensor all(l, {cp * 2 * rows, a.h, a.dk, a.dv}, dt, false, false);
  CommHandle gather = g.StartAllGather(ds.t(), all.t());
  IntraBackward(a, d_o, dq, dk, dv);  // overlaps the gather
  LOOM_RETURN_IF_ERROR(gather.Wait());
  ds.Release();
  HeldTensor gnext(l, {a.h, a.dk, a.dv}, dt, false, false);
  for (int s = 0; s < 2; ++s)
    for (int64_t r = 0; r < rows; ++r) {
      // G_{u+1} = dS_{u+1} + [not cut_{u+1}] λ^C G_{u+2}, from the row's end.
      const int64_t u = a.lay.global_chunk(s);
      gnext.t().Zero();
      for (int64_t t = 2 * cp - 1; t > u; --t) {
        const Tensor dst = StateAt(all.t(), (CpChunks::Owner(t, cp) * 2 + CpChunks::Slot(t, cp)) * rows + r, a);
        DecayAdd(gnext.t().raw(), dst.raw(), a.decay_host, a, saved.cuts[r * 2 * cp + t]);
      }
      const int64_t at = a.lay.offset(r, s), c = a.lay.chunk;
      Tensor dkc = dk.Slice(at, c), dvc = dv.Slice(at, c);
      ops::LightningChunkStateBackward(a.K(r, s), a.V(r, s), a.decay, a.Docs(r, s), OnPhaseDevice(gnext.t(), a, true),
                                       dkc, dvc);
    }
  return absl::OkStatus();
}

// λ for the host chains, in the states' dtype.
Tensor HostDecay(const Tensor& decay, const Tensor& q) {
  Tensor host = decay;
  if (!decay.device().is_cpu()) {
    host = Tensor::Empty(decay.shape(), decay.dtype());
    host.CopyFrom(decay);
  }
  return host.dtype() == StateType(q) ? host : host.To(StateType(q));
}

absl::Status CheckArgs(Communicator& g, const CpChunks& lay, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& decay, const ops::TokenRows& rows) {
  if (g.size() != lay.cp || g.rank() != lay.rank)
    return absl::InvalidArgumentError(absl::StrCat("[cp_lightning] rank ", g.rank(), " of a cp group of ", g.size(),
                                                   " was given the layout of rank ", lay.rank, " of ", lay.cp));
  if (q.ndim() != 3 || k.shape() != q.shape() || v.ndim() != 3 || v.dim(0) != q.dim(0) || v.dim(1) != q.dim(1) ||
      q.dim(0) != lay.local_tokens())
    return absl::InvalidArgumentError(absl::StrCat("[cp_lightning] q ", ShapeString(q.shape()), ", k ",
                                                   ShapeString(k.shape()), ", v ", ShapeString(v.shape()),
                                                   ": expected [rows·2C = ", lay.local_tokens(), ", H, D]"));
  if (decay.numel() != q.dim(1))
    return absl::InvalidArgumentError(
        absl::StrCat("[cp_lightning] decay has ", decay.numel(), " entries for ", q.dim(1), " heads"));
  if (rows.has_docs() && rows.doc_ids.numel() != lay.local_tokens())
    return absl::InvalidArgumentError(absl::StrCat("[cp_lightning] doc_ids has ", rows.doc_ids.numel(),
                                                   " entries, expected ", lay.local_tokens()));
  // A document that starts exactly at a chunk's first token is invisible in
  // the local ids: the layout must carry the flags (ZigzagShardBatch, or
  // ZigzagChunks with the global doc ids).
  if (rows.has_docs() && lay.starts_document.size() != static_cast<size_t>(lay.rows * 2))
    return absl::InvalidArgumentError(
        "[cp_lightning] the rows have documents but the CpChunks has no starts_document flags: build it with "
        "ZigzagShardBatch or ZigzagChunks(rows, seq_len, cp, rank, global doc_ids)");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CpLinearScheme> ParseCpLinearScheme(std::string_view name) {
  if (name == "lasp1") return CpLinearScheme::kLasp1;
  if (name == "lasp2") return CpLinearScheme::kLasp2;
  return absl::InvalidArgumentError(
      absl::StrCat("[cp_lightning] parallel.cp_linear = \"", std::string(name), "\": expected lasp1 or lasp2"));
}

const char* CpLinearSchemeName(CpLinearScheme scheme) { return scheme == CpLinearScheme::kLasp1 ? "lasp1" : "lasp2"; }

void CpLightningSaved::Release(CpMemoryLedger* ledger) {
  if (ledger && entering.defined()) ledger->Drop(entering);
  entering = Tensor();
  cuts.clear();
}

absl::Status CpLightningForward(Communicator& cp_group, const CpLightningOptions& cp, const CpChunks& layout,
                                const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const ops::TokenRows& local_rows, Tensor& o, CpLightningSaved* saved) {
  LOOM_RETURN_IF_ERROR(CheckArgs(cp_group, layout, q, k, v, decay, local_rows));
  if (!o.defined()) o = Tensor::Empty(v.shape(), v.dtype(), v.device());
  LOOM_CHECK(o.shape() == v.shape() && o.dtype() == v.dtype() && o.device() == v.device(), "[cp_lightning] o is ",
             ShapeString(o.shape()), " on ", o.device().ToString());
  CpMemoryLedger* l = cp.ledger;
  std::vector<HeldTensor> io;
  for (const Tensor* t : {&q, &k, &v, static_cast<const Tensor*>(&o)}) io.push_back(HeldTensor::Wrap(l, *t));
  const Local a{layout, q, k, v, decay, local_rows, q.dim(1), q.dim(2), v.dim(2), HostDecay(decay, q)};
  return cp.scheme == CpLinearScheme::kLasp1 ? Lasp1Forward(cp_group, a, l, o, saved)
                                             : Lasp2Forward(cp_group, a, l, o, saved);
}

absl::Status CpLightningBackward(Communicator& cp_group, const CpLightningOptions& cp, const CpChunks& layout,
                                 const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const ops::TokenRows& local_rows, const Tensor& d_o, CpLightningSaved* saved,
                                 Tensor& dq, Tensor& dk, Tensor& dv) {
  LOOM_RETURN_IF_ERROR(CheckArgs(cp_group, layout, q, k, v, decay, local_rows));
  if (!saved || !saved->entering.defined())
    return absl::FailedPreconditionError("[cp_lightning] backward needs the CpLightningSaved of its forward");
  for (auto [gr, like] : {std::pair<Tensor*, const Tensor*>{&dq, &q}, {&dk, &k}, {&dv, &v}}) {
    if (!gr->defined()) *gr = Tensor::Empty(like->shape(), like->dtype(), like->device());
    LOOM_CHECK(gr->shape() == like->shape(), "[cp_lightning] gradient is ", ShapeString(gr->shape()));
    gr->Zero();  // the phases accumulate; this call writes
  }
  CpMemoryLedger* l = cp.ledger;
  std::vector<HeldTensor> io;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &d_o, &dq, &dk, &dv})
    io.push_back(HeldTensor::Wrap(l, *t));
  const Local a{layout, q, k, v, decay, local_rows, q.dim(1), q.dim(2), v.dim(2), HostDecay(decay, q)};
  absl::Status s = cp.scheme == CpLinearScheme::kLasp1 ? Lasp1Backward(cp_group, a, l, d_o, *saved, dq, dk, dv)
                                                       : Lasp2Backward(cp_group, a, l, d_o, *saved, dq, dk, dv);
  saved->Release(l);
  return s;
}

}  // namespace loom
