// CPU lightning attention: Lightning Attention-2 (Qin et al.) with a per-head
// decay λ, packed documents, and the three LASP-2 phases the fused call is
// built from.
//
// One head, one block of n tokens (local positions 0..n−1) entering with
// state E [Dk, Dv]:
//   intra   O  = [(Q Kᵀ) ⊙ Mask] V,   Mask[i,j] = λ^(i−j) if j ≤ i, same doc, else 0
//   inter   O[i] += λ^(i+1) q_i E                  (i before the first boundary)
//   state   S' = Σ_{j ≥ last document start} λ^(n−1−j) k_jᵀ v_j  +  [no boundary] λ^n E
// Every product is one GEMM on a strided head view: token t of head h sits at
// base + t·H·D + h·D, so a head of a block is a matrix with leading dimension
// H·D. Only the decay masks and row scalings are element-wise.
//
// Backward of the three (gradients accumulate, as the header says), with
// P = (Q Kᵀ) ⊙ Mask:
//   intra   dV += Pᵀ dO,  dA = (dO Vᵀ) ⊙ Mask,  dQ += dA K,  dK += dAᵀ Q
//   inter   dQ[i] += λ^(i+1) dO[i] Eᵀ,  dE += Σ_i λ^(i+1) q_iᵀ dO[i]
//   state   dk_j += λ^(n−1−j) v_j dS'ᵀ,  dv_j += λ^(n−1−j) k_j dS',  dE += [no boundary] λ^n dS'
// MoH (options.active): a block whose outputs are all inactive skips intra
// and inter (forward and backward) but still runs the state update.
#include "ops/lightning_attention.h"

#include "ops/convert.h"
#include "ops/lightning_by_document.h"
#include "ops/moh_gate.h"

#include "ops/cpu/blas.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace loom::ops {
namespace {

using cpu::Gemm;


// λ^0 .. λ^n, each from pow in double so that f32 tables are correctly rounded.
template <typename T>
std::vector<T> DecayPowers(double lambda, int64_t n) {
  std::vector<T> p(n + 1);
  for (int64_t i = 0; i <= n; ++i) p[i] = static_cast<T>(std::pow(lambda, static_cast<double>(i)));
  return p;
}

// Boundaries of a token range: positions i ≥ 1 whose document differs from
// i − 1's. docs == nullptr means one document.
int64_t FirstBoundary(const int32_t* docs, int64_t n) {
  if (docs)
    for (int64_t i = 1; i < n; ++i)
      if (docs[i] != docs[i - 1]) return i;
  return n;
}
// Start of the range's last document (0 when it has no boundary).
int64_t LastDocStart(const int32_t* docs, int64_t n) {
  if (docs)
    for (int64_t i = n - 1; i >= 1; --i)
      if (docs[i] != docs[i - 1]) return i;
  return 0;
}

// One head of a token range: row t of q is q + t·ldk.
template <typename T>
struct HeadSlice {
  const T* q;
  const T* k;
  const T* v;
  int64_t ldk;  // H·Dk
  int64_t ldv;  // H·Dv
  int64_t dk;
  int64_t dv;
  HeadSlice Offset(int64_t t) const { return {q + t * ldk, k + t * ldk, v + t * ldv, ldk, ldv, dk, dv}; }
};

// a [n, n] (row-major) ⊙= Mask: λ^(i−j) on and below the diagonal within a
// document, 0 elsewhere. Documents are non-decreasing, so row i's visible
// columns are [start of i's document, i].
template <typename T>
void ApplyDecayMask(T* a, int64_t n, const int32_t* docs, const T* pw) {
  int64_t doc_start = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (docs && i > 0 && docs[i] != docs[i - 1]) doc_start = i;
    T* row = a + i * n;
    for (int64_t j = 0; j < doc_start; ++j) row[j] = 0;
    for (int64_t j = doc_start; j <= i; ++j) row[j] *= pw[i - j];
    for (int64_t j = i + 1; j < n; ++j) row[j] = 0;
  }
}

// dst [rows, d] (contiguous) = diag(pw[first + sign·r]) · src rows (stride ld).
template <typename T>
void ScaledRows(const T* src, int64_t ld, int64_t rows, int64_t d, const T* pw, int64_t first, int64_t sign,
                std::vector<T>& dst) {
  dst.resize(rows * d);
  for (int64_t r = 0; r < rows; ++r) {
    const T w = pw[first + sign * r];
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = w * src[r * ld + c];
  }
}

// ---- Per-head phases. pw holds λ^0..λ^(n+1) at least. ----

// (1) s = Σ_{j ≥ last doc start} λ^(n−1−j) k_jᵀ v_j + [no boundary] carry·s.
// carry = 0 is the phase's zero initial state; the fused walk passes λ^n.
template <typename T>
bool ChunkStateHead(const HeadSlice<T>& x, int64_t n, const int32_t* docs, const T* pw, T carry, T* s,
                    std::vector<T>& scratch) {
  const int64_t start = LastDocStart(docs, n);
  const bool has_boundary = start > 0;
  const int64_t count = n - start;
  ScaledRows(x.k + start * x.ldk, x.ldk, count, x.dk, pw, n - 1 - start, -1, scratch);
  Gemm(CblasTrans, CblasNoTrans, x.dk, x.dv, count, T(1), scratch.data(), x.dk, x.v + start * x.ldv, x.ldv,
       has_boundary ? T(0) : carry, s, x.dv);
  return has_boundary;
}

template <typename T>
bool ChunkStateBackwardHead(const HeadSlice<T>& x, int64_t n, const int32_t* docs, const T* pw, const T* ds,
                            T* dk, T* dv, std::vector<T>& scratch) {
  const int64_t start = LastDocStart(docs, n);
  const int64_t count = n - start;
  ScaledRows(x.v + start * x.ldv, x.ldv, count, x.dv, pw, n - 1 - start, -1, scratch);
  Gemm(CblasNoTrans, CblasTrans, count, x.dk, x.dv, T(1), scratch.data(), x.dv, ds, x.dv, T(1),
       dk + start * x.ldk, x.ldk);
  ScaledRows(x.k + start * x.ldk, x.ldk, count, x.dk, pw, n - 1 - start, -1, scratch);
  Gemm(CblasNoTrans, CblasNoTrans, count, x.dv, x.dk, T(1), scratch.data(), x.dk, ds, x.dv, T(1),
       dv + start * x.ldv, x.ldv);
  return start > 0;
}

