// CPU softmax / sigmoid attention: the sequence is cut into tiles of kBlock
// queries (forward, dQ) or kBlock keys (dK, dV); each tile is a few OpenBLAS
// GEMMs and the tiles are spread over OpenMP threads.
//
//   q, o, d_o, dq [Tq, Hq, D]   k, v, dk, dv [Tk, Hk, D]   lse [Tq, Hq]
//
// Head h of token t starts at (t·H + h)·D, so one head of one row is a
// matrix with leading dimension H·D that BLAS reads in place: nothing is
// gathered. Query head h reads KV head g = h / (Hq / Hk).
//
// Forward, one row and one query head (masked scores are −∞):
//   S = scale · Q Kᵀ
//   softmax: lse_i = log Σ_j exp(S_ij),  P = exp(S − lse)
//   sigmoid: P = σ(S + b) on visible entries, 0 elsewhere (lse untouched)
//   O = P V
// Backward, P rebuilt from the saved lse (no second normalising pass):
//   dP = dO Vᵀ
//   softmax: dS = P ⊙ (dP − Δ),  Δ_i = Σ_d dO_id O_id  (= Σ_j P_ij dP_ij)
//   sigmoid: dS = P ⊙ (1 − P) ⊙ dP
//   dQ = scale · dS K,   dK = scale · dSᵀ Q,   dV = Pᵀ dO
// Gradient rule: dq, dk, dv are activation gradients and are written.
// MoH (options.active): query tiles are also cut at the mask's blocks and an
// inactive (head, block) tile is never computed; a key tile's backward runs
// only over the active runs of the queries that see it.
//
// Parallel backward without races: dK and dV of one key sum over every query
// (and every query head of the GQA group) that sees it, dQ of one query over
// every key. One pass that owned both would either serialise over
// (row, KV head), leaving cores idle when rows·Hk is small (long-context
// training has one row and a few KV heads), or need per-thread copies of
// dK and dV. So the backward runs two passes that each own what they write:
// tiles of keys produce dK, dV; tiles of queries produce dQ. The price is
// recomputing S and dP once more (7 GEMMs per tile pair instead of 5).
#include "ops/softmax_attention.h"

#include "ops/convert.h"

#include "ops/cpu/blas.h"
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/cuda_runtime.h"
#include "runtime/log.h"

namespace loom::ops {
namespace {

using cpu::Gemm;

// Queries (or keys) per tile: the score buffer of a thread is kBlock × N,
// never N × N.
constexpr int64_t kBlock = 64;


// One token-major [tokens, heads, dim] tensor.
template <typename T>
struct Heads {
  T* base;
  int64_t heads;
  int64_t dim;
  T* at(int64_t token, int64_t head) const { return base + (token * heads + head) * dim; }
  int64_t ld() const { return heads * dim; }
};

struct Range {
  int64_t lo = 0, hi = 0;
  int64_t size() const { return hi - lo; }
};

// The mask of one row, in row-relative indices. Causal: query i sees key j
// iff q_offset + i ≥ k_offset + j, i.e. j ≤ i − shift. Documents: ids are
// non-decreasing in q and in k, so the keys of query i's document are one
// contiguous run. Both bounds grow with i, so every query sees one interval
// [L(i), H(i)) and every key is seen by one interval of queries.
struct RowMask {
  int64_t nq = 0, nk = 0;
  bool causal = true;
  int64_t shift = 0;              // k_offset − q_offset
  const int32_t* qdoc = nullptr;  // this row's document ids; null: one document
  const int32_t* kdoc = nullptr;

  // Keys seen by query i0 through keys seen by query i1 − 1: exactly the
  // keys of i0 when i1 = i0 + 1, else a covering range (entries nobody sees
  // are masked row by row).
  Range Keys(int64_t i0, int64_t i1) const {
    int64_t lo = 0, hi = nk;
    if (causal) hi = std::clamp<int64_t>(i1 - shift, 0, nk);
    if (qdoc) {
      lo = std::lower_bound(kdoc, kdoc + nk, qdoc[i0]) - kdoc;
      hi = std::min<int64_t>(hi, std::upper_bound(kdoc, kdoc + nk, qdoc[i1 - 1]) - kdoc);
    }
    return {lo, std::max(lo, hi)};
  }
  // The mirror image: queries that see key j0 through those that see j1 − 1.
  Range Queries(int64_t j0, int64_t j1) const {
    int64_t lo = 0, hi = nq;
    if (causal) lo = std::clamp<int64_t>(j0 + shift, 0, nq);
    if (qdoc) {
      lo = std::max<int64_t>(lo, std::lower_bound(qdoc, qdoc + nq, kdoc[j0]) - qdoc);
      hi = std::upper_bound(qdoc, qdoc + nq, kdoc[j1 - 1]) - qdoc;
    }
    return {lo, std::max(lo, hi)};
  }
};

// MoH's options.active: whether query head h runs at token t (q's index).
// Query tiles never straddle a mask block (Tiles splits them), so a tile is
// skipped whole; a key tile walks only the active runs of its queries.
struct ActiveMask {
  const int32_t* on = nullptr;  // [Hq, blocks]; null: everything runs
  int64_t blocks = 0, block = 1;
  bool at(int64_t h, int64_t t) const { return on == nullptr || on[h * blocks + t / block] != 0; }
  // First token after t's mask block (t itself when there is no mask).
  int64_t block_end(int64_t t) const { return on == nullptr ? t : (t / block + 1) * block; }
  // The active runs of [lo, hi) (row-relative, the row starting at token
  // `base`) for head h, in order.
  std::vector<Range> Runs(int64_t h, int64_t base, Range r) const {
    if (on == nullptr) return {r};
    std::vector<Range> runs;
    for (int64_t i = r.lo; i < r.hi;) {
      const int64_t next = std::min(r.hi, block_end(base + i) - base);
      if (at(h, base + i)) {
        if (!runs.empty() && runs.back().hi == i) {
          runs.back().hi = next;
        } else {
          runs.push_back({i, next});
        }
      }
      i = next;
    }
    return runs;
  }
};

// Everything a tile needs besides its position.
template <typename T>
struct Problem {
  Heads<const T> q, k, v;
  const TokenRows* q_rows;
  const TokenRows* k_rows;
  int64_t group;  // Hq / Hk
  T scale;
  T bias;         // sigmoid only
  bool sigmoid;
  bool causal;
  int64_t shift;
  ActiveMask active;

