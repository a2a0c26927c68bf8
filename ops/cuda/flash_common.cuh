// Loom's flash attention for Hopper (sm_90a), FA2 design: bf16 tiles in
// shared memory fed by cp.async, mma.sync m16n8k16 tensor-core products with
// f32 accumulators, ldmatrix fragments, the online softmax kept in
// registers. The math is ops/softmax_attention.h's; shapes:
//   q, o, d_o, dq [Tq, Hq, D] bf16    k, v, dk, dv [Tk, Hk, D] bf16
//   lse [Tq, Hq] f32 (natural log)    query head h reads KV head h / (Hq/Hk)
//
// What the forward (ops/cuda/softmax_attention.cu) and the backward
// (ops/cuda/flash_attention_backward.cu) share: the PTX pieces, the swizzled
// tile layout, the mask, the kernel parameters and the host checks that fill
// them.
//
// Masks: row r's query i has position q_offset + i, key j k_offset + j;
// causal: visible iff i − shift ≥ j, shift = k_offset − q_offset; documents:
// visible only within equal doc ids. Each row of a tile sees one range of
// the other side (below); rows that see the whole tile skip the mask.
// Tiles wholly invisible are never visited: the causal bound, and, since doc
// ids are non-decreasing within a row (ops/attention_seqs.h), the range of
// keys sharing a document with a query tile (and of queries with a key
// tile), found by binary search. A query that sees no key gets o = 0,
// lse = −∞.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/mma_sync.cuh"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda::flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------- PTX pieces

__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}


// 2^x in one MUFU.EX2: the approximate, flush-to-zero form (2 ulp; results
// under 2^-126 flush to 0, which the bf16 P products could not hold anyway).
// exp2f compiles to ex2.approx.f32 without ftz, which ptxas wraps in a
// compare and two predicated multiplies for subnormals: four instructions an
// element in the softmax loops, which are bound by issue.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// σ(x) = 1 / (1 + 2^(−x·log2 e)) with MUFU.EX2 and MUFU.RCP (approximate,
// flush-to-zero); σ(−∞) = 0.
__device__ __forceinline__ float Sigmoid(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(1.f + Exp2(-x * kLog2e)));
  return y;
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Tiles in shared memory are rows of D bf16 = D/8 chunks of 16 bytes; chunk
// c of row r sits at chunk c ^ (r mod 8), so the 8 rows an ldmatrix reads
// hit 8 different bank groups.
template <int kChunks>
__device__ __forceinline__ uint32_t Swz(int row, int chunk) {
  static_assert(kChunks % 8 == 0, "a row must be a multiple of 8 chunks for the swizzle");
  return static_cast<uint32_t>((row * kChunks + (chunk ^ (row & 7))) * 16);
}

// The lanes of an ldmatrix.x4 read rows (16·R + r_lane) and chunks
// (2·C + c_lane) of a swizzled tile, with r_lane mod 8 = lane mod 8. Since
// 2C + c = 2C ^ c, the swizzled chunk is 2C ^ (c_lane ^ lane mod 8): one
// per-lane constant and an XOR per use, instead of one address register per
// (R, C) held across the main loop.
template <int kChunks>
struct FragAddr {
  uint32_t base;  // row r_lane of the tile
  uint32_t x;     // c_lane ^ (lane mod 8)
  __device__ __forceinline__ FragAddr(uint32_t tile, int r_lane, int c_lane)
      : base(tile + r_lane * kChunks * 16), x(c_lane ^ (r_lane & 7)) {}
  __device__ __forceinline__ uint32_t at(int r16, int c2) const {
    return base + r16 * 16 * kChunks * 16 + ((2 * c2) ^ x) * 16;
  }
};

// kRows x D tile of token-major rows (stride `ld` elements) into shared
// memory; rows ≥ valid read as zeros.
template <int kRows, int D, int kThreads>
__device__ __forceinline__ void LoadTile(uint32_t smem, const __nv_bfloat16* base, int64_t ld, int valid, int tid) {
  constexpr int kChunks = D / 8, kStep = kThreads / kChunks;  // rows per pass
  static_assert(kThreads % kChunks == 0 && kRows % kStep == 0, "tile does not split evenly over the threads");
  const int r0 = tid / kChunks, ch = tid % kChunks;
  const __nv_bfloat16* src = base + r0 * ld + ch * 8;
  uint32_t dst = smem + Swz<kChunks>(r0, ch);  // (r0 + kStep·i) mod 8 = r0 mod 8 when kStep % 8 == 0
  static_assert(kStep % 8 == 0, "the swizzle must repeat every pass");
#pragma unroll
  for (int r = r0; r < kRows; r += kStep) {
    const bool ok = r < valid;
    CpAsync16(dst, ok ? src : base, ok);
    src += kStep * ld;
    dst += kStep * kChunks * 16;
  }
}