// (2) o = [(Q Kᵀ) ⊙ Mask] V, written; a is n×n scratch.
template <typename T>
void IntraHead(const HeadSlice<T>& x, int64_t n, const int32_t* docs, const T* pw, T* o, std::vector<T>& a) {
  a.resize(n * n);
  Gemm(CblasNoTrans, CblasTrans, n, n, x.dk, T(1), x.q, x.ldk, x.k, x.ldk, T(0), a.data(), n);
  ApplyDecayMask(a.data(), n, docs, pw);
  Gemm(CblasNoTrans, CblasNoTrans, n, x.dv, n, T(1), a.data(), n, x.v, x.ldv, T(0), o, x.ldv);
}

template <typename T>
void IntraBackwardHead(const HeadSlice<T>& x, int64_t n, const int32_t* docs, const T* pw, const T* d_o, T* dq,
                       T* dk, T* dv, std::vector<T>& p, std::vector<T>& da) {
  p.resize(n * n);
  da.resize(n * n);
  Gemm(CblasNoTrans, CblasTrans, n, n, x.dk, T(1), x.q, x.ldk, x.k, x.ldk, T(0), p.data(), n);
  ApplyDecayMask(p.data(), n, docs, pw);
  Gemm(CblasTrans, CblasNoTrans, n, x.dv, n, T(1), p.data(), n, d_o, x.ldv, T(1), dv, x.ldv);
  Gemm(CblasNoTrans, CblasTrans, n, n, x.dv, T(1), d_o, x.ldv, x.v, x.ldv, T(0), da.data(), n);
  ApplyDecayMask(da.data(), n, docs, pw);
  Gemm(CblasNoTrans, CblasNoTrans, n, x.dk, n, T(1), da.data(), n, x.k, x.ldk, T(1), dq, x.ldk);
  Gemm(CblasTrans, CblasNoTrans, n, x.dk, n, T(1), da.data(), n, x.q, x.ldk, T(1), dk, x.ldk);
}

// (3) o[i] += λ^(i+1) q_i s for i before the first boundary.
template <typename T>
void InterHead(const HeadSlice<T>& x, int64_t n, const int32_t* docs, const T* pw, const T* s, T* o,
               std::vector<T>& scratch) {
  const int64_t fb = FirstBoundary(docs, n);
  ScaledRows(x.q, x.ldk, fb, x.dk, pw, 1, 1, scratch);
  Gemm(CblasNoTrans, CblasNoTrans, fb, x.dv, x.dk, T(1), scratch.data(), x.dk, s, x.dv, T(1), o, x.ldv);
}

template <typename T>
void InterBackwardHead(const HeadSlice<T>& x, int64_t n, const int32_t* docs, const T* pw, const T* s,
                       const T* d_o, T* dq, T* ds, std::vector<T>& scratch) {
  const int64_t fb = FirstBoundary(docs, n);
  ScaledRows(d_o, x.ldv, fb, x.dv, pw, 1, 1, scratch);  // λ^(i+1) dO[i]
  Gemm(CblasNoTrans, CblasTrans, fb, x.dk, x.dv, T(1), scratch.data(), x.dv, s, x.dv, T(1), dq, x.ldk);
  Gemm(CblasTrans, CblasNoTrans, x.dk, x.dv, fb, T(1), x.q, x.ldk, scratch.data(), x.dv, T(1), ds, x.dv);
}

// ---- The block walk (Lightning Attention-2) over n tokens of one head. ----
// Block b covers [b·B, min((b+1)·B, n)). Its entry state E_b is 0 when its
// first token starts a document, else the running state; then
//   O_b = intra + inter(E_b),   S_{b+1} = has_boundary ? M_b : λ^(B_b) E_b + M_b.
// Temporaries: B×B and Dk×Dv, plus B rows of scaled q/k/v.
struct BlockWalk {
  int64_t n;
  int64_t block;
  const int32_t* docs;  // n ids or nullptr
  int64_t blocks() const { return (n + block - 1) / block; }
  int64_t length(int64_t b) const { return std::min(block, n - b * block); }
  const int32_t* docs_at(int64_t t) const { return docs ? docs + t : nullptr; }
  bool starts_document(int64_t t) const { return t > 0 && docs && docs[t] != docs[t - 1]; }
};

// o may be nullptr (states only); s_in nullptr means zero; s_out and
// entries (blocks()·Dk·Dv, the entry states E_b) are optional. runs: empty,
// or per block whether its output is computed (MoH; skipped ones are left
// as they are).
template <typename T>
void BlocksForwardHead(const HeadSlice<T>& x, const BlockWalk& walk, double lambda, const T* s_in, T* o, T* s_out,
                       std::vector<T>* entries, const std::vector<char>& runs = {}) {
  const int64_t dkdv = x.dk * x.dv;
  const std::vector<T> pw = DecayPowers<T>(lambda, std::min(walk.block, walk.n) + 1);
  std::vector<T> s(dkdv, T(0)), a, rows;
  bool s_is_zero = s_in == nullptr;
  if (s_in) std::copy(s_in, s_in + dkdv, s.begin());
  if (entries) entries->resize(walk.blocks() * dkdv);
  for (int64_t b = 0; b < walk.blocks(); ++b) {
    const int64_t t0 = b * walk.block, len = walk.length(b);
    const HeadSlice<T> xb = x.Offset(t0);
    const int32_t* db = walk.docs_at(t0);
    if (walk.starts_document(t0)) {
      std::fill(s.begin(), s.end(), T(0));
      s_is_zero = true;
    }
    if (entries) std::copy(s.begin(), s.end(), entries->begin() + b * dkdv);
    if (o && (runs.empty() || runs[b])) {
      IntraHead(xb, len, db, pw.data(), o + t0 * x.ldv, a);
      if (!s_is_zero) InterHead(xb, len, db, pw.data(), s.data(), o + t0 * x.ldv, rows);
    }
    ChunkStateHead(xb, len, db, pw.data(), pw[len], s.data(), rows);
    s_is_zero = false;
  }
  if (s_out) std::copy(s.begin(), s.end(), s_out);
}