  RowMask Mask(int64_t r) const {
    RowMask m;
    m.nq = q_rows->end(r) - q_rows->begin(r);
    m.nk = k_rows->end(r) - k_rows->begin(r);
    m.causal = causal;
    m.shift = shift;
    if (q_rows->has_docs()) {
      m.qdoc = q_rows->doc_ids.data<int32_t>() + q_rows->begin(r);
      m.kdoc = k_rows->doc_ids.data<int32_t>() + k_rows->begin(r);
    }
    return m;
  }
};

// The element-wise work between the GEMMs (one exp per score) costs about
// half as much as the GEMMs when libm's exp runs one element at a time, so
// the row loops below are `omp simd` and f32 uses an exp built from
// arithmetic the compiler vectorises. f64 (gradient checks, golden vectors)
// keeps libm.
//
// e^x = 2^n · e^r with n = round(x·log2 e) and r = x − n·ln 2, ln 2 split
// into a part exact in float and a remainder (Cody & Waite) so r is exact to
// float precision; |r| ≤ ln2/2, where the Taylor series of e^r to r^7 is off
// by less than 6e-9 relatively (measured: within 2 ulp of exp on
// [−87, 10]). Valid for −2.9e6 < x ≤ 88; every caller passes x ≤ 0 up to
// rounding. Where n ≤ −127 (x below about −87.7) the result flushes to 0.
// The clamp is on the integer exponent on purpose: a float select on x lets
// GCC fold the clamped branch to a constant and leaves the rest of the
// body conditional, which -ftrapping-math then forbids it to vectorise.
inline float Exp(float x) {
  // Adding and removing 1.5·2^23 rounds to the nearest integer (vectorises,
  // unlike nearbyint without SSE4.1).
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float e = 1.0f / 5040;
  e = e * r + 1.0f / 720;
  e = e * r + 1.0f / 120;
  e = e * r + 1.0f / 24;
  e = e * r + 1.0f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  const int32_t biased_exponent = std::max(static_cast<int32_t>(n) + 127, 0);
  return e * std::bit_cast<float>(biased_exponent << 23);
}
inline double Exp(double x) { return std::exp(x); }

// σ(z) = 1 / (1 + e^−z) for z ≥ 0, e^z / (1 + e^z) below, so the exp
// argument is −|z| ≤ 0 and never overflows. The select picks between two
// computed values (not between two computations) to stay vectorisable.
template <typename T>
T Sigmoid(T z) {
  const T t = Exp(-std::abs(z));
  return (z >= 0 ? T(1) : t) / (T(1) + t);
}

// max of row[a, b), b > a. Written with independent lanes rather than as an
// `omp simd reduction(max)`, which GCC 12 compiles with its accumulator in
// memory: a store-to-load chain that made this loop a quarter of the forward.
template <typename T>
T RowMax(const T* row, int64_t a, int64_t b) {
  constexpr int kLanes = 32 / sizeof(T);  // two SSE registers
  T lanes[kLanes];
  std::fill(lanes, lanes + kLanes, row[a]);
  int64_t j = a;
  for (; j + kLanes <= b; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = row[j + l] > lanes[l] ? row[j + l] : lanes[l];
  T m = row[a];
  for (; j < b; ++j) m = row[j] > m ? row[j] : m;
  for (int l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

// Row [0, n) of scaled scores becomes softmax probabilities over its visible
// part [a, b) and zero elsewhere. Returns lse = m + log Σ exp(S − m), with m
// the row maximum (so exp never overflows); −∞ when nothing is visible.
template <typename T>
T SoftmaxRow(T* row, int64_t n, int64_t a, int64_t b) {
  std::fill(row, row + a, T(0));
  std::fill(row + b, row + n, T(0));
  if (a >= b) return -std::numeric_limits<T>::infinity();
  const T m = RowMax(row, a, b);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = a; j < b; ++j) {
    row[j] = Exp(row[j] - m);
    sum += row[j];
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = a; j < b; ++j) row[j] *= inv;
  return m + std::log(sum);
}

// P = σ(S + b) on the visible [a, b), zero elsewhere.
template <typename T>
void SigmoidRow(T* row, int64_t n, int64_t a, int64_t b, T bias) {
  std::fill(row, row + a, T(0));
  std::fill(row + std::max(a, b), row + n, T(0));
#pragma omp simd
  for (int64_t j = a; j < b; ++j) row[j] = Sigmoid(row[j] + bias);
}

// Backward of one row's visible entries [a, b): `p` holds the scaled scores
// and becomes P, `ds` holds dP and becomes dS. `lse` and `delta` hold one
// value per entry (kPerEntry: a key's row of the transposed tile) or one for
// the whole row (a query's row). Masked entries: 0.
template <bool kPerEntry, typename T>
void BackwardRow(bool sigmoid, T bias, T* p, T* ds, int64_t n, int64_t a, int64_t b, const T* lse, const T* delta) {
  std::fill(p, p + a, T(0));
  std::fill(ds, ds + a, T(0));
  std::fill(p + std::max(a, b), p + n, T(0));
  std::fill(ds + std::max(a, b), ds + n, T(0));
  if (sigmoid) {
#pragma omp simd
    for (int64_t j = a; j < b; ++j) {
      const T e = Sigmoid(p[j] + bias);
      p[j] = e;
      ds[j] = e * (T(1) - e) * ds[j];
    }
  } else {
    // A query that sees no key (lse = −∞) is never inside [a, b), so
    // exp(S − lse) is never formed from an infinite lse.
#pragma omp simd
    for (int64_t j = a; j < b; ++j) {
      const T e = Exp(p[j] - lse[kPerEntry ? j : 0]);
      p[j] = e;
      ds[j] = e * (ds[j] - delta[kPerEntry ? j : 0]);
    }
  }
}

// A tile: query (or key) block [start, end) of a row (at most kBlock long) of `head`.
struct Tile {
  int64_t row, head, start, end;
};

// Without a mask: [s, s + kBlock) ∩ row. With one (query tiles): also cut
// at the mask's block boundaries, and inactive tiles left out.
std::vector<Tile> Tiles(const TokenRows& rows, int64_t heads, const ActiveMask& active = {}) {
  std::vector<Tile> tiles;
  for (int64_t r = 0; r < rows.rows(); ++r) {
    const int64_t b = rows.begin(r), n = rows.end(r) - b;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t s = 0; s < n;) {
        int64_t e = std::min(s + kBlock, n);
        if (active.on != nullptr) e = std::min(e, active.block_end(b + s) - b);
        if (active.at(h, b + s)) tiles.push_back({r, h, s, e});
        s = e;
      }
    }
  }
  return tiles;
}

// Whether a call is worth a thread team. Waking the team and its barriers
// cost tens of microseconds, far more on a loaded machine (ctest -j), while
// small calls (decoding, finite-difference checks) take less than that.
// Work is counted as the multiply-adds of the unmasked scores.
bool WorthThreads(const TokenRows& q_rows, const TokenRows& k_rows, int64_t heads, int64_t dim) {
  int64_t work = 0;
  for (int64_t r = 0; r < q_rows.rows(); ++r)
    work += (q_rows.end(r) - q_rows.begin(r)) * (k_rows.end(r) - k_rows.begin(r)) * heads * dim;
  return work >= (int64_t{1} << 18);
}

int64_t LongestRow(const TokenRows& rows) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows.rows(); ++r) n = std::max(n, rows.end(r) - rows.begin(r));
  return n;
}