// First index of ids[0, n) (non-decreasing) whose id is > v (above) or ≥ v.
template <bool kAbove>
__device__ __forceinline__ int FirstPast(const int32_t* ids, int n, int32_t v) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (kAbove ? ids[mid] <= v : ids[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

struct MaskArgs {
  bool causal;
  int shift;            // k_offset − q_offset
  const int32_t* qdoc;  // this row's doc ids or null
  const int32_t* kdoc;
  int nq, nk;
  // [lo, hi): the keys that share a document with queries [ia, ib), or the
  // queries that share one with keys [ia, ib) (0 ≤ ia < ib ≤ the row's
  // length); every key (query) without documents.
  __device__ __forceinline__ void KeysOf(int ia, int ib, int& lo, int& hi) const {
    Range(qdoc, kdoc, nk, ia, ib, lo, hi);
  }
  __device__ __forceinline__ void QueriesOf(int ia, int ib, int& lo, int& hi) const {
    Range(kdoc, qdoc, nq, ia, ib, lo, hi);
  }
  // What a thread masks with: the keys query i sees, [lo, hi), and the
  // queries that see key j; empty past the row. Every mask (row end,
  // causal, documents) is such a range, so a thread finds its rows' bounds
  // once and masks an element with two compares.
  __device__ __forceinline__ void KeysSeenBy(int i, int& lo, int& hi) const {
    if (i >= nq) {
      lo = hi = 0;
      return;
    }
    KeysOf(i, i + 1, lo, hi);
    if (causal) hi = min(hi, i - shift + 1);
  }
  __device__ __forceinline__ void QueriesSeeing(int j, int& lo, int& hi) const {
    if (j >= nk) {
      lo = hi = 0;
      return;
    }
    QueriesOf(j, j + 1, lo, hi);
    if (causal) lo = max(lo, j + shift);
  }

 private:
  __device__ __forceinline__ static void Range(const int32_t* from, const int32_t* to, int n, int ia, int ib, int& lo,
                                               int& hi) {
    lo = 0, hi = n;
    if (!from) return;
    lo = FirstPast<false>(to, n, from[ia]);
    hi = FirstPast<true>(to, n, from[ib - 1]);
  }
};

struct Params {
  const __nv_bfloat16 *q, *k, *v, *o, *d_o;
  __nv_bfloat16 *out, *dk, *dv;
  float* lse;           // [Tq, Hq] natural log (forward output)
  const float* lse2;    // [Hq, Tq] log2 domain (backward)
  const float* delta;   // [Hq, Tq]
  float* dq_acc;        // [Tq, Hq, D]
  const int32_t *cu_q, *cu_k, *doc_q, *doc_k;
  int64_t tq, hq, hk, group;
  int64_t q_end, k_end;  // where the last row ends (CudaTokenRows::end)
  float scale, scale_log2, bias;
  bool causal, sigmoid;
  int shift;
  // MoH (AttentionOptions::active): i32 [Hq, active_blocks], or null.
  const int32_t* active;
  int64_t active_blocks, active_block;
};

// Whether query head h has an active MoH mask block among the query tokens
// [t0, t0 + n) (indices into q, n ≥ 1): a tile is skipped only when every
// block it overlaps is inactive. Always true without a mask.
__device__ __forceinline__ bool QueryTileActive(const Params& p, int h, int64_t t0, int n) {
  if (p.active == nullptr) return true;
  for (int64_t b = t0 / p.active_block; b <= (t0 + n - 1) / p.active_block; ++b)
    if (p.active[h * p.active_blocks + b] != 0) return true;
  return false;
}

// The mask of row `row` of a call.
__device__ __forceinline__ MaskArgs RowMask(const Params& p, int row) {
  const int q0 = p.cu_q[row], k0 = p.cu_k[row];
  return MaskArgs{p.causal,
                  p.shift,
                  p.doc_q ? p.doc_q + q0 : nullptr,
                  p.doc_k ? p.doc_k + k0 : nullptr,
                  p.cu_q[row + 1] - q0,
                  p.cu_k[row + 1] - k0};
}

// Where a query-tile block (the forward, the deterministic dQ pass) works:
// query tile blockIdx.x counted from the last (under a causal mask the heavy
// tiles start first), query head blockIdx.y, row blockIdx.z; and which key
// tiles of kN it walks, [first_tile, first_tile + n_tiles): none past the
// causal bound, none outside the documents of its queries, none when MoH
// skips the tile. False when the tile lies past its row's queries.
struct QueryTileBlock {
  int h, kvh, q0, nq, k0, nk, i0, first_tile, n_tiles;
};
template <int kM, int kN>
__device__ __forceinline__ bool PlaceQueryTile(const Params& p, const MaskArgs& mask, QueryTileBlock& b) {
  const int row = blockIdx.z;
  b.h = blockIdx.y;
  b.kvh = b.h / p.group;
  b.q0 = p.cu_q[row], b.nq = mask.nq;
  b.k0 = p.cu_k[row], b.nk = mask.nk;
  b.i0 = (gridDim.x - 1 - blockIdx.x) * kM;
  b.first_tile = b.n_tiles = 0;
  if (b.i0 >= b.nq) return false;
  const int i1 = min(b.nq, b.i0 + kM);
  if (!QueryTileActive(p, b.h, b.q0 + b.i0, i1 - b.i0)) return true;
  int lo, hi;
  mask.KeysOf(b.i0, i1, lo, hi);
  if (p.causal) hi = min(hi, max(0, b.i0 + kM - p.shift));
  b.first_tile = lo / kN;
  b.n_tiles = max(0, (hi + kN - 1) / kN - b.first_tile);
  return true;
}

// ------------------------------------------------------------------ host side

// Kernel<<<grid, threads, smem, stream>>>(args...), its dynamic shared-memory
// limit raised to `smem` at the first launch; nothing for an empty grid.
template <auto Kernel, typename... Args>
void LaunchTiles(dim3 grid, int threads, int smem, cudaStream_t stream, const Args&... args) {
  static const bool configured = [smem] {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)configured;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  Kernel<<<grid, threads, smem, stream>>>(args...);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

inline const __nv_bfloat16* Bf16(const Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.raw()); }
inline __nv_bfloat16* Bf16Mut(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.raw()); }

// t must be `dtype` `shape` on like's device; the failure starts "[flash_attention]".
void CheckTensor(const Tensor& t, const Tensor& like, const char* name, DType dtype, const Shape& shape);

// Checks q, k, v and the rows, and fills the fields both directions share
// (the output pointers are the caller's); selects q's device.
Params MakeParams(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                  const CudaTokenRows& k_rows, const AttentionOptions& options, const char* op);

}  // namespace loom::ops::cuda::flash