// Reverse walk: dS is the gradient of S_{b+1}; entry states are recomputed by
// a states-only forward (blocks()·Dk·Dv per head, the price of not storing
// them across the API). ds_out / ds_in may be nullptr; dq, dk, dv accumulate;
// runs as in the forward (a skipped block must have d_o = 0).
template <typename T>
void BlocksBackwardHead(const HeadSlice<T>& x, const BlockWalk& walk, double lambda, const T* s_in, const T* d_o,
                        const T* ds_out, T* dq, T* dk, T* dv, T* ds_in, const std::vector<char>& runs = {}) {
  const int64_t dkdv = x.dk * x.dv;
  std::vector<T> entries;
  BlocksForwardHead<T>(x, walk, lambda, s_in, nullptr, nullptr, &entries);
  const std::vector<T> pw = DecayPowers<T>(lambda, std::min(walk.block, walk.n) + 1);
  std::vector<T> ds(dkdv, T(0)), de(dkdv), p, da, rows;
  if (ds_out) std::copy(ds_out, ds_out + dkdv, ds.begin());
  for (int64_t b = walk.blocks() - 1; b >= 0; --b) {
    const int64_t t0 = b * walk.block, len = walk.length(b);
    const HeadSlice<T> xb = x.Offset(t0);
    const int32_t* db = walk.docs_at(t0);
    const bool has_boundary =
        ChunkStateBackwardHead(xb, len, db, pw.data(), ds.data(), dk + t0 * x.ldk, dv + t0 * x.ldv, rows);
    const T carry = has_boundary ? T(0) : pw[len];
    for (int64_t i = 0; i < dkdv; ++i) de[i] = carry * ds[i];
    const bool reset = walk.starts_document(t0);
    const bool run = runs.empty() || runs[b];  // else d_o is 0 here: nothing to add
    if (!reset && run)
      InterBackwardHead(xb, len, db, pw.data(), entries.data() + b * dkdv, d_o + t0 * x.ldv, dq + t0 * x.ldk,
                        de.data(), rows);
    if (run)
      IntraBackwardHead(xb, len, db, pw.data(), d_o + t0 * x.ldv, dq + t0 * x.ldk, dk + t0 * x.ldk,
                        dv + t0 * x.ldv, p, da);
    if (reset)
      std::fill(ds.begin(), ds.end(), T(0));
    else
      ds.swap(de);
  }
  if (ds_in) std::copy(ds.begin(), ds.end(), ds_in);
}

// ---- Argument checks ----

struct Dims {
  int64_t t, h, dk, dv;
};

void CheckSame(const Tensor& t, const Shape& shape, DType dtype, const char* name) {
  LOOM_CHECK(t.defined(), "[lightning_attention] ", name, " is undefined");
  LOOM_CHECK(t.device().is_cpu(), "[lightning_attention] ", name, " is on ", t.device().ToString(),
             "; the CPU op takes CPU tensors");
  LOOM_CHECK(t.shape() == shape, "[lightning_attention] ", name, " is ", ShapeString(t.shape()), ", expected ",
             ShapeString(shape));
  LOOM_CHECK(t.dtype() == dtype, "[lightning_attention] ", name, " is ", DTypeName(t.dtype()), ", expected ",
             DTypeName(dtype));
}

// `q_name` names the first operand: the chunk-state phase passes k there.
Dims CheckInputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                 const char* q_name = "q") {
  LOOM_CHECK(q.defined() && q.ndim() == 3, "[lightning_attention] ", q_name, " must be [T, H, Dk], got ",
             q.defined() ? ShapeString(q.shape()) : std::string("undefined"));
  LOOM_CHECK(q.dtype() == DType::kF32 || q.dtype() == DType::kF64,
             "[lightning_attention] the CPU op computes in f32 or f64, got ", DTypeName(q.dtype()));
  const Dims d{q.dim(0), q.dim(1), q.dim(2), v.defined() && v.ndim() == 3 ? v.dim(2) : -1};
  CheckSame(q, q.shape(), q.dtype(), q_name);
  CheckSame(k, {d.t, d.h, d.dk}, q.dtype(), "k");
  LOOM_CHECK(d.dv >= 1, "[lightning_attention] v must be [T, H, Dv], got ",
             v.defined() ? ShapeString(v.shape()) : std::string("undefined"));
  CheckSame(v, {d.t, d.h, d.dv}, q.dtype(), "v");
  LOOM_CHECK(d.h >= 1 && d.dk >= 1, "[lightning_attention] H and Dk must be positive, got ",
             ShapeString(q.shape()));
  CheckSame(decay, {d.h}, q.dtype(), "decay");
  for (int64_t h = 0; h < d.h; ++h) {
    const double lambda = decay.Get(h);
    LOOM_CHECK(lambda > 0 && lambda <= 1, "[lightning_attention] decay[", h, "] = ", lambda,
               " is outside (0, 1]");
  }
  return d;
}

// The inter phase sees q and S only; Dv comes from S [H, Dk, Dv].
Dims CheckInterInputs(const Tensor& q, const Tensor& decay, const Tensor& s) {
  LOOM_CHECK(s.defined() && s.ndim() == 3 && s.numel() > 0, "[lightning_attention] s must be [H, Dk, Dv], got ",
             s.defined() ? ShapeString(s.shape()) : std::string("undefined"));
  LOOM_CHECK(s.dtype() == DType::kF32 || s.dtype() == DType::kF64,
             "[lightning_attention] the CPU op computes in f32 or f64, got ", DTypeName(s.dtype()));
  const Dims d{q.defined() && q.ndim() == 3 ? q.dim(0) : 0, s.dim(0), s.dim(1), s.dim(2)};
  CheckSame(q, {d.t, d.h, d.dk}, s.dtype(), "q");
  CheckSame(s, s.shape(), s.dtype(), "s");
  CheckSame(decay, {d.h}, q.dtype(), "decay");
  for (int64_t h = 0; h < d.h; ++h)
    LOOM_CHECK(decay.Get(h) > 0 && decay.Get(h) <= 1, "[lightning_attention] decay[", h, "] = ", decay.Get(h),
               " is outside (0, 1]");
  return d;
}

// A chunk's ids non-decreasing over [0, c) (rows: CheckDocumentsInOrder).
void CheckChunkDocsInOrder(const int32_t* docs, int64_t c) {
  for (int64_t t = 1; t < c; ++t)
    LOOM_CHECK(docs[t] >= docs[t - 1], "[lightning_attention] doc_ids decrease at token ", t, " (", docs[t - 1],
               " then ", docs[t], ")");
}

void CheckRows(const TokenRows& rows, int64_t tokens) {
  const Tensor& cu = rows.cu_seqlens;
  LOOM_CHECK(cu.defined() && cu.ndim() == 1 && cu.numel() >= 1 && cu.dtype() == DType::kI32 && cu.device().is_cpu(),
             "[lightning_attention] cu_seqlens must be a CPU i32 [R+1] tensor");
  const int32_t* c = cu.data<int32_t>();
  const int64_t r = rows.rows();
  LOOM_CHECK(c[0] == 0 && c[r] == tokens, "[lightning_attention] cu_seqlens must run from 0 to T = ", tokens,
             ", got ", c[0], " .. ", c[r]);
  for (int64_t i = 0; i < r; ++i)
    LOOM_CHECK(c[i] <= c[i + 1], "[lightning_attention] cu_seqlens decreases at ", i + 1);
  if (rows.has_docs()) {
    LOOM_CHECK(rows.doc_ids.dtype() == DType::kI32 && rows.doc_ids.shape() == Shape{tokens} &&
                   rows.doc_ids.device().is_cpu(),
               "[lightning_attention] doc_ids must be a CPU i32 [T] tensor, T = ", tokens);
    CheckDocumentsInOrder(rows, "lightning_attention", "rows");
  }
}