// ---------------------------------------------------------------- forward
// One tile of queries [i0, i1) of row r, head h:
//   S [m, nk'] = scale · Q[i0:i1] K[keys]ᵀ,  P = softmax or σ,  O[i0:i1] = P V[keys]
template <typename T>
void ForwardTile(const Problem<T>& p, const Tile& tile, Heads<T> o, T* lse, T* s) {
  const RowMask mask = p.Mask(tile.row);
  const int64_t i0 = tile.start, i1 = tile.end;
  const Range keys = mask.Keys(i0, i1);
  if (keys.size() == 0) return;  // o stays 0 and lse −∞ as filled by the caller
  const int64_t qb = p.q_rows->begin(tile.row), kb = p.k_rows->begin(tile.row);
  const int64_t h = tile.head, g = h / p.group, m = i1 - i0, n = keys.size(), d = p.q.dim;

  Gemm(CblasNoTrans, CblasTrans, m, n, d, p.scale, p.q.at(qb + i0, h), p.q.ld(), p.k.at(kb + keys.lo, g), p.k.ld(),
       T(0), s, n);
  for (int64_t i = i0; i < i1; ++i) {
    const Range seen = mask.Keys(i, i + 1);
    T* row = s + (i - i0) * n;
    const int64_t a = std::clamp(seen.lo - keys.lo, int64_t{0}, n);
    const int64_t b = std::clamp(seen.hi - keys.lo, a, n);
    if (p.sigmoid) {
      SigmoidRow(row, n, a, b, p.bias);
    } else {
      lse[(qb + i) * p.q.heads + h] = SoftmaxRow(row, n, a, b);
    }
  }
  Gemm(CblasNoTrans, CblasNoTrans, m, d, n, T(1), s, n, p.v.at(kb + keys.lo, g), p.v.ld(), T(0), o.at(qb + i0, h),
       o.ld());
}