// Chunk-phase doc ids: optional CPU i32 [C], non-decreasing.
const int32_t* ChunkDocs(const Tensor& doc_ids, int64_t c) {
  if (!doc_ids.defined()) return nullptr;
  LOOM_CHECK(doc_ids.dtype() == DType::kI32 && doc_ids.shape() == Shape{c} && doc_ids.device().is_cpu(),
             "[lightning_attention] chunk doc_ids must be a CPU i32 [C] tensor, C = ", c);
  CheckChunkDocsInOrder(doc_ids.data<int32_t>(), c);
  return doc_ids.data<int32_t>();
}

// A written output: allocated when undefined, else checked.
void PrepareWritten(Tensor& t, const Shape& shape, DType dtype, const char* name) {
  if (!t.defined()) t = Tensor::Empty(shape, dtype);
  CheckSame(t, shape, dtype, name);
}
// An accumulated output: zeros when undefined, else checked and kept.
void PrepareAccumulated(Tensor& t, const Shape& shape, DType dtype, const char* name) {
  if (!t.defined()) t = Tensor::Zeros(shape, dtype);
  CheckSame(t, shape, dtype, name);
}

template <typename T>
HeadSlice<T> Head(const Tensor& q, const Tensor& k, const Tensor& v, const Dims& d, int64_t t0, int64_t h) {
  return {q.data<T>() + t0 * d.h * d.dk + h * d.dk, k.data<T>() + t0 * d.h * d.dk + h * d.dk,
          v.data<T>() + t0 * d.h * d.dv + h * d.dv, d.h * d.dk, d.h * d.dv, d.dk, d.dv};
}

// ---- Loops over (row, head) pairs or heads, one dtype. OpenMP pragmas live
// here rather than inside LOOM_DISPATCH_FLOAT, whose macro argument cannot
// hold a #pragma. Each iteration touches disjoint strided slices of the
// outputs, so the loops are race-free.

// MoH's options.active [H, ceil(T / block)]: whether head h's output at
// token t is computed.
struct ActiveMask {
  const int32_t* on = nullptr;  // null: everything
  int64_t blocks = 0, block = 1;
  bool at(int64_t h, int64_t t) const { return on == nullptr || on[h * blocks + t / block] != 0; }
  // Per block of the walk over the row starting at token `begin`: whether
  // any of its tokens is active; empty without a mask.
  std::vector<char> Runs(int64_t h, int64_t begin, const BlockWalk& walk) const {
    std::vector<char> runs;
    if (on == nullptr) return runs;
    runs.assign(walk.blocks(), 0);
    for (int64_t i = 0; i < walk.n; ++i) runs[i / walk.block] |= at(h, begin + i) ? 1 : 0;
    return runs;
  }
  // o[t, h] = 0 for the row's inactive tokens (blocks the walk ran partly).
  template <typename T>
  void ZeroInactive(int64_t h, int64_t begin, int64_t n, T* o_head, int64_t ld, int64_t dv) const {
    if (on == nullptr) return;
    for (int64_t i = 0; i < n; ++i)
      if (!at(h, begin + i)) std::fill_n(o_head + i * ld, dv, T(0));
  }
};

ActiveMask MaskOf(const LightningOptions& options) {
  if (!options.active.defined()) return {};
  return {options.active.data<int32_t>(), options.active.dim(1), options.block};
}

// Threads pay off only beyond a few hundred kFLOP: below that (gradient
// checks call the op thousands of times on tiny inputs) waking the team,
// which spins when the machine is busy, costs more than the work.
bool WorthThreads(int64_t tokens, const Dims& d, int64_t block) {
  const int64_t flops = 2 * tokens * d.h * (std::min(block, tokens) * (d.dk + d.dv) + 2 * d.dk * d.dv);
  return flops > (int64_t{1} << 19);
}

template <typename T>
void ForwardRows(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay, const TokenRows& rows,
                 const Dims& d, int64_t block, const ActiveMask& active, const Tensor& state_in, Tensor& o,
                 Tensor& state_out) {
  const int32_t* docs = rows.has_docs() ? rows.doc_ids.data<int32_t>() : nullptr;
  const T* s_in = state_in.defined() ? state_in.data<T>() : nullptr;
  const T* lam = decay.data<T>();
  T* op = o.data<T>();
  T* s_out = state_out.data<T>();
  const int64_t pairs = rows.rows() * d.h, dkdv = d.dk * d.dv;
  const bool threads = WorthThreads(d.t, d, block);
#pragma omp parallel for schedule(dynamic) if (threads)
  for (int64_t rh = 0; rh < pairs; ++rh) {
    const int64_t row = rh / d.h, h = rh % d.h;
    const int64_t begin = rows.begin(row);
    const BlockWalk walk{rows.end(row) - begin, block, docs ? docs + begin : nullptr};
    T* o_head = op + begin * d.h * d.dv + h * d.dv;
    const std::vector<char> runs = active.Runs(h, begin, walk);
    BlocksForwardHead<T>(Head<T>(q, k, v, d, begin, h), walk, lam[h], s_in ? s_in + rh * dkdv : nullptr, o_head,
                         s_out + rh * dkdv, nullptr, runs);
    active.ZeroInactive(h, begin, walk.n, o_head, d.h * d.dv, d.dv);  // skipped blocks included
  }
}

template <typename T>
void BackwardRows(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay, const TokenRows& rows,
                  const Dims& d, int64_t block, const ActiveMask& active, const Tensor& state_in, const Tensor& d_o,
                  const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_state_in) {
  const int32_t* docs = rows.has_docs() ? rows.doc_ids.data<int32_t>() : nullptr;
  const T* s_in = state_in.defined() ? state_in.data<T>() : nullptr;
  const T* ds_out = d_state_out.defined() ? d_state_out.data<T>() : nullptr;
  T* ds_in = d_state_in.defined() ? d_state_in.data<T>() : nullptr;
  const T* lam = decay.data<T>();
  const int64_t pairs = rows.rows() * d.h, dkdv = d.dk * d.dv;
  const bool threads = WorthThreads(d.t, d, block);
#pragma omp parallel for schedule(dynamic) if (threads)
  for (int64_t rh = 0; rh < pairs; ++rh) {
    const int64_t row = rh / d.h, h = rh % d.h;
    const int64_t begin = rows.begin(row);
    const BlockWalk walk{rows.end(row) - begin, block, docs ? docs + begin : nullptr};
    const int64_t qo = begin * d.h * d.dk + h * d.dk, vo = begin * d.h * d.dv + h * d.dv;
    BlocksBackwardHead<T>(Head<T>(q, k, v, d, begin, h), walk, lam[h], s_in ? s_in + rh * dkdv : nullptr,
                          d_o.data<T>() + vo, ds_out ? ds_out + rh * dkdv : nullptr, dq.data<T>() + qo,
                          dk.data<T>() + qo, dv.data<T>() + vo, ds_in ? ds_in + rh * dkdv : nullptr,
                          active.Runs(h, begin, walk));
  }
}

template <typename T>
void ChunkStateHeads(const Tensor& k, const Tensor& v, const Tensor& decay, const int32_t* docs, const Dims& d,
                     Tensor& m) {
#pragma omp parallel for schedule(dynamic) if (WorthThreads(d.t, d, 0))
  for (int64_t h = 0; h < d.h; ++h) {
    const std::vector<T> pw = DecayPowers<T>(decay.data<T>()[h], d.t + 1);
    std::vector<T> rows;
    ChunkStateHead<T>(Head<T>(k, k, v, d, 0, h), d.t, docs, pw.data(), T(0), m.data<T>() + h * d.dk * d.dv,
                      rows);
  }
}

template <typename T>
void ChunkStateBackwardHeads(const Tensor& k, const Tensor& v, const Tensor& decay, const int32_t* docs,
                             const Dims& d, const Tensor& dm, Tensor& dk, Tensor& dv) {
#pragma omp parallel for schedule(dynamic) if (WorthThreads(d.t, d, 0))
  for (int64_t h = 0; h < d.h; ++h) {
    const std::vector<T> pw = DecayPowers<T>(decay.data<T>()[h], d.t + 1);
    std::vector<T> rows;
    ChunkStateBackwardHead<T>(Head<T>(k, k, v, d, 0, h), d.t, docs, pw.data(), dm.data<T>() + h * d.dk * d.dv,
                              dk.data<T>() + h * d.dk, dv.data<T>() + h * d.dv, rows);
  }
}

template <typename T>
void IntraHeads(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay, const BlockWalk& walk,
                const Dims& d, Tensor& o) {
#pragma omp parallel for schedule(dynamic) if (WorthThreads(d.t, d, walk.block))
  for (int64_t h = 0; h < d.h; ++h)
    BlocksForwardHead<T>(Head<T>(q, k, v, d, 0, h), walk, decay.data<T>()[h], nullptr, o.data<T>() + h * d.dv,
                         nullptr, nullptr);
}

template <typename T>
void IntraBackwardHeads(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                        const BlockWalk& walk, const Dims& d, const Tensor& d_o, Tensor& dq, Tensor& dk,
                        Tensor& dv) {
#pragma omp parallel for schedule(dynamic) if (WorthThreads(d.t, d, walk.block))
  for (int64_t h = 0; h < d.h; ++h)
    BlocksBackwardHead<T>(Head<T>(q, k, v, d, 0, h), walk, decay.data<T>()[h], nullptr, d_o.data<T>() + h * d.dv,
                          nullptr, dq.data<T>() + h * d.dk, dk.data<T>() + h * d.dk, dv.data<T>() + h * d.dv,
                          nullptr);
}

// The inter phase reads only q; k and v of the slice stay null.
template <typename T>
HeadSlice<T> QueryHead(const Tensor& q, const Dims& d, int64_t h) {
  return {q.data<T>() + h * d.dk, nullptr, nullptr, d.h * d.dk, d.h * d.dv, d.dk, d.dv};
}

template <typename T>
void InterHeads(const Tensor& q, const Tensor& decay, const int32_t* docs, const Dims& d, const Tensor& s,
                Tensor& o) {
#pragma omp parallel for schedule(dynamic) if (WorthThreads(d.t, d, 0))
  for (int64_t h = 0; h < d.h; ++h) {
    const std::vector<T> pw = DecayPowers<T>(decay.data<T>()[h], d.t + 1);
    std::vector<T> rows;
    InterHead<T>(QueryHead<T>(q, d, h), d.t, docs, pw.data(), s.data<T>() + h * d.dk * d.dv,
                 o.data<T>() + h * d.dv, rows);
  }
}

template <typename T>
void InterBackwardHeads(const Tensor& q, const Tensor& decay, const int32_t* docs, const Dims& d, const Tensor& s,
                        const Tensor& d_o, Tensor& dq, Tensor& ds) {
#pragma omp parallel for schedule(dynamic) if (WorthThreads(d.t, d, 0))
  for (int64_t h = 0; h < d.h; ++h) {
    const std::vector<T> pw = DecayPowers<T>(decay.data<T>()[h], d.t + 1);
    std::vector<T> rows;
    InterBackwardHead<T>(QueryHead<T>(q, d, h), d.t, docs, pw.data(), s.data<T>() + h * d.dk * d.dv,
                         d_o.data<T>() + h * d.dv, dq.data<T>() + h * d.dk, ds.data<T>() + h * d.dk * d.dv, rows);
  }
}

void CheckActive(const LightningOptions& options, const Dims& d) {
  if (!options.active.defined()) return;
  const Tensor& a = options.active;
  const int64_t blocks = (d.t + options.block - 1) / options.block;
  LOOM_CHECK(a.device().is_cpu() && a.dtype() == DType::kI32 && a.shape() == (Shape{d.h, blocks}),
             "[lightning_attention] active must be a CPU i32 [H, ceil(T / block)] = [", d.h, ", ", blocks, "], got ",
             DTypeName(a.dtype()), " ", ShapeString(a.shape()), " on ", a.device().ToString());
}

// MoH's mask for CUDA tensors: on q's device (a host mask is copied), or undefined.
Tensor ActiveOnDevice(const LightningOptions& options, Device device) {
  if (!options.active.defined() || options.active.device() == device) return options.active;
  return options.active.To(device);
}

// ---- CUDA tensors go to ops/cuda (the default stream, a workspace per call;
// callers that care about speed call ops::cuda:: with their own). Undefined
// outputs are allocated on q's device as the CPU path allocates them. ----

// The bf16 kernels are compiled for head dims 64 and 128.
bool Bf16KernelsFit(const Tensor& q) { return q.dim(-1) == 64 || q.dim(-1) == 128; }
Tensor F32(const Tensor& t) { return ConvertedCopy(t, DType::kF32); }

Tensor& OnDevice(Tensor& t, const Shape& shape, DType dtype, Device device, bool zero) {
  if (!t.defined()) t = zero ? Tensor::Zeros(shape, dtype, device) : Tensor::Empty(shape, dtype, device);
  return t;
}