// ---------------------------------------------------------------- backward
// dK, dV of keys [j0, j1) of row r, KV head g, summed over the query heads
// of g's group and every query that sees them. Transposed tile, rows = keys:
//   Sᵀ = scale · K Q[qs]ᵀ,  dPᵀ = V dO[qs]ᵀ   [nb, m]
//   dV += Pᵀ dO[qs],  dK += scale · dSᵀ Q[qs]
template <typename T>
void KeyValueGradTile(const Problem<T>& p, const Tile& tile, Heads<const T> d_o, const T* lse, const T* delta,
                      Heads<T> dk, Heads<T> dv, T* st, T* dpt, T* lse_h, T* delta_h) {
  const RowMask mask = p.Mask(tile.row);
  const int64_t j0 = tile.start, j1 = tile.end;
  const Range queries = mask.Queries(j0, j1);
  if (queries.size() == 0) return;  // dk, dv stay 0
  const int64_t qb = p.q_rows->begin(tile.row), kb = p.k_rows->begin(tile.row);
  const int64_t g = tile.head, nb = j1 - j0, d = p.q.dim, hq = p.q.heads;

  for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
    // MoH: only the runs of queries whose head h is active.
    for (const Range run : p.active.Runs(h, qb, queries)) {
      const int64_t m = run.size();
      const T* q_h = p.q.at(qb + run.lo, h);
      const T* do_h = d_o.at(qb + run.lo, h);
      Gemm(CblasNoTrans, CblasTrans, nb, m, d, p.scale, p.k.at(kb + j0, g), p.k.ld(), q_h, p.q.ld(), T(0), st, m);
      Gemm(CblasNoTrans, CblasTrans, nb, m, d, T(1), p.v.at(kb + j0, g), p.v.ld(), do_h, d_o.ld(), T(0), dpt, m);
      // This head's lse and Δ of the run's queries, contiguous for the loop below.
      if (!p.sigmoid) {
        for (int64_t i = 0; i < m; ++i) {
          lse_h[i] = lse[(qb + run.lo + i) * hq + h];
          delta_h[i] = delta[(qb + run.lo + i) * hq + h];
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        const Range seen = mask.Queries(j, j + 1);
        T* p_row = st + (j - j0) * m;
        T* ds_row = dpt + (j - j0) * m;
        const int64_t a = std::clamp(seen.lo - run.lo, int64_t{0}, m);
        const int64_t b = std::clamp(seen.hi - run.lo, a, m);
        BackwardRow<true>(p.sigmoid, p.bias, p_row, ds_row, m, a, b, lse_h, delta_h);
      }
      Gemm(CblasNoTrans, CblasNoTrans, nb, d, m, T(1), st, m, do_h, d_o.ld(), T(1), dv.at(kb + j0, g), dv.ld());
      Gemm(CblasNoTrans, CblasNoTrans, nb, d, m, p.scale, dpt, m, q_h, p.q.ld(), T(1), dk.at(kb + j0, g), dk.ld());
    }
  }
}

// dQ of queries [i0, i1) of row r, head h:
//   S = scale · Q K[ks]ᵀ,  dP = dO V[ks]ᵀ   [m, n],   dQ = scale · dS K[ks]
template <typename T>
void QueryGradTile(const Problem<T>& p, const Tile& tile, Heads<const T> d_o, const T* lse, const T* delta,
                   Heads<T> dq, T* s, T* dp) {
  const RowMask mask = p.Mask(tile.row);
  const int64_t i0 = tile.start, i1 = tile.end;
  const Range keys = mask.Keys(i0, i1);
  if (keys.size() == 0) return;  // dq stays 0
  const int64_t qb = p.q_rows->begin(tile.row), kb = p.k_rows->begin(tile.row);
  const int64_t h = tile.head, g = h / p.group, m = i1 - i0, n = keys.size(), d = p.q.dim, hq = p.q.heads;

  Gemm(CblasNoTrans, CblasTrans, m, n, d, p.scale, p.q.at(qb + i0, h), p.q.ld(), p.k.at(kb + keys.lo, g), p.k.ld(),
       T(0), s, n);
  Gemm(CblasNoTrans, CblasTrans, m, n, d, T(1), d_o.at(qb + i0, h), d_o.ld(), p.v.at(kb + keys.lo, g), p.v.ld(),
       T(0), dp, n);
  for (int64_t i = i0; i < i1; ++i) {
    const Range seen = mask.Keys(i, i + 1);
    T* ds_row = dp + (i - i0) * n;
    T* s_row = s + (i - i0) * n;
    const int64_t a = std::clamp(seen.lo - keys.lo, int64_t{0}, n);
    const int64_t b = std::clamp(seen.hi - keys.lo, a, n);
    const T l = p.sigmoid ? T(0) : lse[(qb + i) * hq + h];
    const T dl = p.sigmoid ? T(0) : delta[(qb + i) * hq + h];
    BackwardRow<false>(p.sigmoid, p.bias, s_row, ds_row, n, a, b, &l, &dl);
  }
  Gemm(CblasNoTrans, CblasNoTrans, m, d, n, p.scale, dp, n, p.k.at(kb + keys.lo, g), p.k.ld(), T(0), dq.at(qb + i0, h),
       dq.ld());
}