// The kernels read λ as f32 on q's device; a host decay (the layer keeps one)
// is copied per call (H floats).
Tensor DecayOnDevice(const Tensor& decay, Device device) {
  if (decay.device() == device) return decay;
  LOOM_CHECK(decay.defined() && decay.device().is_cpu(), "[lightning_attention] decay is on ",
             decay.device().ToString(), " but q on ", device.ToString());
  const Tensor f32 = decay.dtype() == DType::kF32 ? decay : decay.To(DType::kF32);
  Tensor g = Tensor::Empty(f32.shape(), DType::kF32, device);
  g.CopyFrom(f32);
  return g;
}

}  // namespace

// ---- Decay ----

std::vector<double> AlibiSlopes(int heads) {
  LOOM_CHECK(heads >= 1, "[lightning_attention] AlibiSlopes needs heads >= 1, got ", heads);
  // For a power of two n: start = 2^(−2^(−(log2 n − 3))), slope_h = start^(h+1).
  auto power_of_two = [](int n) {
    const double start = std::pow(2.0, -std::pow(2.0, -(std::log2(static_cast<double>(n)) - 3)));
    std::vector<double> s(n);
    for (int h = 0; h < n; ++h) s[h] = std::pow(start, h + 1);
    return s;
  };
  int n = 1;
  while (2 * n <= heads) n *= 2;
  std::vector<double> slopes = power_of_two(n);
  if (n == heads) return slopes;
  // ALiBi's interleave: the missing heads take every other slope of 2n.
  const std::vector<double> finer = power_of_two(2 * n);
  for (int i = 0; static_cast<int>(slopes.size()) < heads; i += 2) slopes.push_back(finer[i]);
  return slopes;
}

std::vector<double> LightningDecay(int heads, int layer, int layers) {
  LOOM_CHECK(layers >= 1 && layer >= 0 && layer < layers, "[lightning_attention] layer ", layer, " of ", layers,
             " layers");
  // MiniMax's depth schedule: early layers decay fast, the last barely at all.
  // With one layer the schedule's 0/0 is taken as factor 1.
  const double factor =
      layers == 1 ? 1.0 : 1.0 - static_cast<double>(layer) / static_cast<double>(layers - 1) + 1e-5;
  std::vector<double> lambda = AlibiSlopes(heads);
  for (double& x : lambda) x = std::exp(-x * factor);
  return lambda;
}

// ---- Fused calls ----

void LightningAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                               const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                               Tensor& o, Tensor& state_out) {
  if (!q.device().is_cpu()) {  // f32: the f32 kernels; bf16: the tensor-core kernels
    if (rows.has_docs())
      return by_document::LightningAttentionForward(q, k, v, decay, rows, options, state_in, o, state_out);
    const Tensor lambda = DecayOnDevice(decay, q.device());
    const Tensor active = ActiveOnDevice(options, q.device());
    const Shape state_shape{rows.rows(), q.dim(1), q.dim(2), v.dim(2)};
    Tensor& out = OnDevice(o, v.shape(), v.dtype(), q.device(), false);
    Tensor& s_out = OnDevice(state_out, state_shape, DType::kF32, q.device(), false);
    if (q.dtype() == DType::kBF16 && Bf16KernelsFit(q)) {
      cuda::LightningWorkspace ws;
      return cuda::LightningAttentionForward(q, k, v, lambda, rows, state_in, out, s_out, ws, nullptr, active,
                                             options.block);
    }
    // The f32 kernels (on f32 copies for small bf16 test models) compute
    // every output; MoH's inactive ones are then zeroed.
    if (q.dtype() == DType::kF32) {
      cuda::LightningAttentionF32Forward(q, k, v, lambda, rows, state_in, out, s_out);
    } else {
      Tensor o32 = ConvertedCopy(out, DType::kF32);
      cuda::LightningAttentionF32Forward(F32(q), F32(k), F32(v), lambda, rows, state_in, o32, s_out);
      Convert(o32, out);
    }
    if (active.defined()) ZeroInactiveHeads(active, options.block, out);
    return;
  }
  const Dims d = CheckInputs(q, k, v, decay);
  CheckRows(rows, d.t);
  LOOM_CHECK(options.block >= 1, "[lightning_attention] block must be >= 1, got ", options.block);
  const Shape state_shape{rows.rows(), d.h, d.dk, d.dv};
  if (state_in.defined()) CheckSame(state_in, state_shape, q.dtype(), "state_in");
  PrepareWritten(o, {d.t, d.h, d.dv}, q.dtype(), "o");
  PrepareWritten(state_out, state_shape, q.dtype(), "state_out");
  CheckActive(options, d);
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    ForwardRows<T>(q, k, v, decay, rows, d, options.block, MaskOf(options), state_in, o, state_out);
  });
}

void LightningAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const TokenRows& rows, const LightningOptions& options, const Tensor& state_in,
                                const Tensor& d_o, const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv,
                                Tensor& d_state_in) {
  if (!q.device().is_cpu()) {
    if (rows.has_docs())
      return by_document::LightningAttentionBackward(q, k, v, decay, rows, options, state_in, d_o, d_state_out, dq,
                                                     dk, dv, d_state_in);
    const Tensor lambda = DecayOnDevice(decay, q.device());
    const Tensor active = ActiveOnDevice(options, q.device());
    Tensor& gq = OnDevice(dq, q.shape(), q.dtype(), q.device(), false);
    Tensor& gk = OnDevice(dk, k.shape(), k.dtype(), q.device(), false);
    Tensor& gv = OnDevice(dv, v.shape(), v.dtype(), q.device(), false);
    if (q.dtype() == DType::kBF16 && Bf16KernelsFit(q)) {
      cuda::LightningWorkspace ws;
      return cuda::LightningAttentionBackward(q, k, v, lambda, rows, state_in, d_o, d_state_out, gq, gk, gv,
                                              d_state_in, ws, nullptr, active, options.block);
    }
    // The f32 kernels read MoH's inactive d_o as 0 from a masked copy.
    Tensor d_o_read = d_o;
    if (active.defined()) {
      d_o_read = d_o.Clone();
      ZeroInactiveHeads(active, options.block, d_o_read);
    }
    if (q.dtype() == DType::kF32)
      return cuda::LightningAttentionF32Backward(q, k, v, lambda, rows, state_in, d_o_read, d_state_out, gq, gk, gv,
                                                 d_state_in);
    Tensor dq32 = F32(gq), dk32 = F32(gk), dv32 = F32(gv);
    cuda::LightningAttentionF32Backward(F32(q), F32(k), F32(v), lambda, rows, state_in, F32(d_o_read), d_state_out,
                                        dq32, dk32, dv32, d_state_in);
    Convert(dq32, gq);
    Convert(dk32, gk);
    return Convert(dv32, gv);
  }
  const Dims d = CheckInputs(q, k, v, decay);
  CheckRows(rows, d.t);
  LOOM_CHECK(options.block >= 1, "[lightning_attention] block must be >= 1, got ", options.block);
  const Shape state_shape{rows.rows(), d.h, d.dk, d.dv};
  if (state_in.defined()) CheckSame(state_in, state_shape, q.dtype(), "state_in");
  if (d_state_out.defined()) CheckSame(d_state_out, state_shape, q.dtype(), "d_state_out");
  if (d_state_in.defined()) CheckSame(d_state_in, state_shape, q.dtype(), "d_state_in");
  CheckSame(d_o, {d.t, d.h, d.dv}, q.dtype(), "d_o");
  PrepareWritten(dq, q.shape(), q.dtype(), "dq");
  PrepareWritten(dk, k.shape(), q.dtype(), "dk");
  PrepareWritten(dv, v.shape(), q.dtype(), "dv");
  // The per-block phases accumulate; the fused call writes.
  dq.Zero();
  dk.Zero();
  dv.Zero();
  CheckActive(options, d);
  // MoH: inactive outputs read d_o as 0 (blocks run partly need it).
  Tensor d_o_read = d_o;
  if (options.active.defined()) {
    d_o_read = d_o.Clone();
    LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
      const ActiveMask active = MaskOf(options);
      for (int64_t h = 0; h < d.h; ++h) active.ZeroInactive(h, 0, d.t, d_o_read.data<T>() + h * d.dv, d.h * d.dv, d.dv);
    });
  }
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    BackwardRows<T>(q, k, v, decay, rows, d, options.block, MaskOf(options), state_in, d_o_read, d_state_out, dq, dk,
                    dv, d_state_in);
  });
}

// ---- The O(n²) definition ----

void LightningAttentionNaive(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                             const TokenRows& rows, const Tensor& state_in, Tensor& o, Tensor& state_out) {
  const Dims d = CheckInputs(q, k, v, decay);
  CheckRows(rows, d.t);
  const int64_t r = rows.rows();
  const Shape state_shape{r, d.h, d.dk, d.dv};
  if (state_in.defined()) CheckSame(state_in, state_shape, q.dtype(), "state_in");
  PrepareWritten(o, {d.t, d.h, d.dv}, q.dtype(), "o");
  PrepareWritten(state_out, state_shape, q.dtype(), "state_out");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] {
    const T *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    T* op = o.data<T>();
    auto Q = [&](int64_t t, int64_t h, int64_t c) { return qp[(t * d.h + h) * d.dk + c]; };
    auto K = [&](int64_t t, int64_t h, int64_t c) { return kp[(t * d.h + h) * d.dk + c]; };
    auto V = [&](int64_t t, int64_t h, int64_t c) { return vp[(t * d.h + h) * d.dv + c]; };
    for (int64_t row = 0; row < r; ++row) {
      const int64_t b = rows.begin(row), e = rows.end(row);
      for (int64_t h = 0; h < d.h; ++h) {
        const double lambda = decay.Get(h);
        const int64_t sidx = (row * d.h + h) * d.dk * d.dv;
        auto S0 = [&](int64_t i, int64_t j) -> double {
          return state_in.defined() ? state_in.data<T>()[sidx + i * d.dv + j] : 0.0;
        };
        // o_t = Σ_{s≤t, same doc} λ^(t−s) (q_t·k_s) v_s + [t in the first doc] λ^(t−b+1) q_t S0
        for (int64_t t = b; t < e; ++t) {
          std::vector<double> acc(d.dv, 0.0);
          for (int64_t s = b; s <= t; ++s) {
            if (rows.doc(s) != rows.doc(t)) continue;
            double qk = 0;
            for (int64_t c = 0; c < d.dk; ++c) qk += Q(t, h, c) * K(s, h, c);
            const double w = std::pow(lambda, static_cast<double>(t - s)) * qk;
            for (int64_t c = 0; c < d.dv; ++c) acc[c] += w * V(s, h, c);
          }
          if (rows.doc(t) == rows.doc(b)) {
            const double w = std::pow(lambda, static_cast<double>(t - b + 1));
            for (int64_t j = 0; j < d.dv; ++j)
              for (int64_t i = 0; i < d.dk; ++i) acc[j] += w * Q(t, h, i) * S0(i, j);
          }
          for (int64_t c = 0; c < d.dv; ++c) op[(t * d.h + h) * d.dv + c] = static_cast<T>(acc[c]);
        }
        // S = Σ_{s in the last doc} λ^(e−1−s) k_sᵀ v_s (+ λ^n S0 if the last doc is the first)
        int64_t last = e;
        while (last > b && (last == e || rows.doc(last - 1) == rows.doc(e - 1))) --last;
        const double carry = last == b ? std::pow(lambda, static_cast<double>(e - b)) : 0.0;
        T* so = state_out.data<T>() + sidx;
        for (int64_t i = 0; i < d.dk; ++i)
          for (int64_t j = 0; j < d.dv; ++j) {
            double s = carry * S0(i, j);
            for (int64_t t = last; t < e; ++t)
              s += std::pow(lambda, static_cast<double>(e - 1 - t)) * K(t, h, i) * V(t, h, j);
            so[i * d.dv + j] = static_cast<T>(s);
          }
      }
    }
  });
}

// ---- Phases on one chunk ----

bool LightningChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m) {
  if (!k.device().is_cpu()) {
    if (doc_ids.defined()) return by_document::LightningChunkState(k, v, decay, doc_ids, m);
    const Tensor lambda = DecayOnDevice(decay, k.device());
    Tensor& out = OnDevice(m, {k.dim(1), k.dim(2), v.dim(2)}, DType::kF32, k.device(), false);
    if (k.dtype() == DType::kF32) return cuda::LightningF32ChunkState(k, v, lambda, doc_ids, out);
    cuda::LightningWorkspace ws;
    return cuda::LightningChunkState(k, v, lambda, doc_ids, out, ws, nullptr);
  }
  const Dims d = CheckInputs(k, k, v, decay, "k");
  const int32_t* docs = ChunkDocs(doc_ids, d.t);
  PrepareWritten(m, {d.h, d.dk, d.dv}, k.dtype(), "m");
  if (d.t == 0) {
    m.Zero();
    return false;
  }
  LOOM_DISPATCH_FLOAT(k.dtype(), T, [&] { ChunkStateHeads<T>(k, v, decay, docs, d, m); });
  return LastDocStart(docs, d.t) > 0;
}

void LightningChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                 const Tensor& dm, Tensor& dk, Tensor& dv) {
  if (!k.device().is_cpu()) {
    if (doc_ids.defined()) return by_document::LightningChunkStateBackward(k, v, decay, doc_ids, dm, dk, dv);
    const Tensor lambda = DecayOnDevice(decay, k.device());
    Tensor& gk = OnDevice(dk, k.shape(), k.dtype(), k.device(), true);
    Tensor& gv = OnDevice(dv, v.shape(), v.dtype(), k.device(), true);
    if (k.dtype() == DType::kF32) return cuda::LightningF32ChunkStateBackward(k, v, lambda, doc_ids, dm, gk, gv);
    cuda::LightningWorkspace ws;
    return cuda::LightningChunkStateBackward(k, v, lambda, doc_ids, dm, gk, gv, ws, nullptr);
  }
  const Dims d = CheckInputs(k, k, v, decay, "k");
  const int32_t* docs = ChunkDocs(doc_ids, d.t);
  CheckSame(dm, {d.h, d.dk, d.dv}, k.dtype(), "dm");
  PrepareAccumulated(dk, k.shape(), k.dtype(), "dk");
  PrepareAccumulated(dv, v.shape(), k.dtype(), "dv");
  if (d.t == 0) return;
  LOOM_DISPATCH_FLOAT(k.dtype(), T, [&] { ChunkStateBackwardHeads<T>(k, v, decay, docs, d, dm, dk, dv); });
}

// The intra phase of a long chunk is itself lightning attention from a zero
// state, so it runs the block walk (LightningOptions' block): masked B×B
// products plus the running state, never a C×C score matrix. A chunk no
// longer than one block is exactly the masked left product.
void LightningIntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                         const Tensor& doc_ids, Tensor& o) {
  if (!q.device().is_cpu()) {
    if (doc_ids.defined()) return by_document::LightningIntraChunk(q, k, v, decay, doc_ids, o);
    const Tensor lambda = DecayOnDevice(decay, q.device());
    Tensor& out = OnDevice(o, v.shape(), v.dtype(), q.device(), false);
    if (q.dtype() == DType::kF32) return cuda::LightningF32IntraChunk(q, k, v, lambda, doc_ids, out);
    cuda::LightningWorkspace ws;
    return cuda::LightningIntraChunk(q, k, v, lambda, doc_ids, out, ws, nullptr);
  }
  const Dims d = CheckInputs(q, k, v, decay);
  const BlockWalk walk{d.t, LightningOptions{}.block, ChunkDocs(doc_ids, d.t)};
  PrepareWritten(o, {d.t, d.h, d.dv}, q.dtype(), "o");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] { IntraHeads<T>(q, k, v, decay, walk, d, o); });
}

void LightningIntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv) {
  if (!q.device().is_cpu()) {
    if (doc_ids.defined()) return by_document::LightningIntraChunkBackward(q, k, v, decay, doc_ids, d_o, dq, dk, dv);
    const Tensor lambda = DecayOnDevice(decay, q.device());
    Tensor& gq = OnDevice(dq, q.shape(), q.dtype(), q.device(), true);
    Tensor& gk = OnDevice(dk, k.shape(), k.dtype(), q.device(), true);
    Tensor& gv = OnDevice(dv, v.shape(), v.dtype(), q.device(), true);
    if (q.dtype() == DType::kF32) return cuda::LightningF32IntraChunkBackward(q, k, v, lambda, doc_ids, d_o, gq, gk, gv);
    cuda::LightningWorkspace ws;
    return cuda::LightningIntraChunkBackward(q, k, v, lambda, doc_ids, d_o, gq, gk, gv, ws, nullptr);
  }
  const Dims d = CheckInputs(q, k, v, decay);
  const BlockWalk walk{d.t, LightningOptions{}.block, ChunkDocs(doc_ids, d.t)};
  CheckSame(d_o, {d.t, d.h, d.dv}, q.dtype(), "d_o");
  PrepareAccumulated(dq, q.shape(), q.dtype(), "dq");
  PrepareAccumulated(dk, k.shape(), q.dtype(), "dk");
  PrepareAccumulated(dv, v.shape(), q.dtype(), "dv");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] { IntraBackwardHeads<T>(q, k, v, decay, walk, d, d_o, dq, dk, dv); });
}

void LightningInterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o) {
  if (!q.device().is_cpu()) {
    if (doc_ids.defined()) return by_document::LightningInterChunk(q, decay, doc_ids, s, o);
    const Tensor lambda = DecayOnDevice(decay, q.device());
    Tensor& out = OnDevice(o, {q.dim(0), q.dim(1), s.dim(2)}, q.dtype(), q.device(), true);
    if (q.dtype() == DType::kF32) return cuda::LightningF32InterChunk(q, lambda, doc_ids, s, out);
    return cuda::LightningInterChunk(q, lambda, doc_ids, s, out, nullptr);
  }
  const Dims d = CheckInterInputs(q, decay, s);
  const int32_t* docs = ChunkDocs(doc_ids, d.t);
  PrepareAccumulated(o, {d.t, d.h, d.dv}, q.dtype(), "o");
  if (d.t == 0) return;
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] { InterHeads<T>(q, decay, docs, d, s, o); });
}

void LightningInterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                 const Tensor& d_o, Tensor& dq, Tensor& ds) {
  if (!q.device().is_cpu()) {
    if (doc_ids.defined()) return by_document::LightningInterChunkBackward(q, decay, doc_ids, s, d_o, dq, ds);
    const Tensor lambda = DecayOnDevice(decay, q.device());
    Tensor& gq = OnDevice(dq, q.shape(), q.dtype(), q.device(), true);
    Tensor& gs = OnDevice(ds, s.shape(), s.dtype(), q.device(), true);
    if (q.dtype() == DType::kF32) return cuda::LightningF32InterChunkBackward(q, lambda, doc_ids, s, d_o, gq, gs);
    cuda::LightningWorkspace ws;
    return cuda::LightningInterChunkBackward(q, lambda, doc_ids, s, d_o, gq, gs, ws, nullptr);
  }
  const Dims d = CheckInterInputs(q, decay, s);
  const int32_t* docs = ChunkDocs(doc_ids, d.t);
  CheckSame(d_o, {d.t, d.h, d.dv}, q.dtype(), "d_o");
  PrepareAccumulated(dq, q.shape(), q.dtype(), "dq");
  PrepareAccumulated(ds, s.shape(), q.dtype(), "ds");
  if (d.t == 0) return;
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] { InterBackwardHeads<T>(q, decay, docs, d, s, d_o, dq, ds); });
}

}  // namespace loom::ops