// ---------------------------------------------------------------- checks
void CheckRows(const TokenRows& rows, int64_t tokens, const char* name) {
  const Tensor& cu = rows.cu_seqlens;
  LOOM_CHECK(cu.defined() && cu.dtype() == DType::kI32 && cu.ndim() == 1 && cu.numel() >= 1 && cu.device().is_cpu(),
             "[softmax_attention] ", name, ".cu_seqlens must be a CPU i32 vector [R+1]");
  for (int64_t r = 0; r < rows.rows(); ++r) {
    LOOM_CHECK(0 <= rows.begin(r) && rows.begin(r) <= rows.end(r) && rows.end(r) <= tokens, "[softmax_attention] ",
               name, " row ", r, " is [", rows.begin(r), ", ", rows.end(r), ") of ", tokens, " tokens");
  }
  if (!rows.has_docs()) return;
  const Tensor& doc = rows.doc_ids;
  LOOM_CHECK(doc.dtype() == DType::kI32 && doc.shape() == Shape{tokens} && doc.device().is_cpu(),
             "[softmax_attention] ", name, ".doc_ids must be a CPU i32 [", tokens, "], got ", DTypeName(doc.dtype()),
             " ", ShapeString(doc.shape()));
  CheckDocumentsInOrder(rows, "softmax_attention", name);
}

// Sigmoid attention has no lse: its caller may pass an undefined tensor.
void CheckInputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lse, const TokenRows& q_rows,
                 const TokenRows& k_rows, const AttentionOptions& options) {
  const bool has_lse = !options.sigmoid || lse.defined();
  for (const Tensor* t : {&q, &k, &v, &lse}) {
    if (t == &lse && !has_lse) continue;
    LOOM_CHECK(t->device().is_cpu(), "[softmax_attention] CPU tensors only, got one on ", t->device().ToString());
  }
  LOOM_CHECK(q.dtype() == DType::kF32 || q.dtype() == DType::kF64, "[softmax_attention] f32 or f64 only, got ",
             DTypeName(q.dtype()));
  LOOM_CHECK(q.ndim() == 3 && k.ndim() == 3, "[softmax_attention] q [Tq, Hq, D] and k [Tk, Hk, D], got q ",
             ShapeString(q.shape()), ", k ", ShapeString(k.shape()));
  LOOM_CHECK(v.shape() == k.shape(), "[softmax_attention] v ", ShapeString(v.shape()), " must match k ",
             ShapeString(k.shape()));
  LOOM_CHECK(q.dim(2) == k.dim(2) && q.dim(2) > 0, "[softmax_attention] head dims differ or are empty: q ",
             ShapeString(q.shape()), ", k ", ShapeString(k.shape()));
  LOOM_CHECK(k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, "[softmax_attention] Hq = ", q.dim(1),
             " is not a multiple of Hk = ", k.dim(1));
  LOOM_CHECK(!has_lse || lse.shape() == (Shape{q.dim(0), q.dim(1)}), "[softmax_attention] lse must be [Tq, Hq] = [",
             q.dim(0), ", ", q.dim(1), "], got ", ShapeString(lse.shape()));
  for (const Tensor* t : {&k, &v, &lse}) {
    if (t == &lse && !has_lse) continue;
    LOOM_CHECK(t->dtype() == q.dtype(), "[softmax_attention] dtypes differ: q ", DTypeName(q.dtype()), ", got ",
               DTypeName(t->dtype()));
  }
  LOOM_CHECK(q_rows.rows() == k_rows.rows(), "[softmax_attention] ", q_rows.rows(), " query rows but ",
             k_rows.rows(), " key rows");
  LOOM_CHECK(q_rows.has_docs() == k_rows.has_docs(),
             "[softmax_attention] doc_ids must be given for both q_rows and k_rows or for neither");
  CheckRows(q_rows, q.dim(0), "q_rows");
  CheckRows(k_rows, k.dim(0), "k_rows");
  if (options.active.defined()) {
    const Tensor& a = options.active;
    LOOM_CHECK(options.active_block >= 1, "[softmax_attention] active_block must be >= 1, got ",
               options.active_block);
    const int64_t blocks = (q.dim(0) + options.active_block - 1) / options.active_block;
    LOOM_CHECK(a.device().is_cpu() && a.dtype() == DType::kI32 && a.shape() == (Shape{q.dim(1), blocks}),
               "[softmax_attention] active must be a CPU i32 [Hq, ceil(Tq / active_block)] = [", q.dim(1), ", ",
               blocks, "], got ", DTypeName(a.dtype()), " ", ShapeString(a.shape()), " on ", a.device().ToString());
  }
}

void CheckLike(const Tensor& t, const Tensor& like, const char* name, const char* like_name) {
  LOOM_CHECK(t.device().is_cpu(), "[softmax_attention] ", name, " must be on the CPU, got ", t.device().ToString());
  LOOM_CHECK(t.shape() == like.shape() && t.dtype() == like.dtype(), "[softmax_attention] ", name, " ",
             DTypeName(t.dtype()), " ", ShapeString(t.shape()), " must match ", like_name, " ",
             DTypeName(like.dtype()), " ", ShapeString(like.shape()));
}

template <typename T>
Problem<T> MakeProblem(const Tensor& q, const Tensor& k, const Tensor& v, const TokenRows& q_rows,
                       const TokenRows& k_rows, const AttentionOptions& options) {
  const int64_t d = q.dim(2);
  return Problem<T>{
      .q = {q.data<T>(), q.dim(1), d},
      .k = {k.data<T>(), k.dim(1), d},
      .v = {v.data<T>(), v.dim(1), d},
      .q_rows = &q_rows,
      .k_rows = &k_rows,
      .group = q.dim(1) / k.dim(1),
      .scale = static_cast<T>(options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d))),
      .bias = static_cast<T>(options.sigmoid_bias),
      .sigmoid = options.sigmoid,
      .causal = options.causal,
      .shift = options.k_offset - options.q_offset,
      .active = options.active.defined()
                    ? ActiveMask{options.active.data<int32_t>(), options.active.dim(1), options.active_block}
                    : ActiveMask{},
  };
}

// The bodies live in templates, not in LOOM_DISPATCH_FLOAT's lambda: a
// macro argument cannot hold #pragma omp.
template <typename T>
void Forward(const Tensor& q, const Tensor& k, const Tensor& v, const TokenRows& q_rows, const TokenRows& k_rows,
             const AttentionOptions& options, Tensor& o, Tensor& lse) {
  const Problem<T> p = MakeProblem<T>(q, k, v, q_rows, k_rows, options);
  // Tiles only write what some query sees: the rest is o = 0, lse = −∞.
  o.Zero();
  if (!options.sigmoid) lse.Fill(-std::numeric_limits<double>::infinity());
  const Heads<T> out{o.data<T>(), q.dim(1), q.dim(2)};
  T* lse_data = options.sigmoid ? nullptr : lse.data<T>();
  const std::vector<Tile> tiles = Tiles(q_rows, q.dim(1), p.active);
  const int64_t buffer = kBlock * LongestRow(k_rows);
  const bool threaded = WorthThreads(q_rows, k_rows, q.dim(1), q.dim(2));
#pragma omp parallel if (threaded)
  {
    std::vector<T> s(buffer);
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tiles.size(); ++t) ForwardTile(p, tiles[t], out, lse_data, s.data());
  }
}

template <typename T>
void Backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
              const Tensor& d_o, const TokenRows& q_rows, const TokenRows& k_rows, const AttentionOptions& options,
              Tensor& dq, Tensor& dk, Tensor& dv) {
  const Problem<T> p = MakeProblem<T>(q, k, v, q_rows, k_rows, options);
  const int64_t tq = q.dim(0), hq = q.dim(1), d = q.dim(2);
  const Heads<const T> grad_out{d_o.data<T>(), hq, d};
  const T* lse_data = options.sigmoid ? nullptr : lse.data<T>();
  // Tiles skip what no query sees, and the KV pass accumulates: start at 0.
  dq.Zero();
  dk.Zero();
  dv.Zero();
  const bool threaded = WorthThreads(q_rows, k_rows, hq, d);

  // Δ_i = Σ_d dO_id O_id per (token, head): the softmax Jacobian's row term.
  std::vector<T> delta;
  if (!options.sigmoid) {
    delta.resize(tq * hq);
    const T* o_data = o.data<T>();
    const T* do_data = d_o.data<T>();
#pragma omp parallel for if (threaded)
    for (int64_t th = 0; th < tq * hq; ++th) {
      T sum = 0;
      for (int64_t c = 0; c < d; ++c) sum += o_data[th * d + c] * do_data[th * d + c];
      delta[th] = sum;
    }
  }

  const Heads<T> grad_k{dk.data<T>(), k.dim(1), d}, grad_v{dv.data<T>(), k.dim(1), d};
  const Heads<T> grad_q{dq.data<T>(), hq, d};
  const std::vector<Tile> key_tiles = Tiles(k_rows, k.dim(1));
  const std::vector<Tile> query_tiles = Tiles(q_rows, hq, p.active);
  const int64_t longest_q = LongestRow(q_rows), longest_k = LongestRow(k_rows);
#pragma omp parallel if (threaded)
  {
    std::vector<T> a(kBlock * std::max(longest_q, longest_k)), b(a.size());
    std::vector<T> lse_h(longest_q), delta_h(longest_q);
    // No barrier between the passes: they read the same inputs and write
    // different tensors.
#pragma omp for schedule(dynamic) nowait
    for (size_t t = 0; t < key_tiles.size(); ++t) {
      KeyValueGradTile(p, key_tiles[t], grad_out, lse_data, delta.data(), grad_k, grad_v, a.data(), b.data(),
                       lse_h.data(), delta_h.data());
    }
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < query_tiles.size(); ++t) {
      QueryGradTile(p, query_tiles[t], grad_out, lse_data, delta.data(), grad_q, a.data(), b.data());
    }
  }
}

}  // namespace

// ---- CUDA tensors: the host rows' device copy, then the kernels of q's
// dtype (f32: ops/cuda/softmax_attention_f32.cu; bf16: options.backend). ----

struct TokenRowsDeviceCopy {
  int device = -1;
  std::vector<int32_t> cu, docs;  // what was copied
  cuda::CudaTokenRows rows;
};

namespace cuda {

const CudaTokenRows& DeviceRows(const TokenRows& rows, int device) {
  LOOM_CHECK(rows.cu_seqlens.defined() && rows.cu_seqlens.device().is_cpu() &&
                 rows.cu_seqlens.dtype() == DType::kI32 && rows.cu_seqlens.ndim() == 1,
             "[softmax_attention] rows.cu_seqlens must be a CPU i32 vector [R+1]");
  LOOM_CHECK(!rows.has_docs() || (rows.doc_ids.device().is_cpu() && rows.doc_ids.dtype() == DType::kI32),
             "[softmax_attention] rows.doc_ids must be a CPU i32 vector [T]");
  auto same = [](const std::vector<int32_t>& copied, const Tensor& t) {
    const int64_t n = t.defined() ? t.numel() : 0;
    return static_cast<int64_t>(copied.size()) == n &&
           (n == 0 || std::equal(copied.begin(), copied.end(), t.data<int32_t>()));
  };
  TokenRowsDeviceCopy* c = rows.device_copy.get();
  if (c && c->device == device && same(c->cu, rows.cu_seqlens) && same(c->docs, rows.doc_ids)) return c->rows;
  auto fresh = std::make_shared<TokenRowsDeviceCopy>();
  fresh->device = device;
  const int32_t* cu = rows.cu_seqlens.data<int32_t>();
  fresh->cu.assign(cu, cu + rows.cu_seqlens.numel());
  if (rows.has_docs()) {
    const int32_t* docs = rows.doc_ids.data<int32_t>();
    fresh->docs.assign(docs, docs + rows.doc_ids.numel());
  }
  fresh->rows = ToDevice(rows, device);
  rows.device_copy = std::move(fresh);
  return rows.device_copy->rows;
}

}  // namespace cuda

namespace {

void CheckCudaCall(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lse,
                   const AttentionOptions& options) {
  LOOM_CHECK(q.dtype() == DType::kF32 || q.dtype() == DType::kBF16,
             "[softmax_attention] CUDA tensors must be f32 or bf16, got ", DTypeName(q.dtype()));
  for (const Tensor* t : {&k, &v})
    LOOM_CHECK(t->device() == q.device(), "[softmax_attention] q is on ", q.device().ToString(), " but k or v on ",
               t->device().ToString());
  LOOM_CHECK(options.sigmoid || lse.defined(), "[softmax_attention] lse must be given (f32 [Tq, Hq] on ",
             q.device().ToString(), ")");
  LOOM_CHECK(!options.active.defined() || SoftmaxAttentionSkipsInactive(q, options),
             "[softmax_attention] MoH's active-head mask (options.active) on the GPU runs in Loom's bf16 kernels "
             "(head dim 64 or 128) only, not the f32 kernels or cuDNN: compute every head there");
  LOOM_CHECK(!options.active.defined() || options.active.device() == q.device(),
             "[softmax_attention] options.active is on ", options.active.device().ToString(), " but q on ",
             q.device().ToString());
}

std::optional<AttentionBackend> Bf16Backend(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const cuda::CudaTokenRows& gq, const cuda::CudaTokenRows& gk,
                                            const AttentionOptions& options) {
  return SoftmaxAttentionBf16Backend(q, k, v, gq, gk, options, cuda::FlashAttentionRuns(q.device().index));
}

}  // namespace

std::optional<AttentionBackend> SoftmaxAttentionBf16Backend(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const cuda::CudaTokenRows& gq,
                                                            const cuda::CudaTokenRows& gk,
                                                            const AttentionOptions& options, bool flash_runs) {
  // Loom's bf16 kernels are compiled for head dims 64 and 128, cuDNN's SDPA
  // takes multiples of 8 up to 128; other head dims (small test models) run
  // the f32 kernels.
  const int64_t d = q.dim(-1);
  const bool loom_dims = FlashAttentionHeadDim(d), cudnn_dims = d % 8 == 0 && d <= 128;
  if (options.backend == AttentionBackend::kLoom && (!loom_dims || flash_runs))
    return loom_dims ? std::optional(AttentionBackend::kLoom) : std::nullopt;
  if (options.backend == AttentionBackend::kCudnn && !cudnn_dims) return std::nullopt;
  // Loom's kernels wanted on a GPU without them: cuDNN if it takes the call,
  // else the f32 kernels. cuDNN wanted: cuDNN if it takes the call, else
  // Loom's kernels where they run, else the f32 kernels. Each reason is said
  // once a process.
  const int device = q.device().index;
  std::optional<AttentionBackend> chosen;
  std::string why;
  if (options.backend == AttentionBackend::kLoom) {
    why = options.deterministic ? "a deterministic backward (cuDNN's is not bitwise repeatable)"
                                : cuda::CudnnAttentionUnsupported(q, k, v, gq, gk, options, /*with_backward=*/true);
    if (why.empty()) chosen = AttentionBackend::kCudnn;
    why = why.empty() ? "Loom's flash attention kernels are Hopper (sm_90a) code"
                      : absl::StrCat("Loom's flash attention kernels are Hopper (sm_90a) code and cuDNN does not "
                                     "take this call (", why, ")");
  } else {
    why = cuda::CudnnAttentionUnsupported(q, k, v, gq, gk, options, /*with_backward=*/true);
    if (why.empty()) return AttentionBackend::kCudnn;
    if (loom_dims && flash_runs) chosen = AttentionBackend::kLoom;
    why = absl::StrCat("cuDNN does not take this call (", why, ")");
  }
  static std::mutex mu;
  static std::set<std::string> said;
  const char* runs = !chosen ? "the f32 kernels (on f32 copies, more slowly)"
                     : *chosen == AttentionBackend::kCudnn ? "cuDNN's SDPA"
                                                          : "Loom's flash attention kernels";
  std::string line = absl::StrCat(q.device().ToString(), " (", CudaDeviceName(device), ", sm_",
                                  CudaComputeCapability(device), "), model.attention_backend=",
                                  options.backend == AttentionBackend::kLoom ? "loom" : "cudnn", ": ", why,
                                  "; softmax attention runs on ", runs);
  std::lock_guard<std::mutex> lock(mu);
  if (said.insert(line).second) LogWarning(line);
  return chosen;
}

namespace {

Tensor F32Copy(const Tensor& t) { return ConvertedCopy(t, DType::kF32); }

}  // namespace

bool SoftmaxAttentionSkipsInactive(const Tensor& q, const AttentionOptions& options) {
  if (q.device().is_cpu()) return true;
  return q.dtype() == DType::kBF16 && SoftmaxBf16TakesMask(q.dim(-1), options.backend) &&
         cuda::FlashAttentionRuns(q.device().index);
}

void SoftmaxAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const TokenRows& q_rows,
                             const TokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse) {
  if (!q.device().is_cpu()) {
    CheckCudaCall(q, k, v, lse, options);
    const int device = q.device().index;
    const cuda::CudaTokenRows& gq = cuda::DeviceRows(q_rows, device);
    const cuda::CudaTokenRows& gk = cuda::DeviceRows(k_rows, device);
    if (q.dtype() == DType::kF32) return cuda::AttentionF32Forward(q, k, v, gq, gk, options, o, lse);
    const std::optional<AttentionBackend> backend = Bf16Backend(q, k, v, gq, gk, options);
    if (!backend) {
      Tensor o32 = F32Copy(o);
      cuda::AttentionF32Forward(F32Copy(q), F32Copy(k), F32Copy(v), gq, gk, options, o32, lse);
      return Convert(o32, o);
    }
    return cuda::AttentionForward(*backend, q, k, v, gq, gk, options, o, lse);
  }
  CheckInputs(q, k, v, lse, q_rows, k_rows, options);
  CheckLike(o, q, "o", "q");
  LOOM_DISPATCH_FLOAT(q.dtype(), T, [&] { Forward<T>(q, k, v, q_rows, k_rows, options, o, lse); });
}

void SoftmaxAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                              const Tensor& lse, const Tensor& d_o, const TokenRows& q_rows,
                              const TokenRows& k_rows, const AttentionOptions& options, Tensor& dq, Tensor& dk,
                              Tensor& dv) {
  if (!q.device().is_cpu()) {
    CheckCudaCall(q, k, v, lse, options);
    const int device = q.device().index;
    const cuda::CudaTokenRows& gq = cuda::DeviceRows(q_rows, device);
    const cuda::CudaTokenRows& gk = cuda::DeviceRows(k_rows, device);
    if (q.dtype() == DType::kF32) return cuda::AttentionF32Backward(q, k, v, o, lse, d_o, gq, gk, options, dq, dk, dv);
    const std::optional<AttentionBackend> backend = Bf16Backend(q, k, v, gq, gk, options);
    if (!backend) {
      Tensor dq32 = F32Copy(dq), dk32 = F32Copy(dk), dv32 = F32Copy(dv);
      cuda::AttentionF32Backward(F32Copy(q), F32Copy(k), F32Copy(v), F32Copy(o), lse, F32Copy(d_o), gq, gk, options,
                                 dq32, dk32, dv32);
      Convert(dq32, dq);
      Convert(dk32, dk);
      return Convert(dv32, dv);
    }
    return cuda::AttentionBackward(*backend, q, k, v, o, lse, d_o, gq, gk, options, dq, dk, dv);
  }
  CheckInputs(q, k, v, lse, q_rows, k_rows, options);
  CheckLike(o, q, "o", "q");
  CheckLike(d_o, q, "d_o", "q");
  CheckLike(dq, q, "dq", "q");
  CheckLike(dk, k, "dk", "k");
  CheckLike(dv, v, "dv", "v");
  LOOM_DISPATCH_FLOAT(q.dtype(), T,
                      [&] { Backward<T>(q, k, v, o, lse, d_o, q_rows, k_rows, options, dq, dk, dv); });
}

}  // namespace loom::ops
