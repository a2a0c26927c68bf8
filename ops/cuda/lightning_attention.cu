// CUDA lightning attention for Hopper (sm_90a): bf16 q, k, v, o and
// gradients, fp32 states and accumulation, per-head decay λ (λ = 1 included),
// Dk = Dv = D in {64, 128}, rows of any length through cu_seqlens. See
// ops/lightning_attention.h for the math; here is how it is cut up.
//
// One head of one row is T tokens, split into segments of L = 1024 tokens,
// each a walk over chunks of C = 64 tokens. With B·S fixed the number of
// segments (and so of thread blocks) is the same at every S: 64 per head at
// 65,536 tokens, 2,048 blocks at H = 32, whatever the row length. So time per
// token does not grow with S, and 32 (row, head) pairs still fill 132 SMs.
//
// Forward, three launches:
//   (a) StateWalk: per segment s, M_s = Σ_{j in s} λ^(L_s−1−j) k_jᵀ v_j, one
//       chunk at a time: X ← λ^len X + (diag(λ^(len−1−j)) K)ᵀ V.
//   (b) Scan (fp32, one thread per state element, sequential over the row's
//       segments): E_0 = state_in, E_{s+1} = λ^(L_s) E_s + M_s, written over
//       M_s in place; state_out = E after the last segment.
//   (c) ForwardOutput: per segment, from S = E_s, per chunk
//       O = [(Q Kᵀ) ⊙ D] V + diag(λ^(i+1)) Q S,   D[i,j] = λ^(i−j) (j ≤ i)
//       S ← λ^len S + (diag(λ^(len−1−j)) K)ᵀ V.
// Backward, with dS_c the gradient of the state leaving chunk c:
//   dQ = [(dO Vᵀ) ⊙ D] K + diag(λ^(i+1)) dO Sᵀ: the forward itself with
//        q, k, v, S := dO, V, K, Sᵀ, so (a)-(c) run again on (dO, V, K) with
//        state_in transposed (their state is Σ λ v_jᵀ k_j = Sᵀ).
//   dK = [(dO Vᵀ) ⊙ D]ᵀ Q + diag(λ^(len−1−j)) V dSᵀ
//   dV = [(Q Kᵀ) ⊙ D]ᵀ dO + diag(λ^(len−1−j)) K dS
//   dS_{c−1} = λ^len dS_c + (diag(λ^(i+1)) Q)ᵀ dO,  dS after the row = d_state_out
//   so (a') StateWalk in reverse gives N_s = Σ_{i in s} λ^(i+1) q_iᵀ do_i,
//   (b') the reverse scan G_{s−1} = λ^(L_s) G_s + N_s gives each segment's
//   exit gradient and d_state_in, and (c') DkDv walks each segment backwards.
//
// MoH (LightningOptions::active, i32 [H, ceil(T / block)] on the device):
// the masked operand's rows of inactive tokens are zero-filled as they are
// loaded (q in (c), do in the backward's (a'), (c) and (c')), which makes
// those tokens' o, dq and contributions exactly 0, as the CPU reference
// has them; a chunk with no active token skips its output products (the
// scores, Q S, P V, and in (c') the intra terms and the dS update) and
// loads neither operand, but still folds its k, v into the state. The state
// walk (a) and the scans see every token.
//
// Every product is mma.sync m16n8k16 (bf16 in, fp32 accumulate) on tiles in
// shared memory fed by cp.async, two chunks in flight. Operands the tensor
// cores read are bf16: the state S (and dS) is rounded to bf16 for Q S, the
// masked scores for P V, and the decayed K (or Q) for the state update; every
// sum is fp32 and the state between chunks stays fp32 in registers.
//
// 8 warps a block. Warp w owns rows 16·(w mod 4) of the 64 × D output tile
// and half of its columns; of the D × D state, rows 16·(w mod D/16) and
// D/(8·16/D) columns.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cuda/lightning_rows.h"
#include "ops/cuda/mma_sync.cuh"
#include "ops/lightning_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

constexpr char kOp[] = "[lightning_attention] CUDA:";  // starts the row checks' messages

using nv_bf16 = __nv_bfloat16;

constexpr int kChunk = 64;              // tokens per chunk (C)
constexpr int kChunksPerSegment = 16;   // L = 1024 tokens a segment
constexpr int kSegment = kChunk * kChunksPerSegment;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kScoreLd = kChunk + 8;    // padded row of a C × C score tile
constexpr int kInterTokens = 256;       // tokens a block of the inter-chunk phase
static_assert(kWarps == 8, "the tile layouts below assume 8 warps");

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

// One segment: row, first token (global), length in tokens.
struct SegmentInfo {
  int row, begin, length, pad;
};
// A row's segments are [first, first + count).
struct RowInfo {
  int first, count;
};

// ---- Warp-level building blocks ----

// The mma_sync.cuh pieces on generic pointers into shared memory.
__device__ __forceinline__ void LdMatrix(uint32_t (&r)[4], const nv_bf16* p) { LdMatrixX4(r, SmemAddr(p)); }
__device__ __forceinline__ void LdMatrixTrans(uint32_t (&r)[4], const nv_bf16* p) { LdMatrixX4Trans(r, SmemAddr(p)); }
// 16 bytes global → shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  ops::cuda::CpAsync16(SmemAddr(smem), gmem, valid);  // the shared-address form
}

__device__ __forceinline__ int Lane() { return threadIdx.x & 31; }

// Fragments (PTX ISA, mma.m16n8k16): with g = lane/4, t = lane%4, A holds
// (g, 2t..2t+1), (g+8, ·), (g, 2t+8..), (g+8, 2t+8..); B holds k rows
// 2t..2t+1 and 2t+8..2t+9 of column g; C holds (g, 2t..2t+1), (g+8, 2t..2t+1).
// A[m][k] = base[m·ld + k] at (m0, k0).
__device__ __forceinline__ void FragA(uint32_t (&a)[4], const nv_bf16* base, int ld, int m0, int k0) {
  const int l = Lane();
  LdMatrix(a, base + (m0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + k0 + (l >> 4) * 8);
}
// A[m][k] = base[k·ld + m]: A is the transpose of a token-major tile.
__device__ __forceinline__ void FragAT(uint32_t (&a)[4], const nv_bf16* base, int ld, int m0, int k0) {
  const int l = Lane();
  LdMatrixTrans(a, base + (k0 + (l & 7) + (l >> 4) * 8) * ld + m0 + ((l >> 3) & 1) * 8);
}
// B[k][n] = base[k·ld + n], two n-tiles (n0, n0 + 8): b[0..1] and b[2..3].
__device__ __forceinline__ void FragB(uint32_t (&b)[4], const nv_bf16* base, int ld, int k0, int n0) {
  const int l = Lane();
  LdMatrixTrans(b, base + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}
// B[k][n] = base[n·ld + k] (B is the transpose of a row-major tile).
__device__ __forceinline__ void FragBT(uint32_t (&b)[4], const nv_bf16* base, int ld, int k0, int n0) {
  const int l = Lane();
  LdMatrix(b, base + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}

__device__ __forceinline__ uint32_t Scale2(uint32_t v, float lo, float hi) {
  __nv_bfloat162 h;
  memcpy(&h, &v, 4);
  const float2 f = __bfloat1622float2(h);
  const __nv_bfloat162 r = __floats2bfloat162_rn(f.x * lo, f.y * hi);
  uint32_t out;
  memcpy(&out, &r, 4);
  return out;
}

template <int NT>
__device__ __forceinline__ void Zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// acc (16 × 8·NT) += A[m0.., 0..K) · B[0..K, n0..); B stored [k][n], or [n][k] when kBT.
template <int NT, int K, bool kBT>
__device__ __forceinline__ void WarpGemm(float (&acc)[NT][4], const nv_bf16* a, int lda, int m0, const nv_bf16* b,
                                         int ldb, int n0) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "whole fragments");
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t af[4];
    FragA(af, a, lda, m0, k0);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bf[4];
      if constexpr (kBT)
        FragBT(bf, b, ldb, k0, n0 + 8 * j);
      else
        FragB(bf, b, ldb, k0, n0 + 8 * j);
      Mma(acc[j], af, bf[0], bf[1]);
      Mma(acc[j + 1], af, bf[2], bf[3]);
    }
  }
}

// acc += (diag(f) X)ᵀ[m0.., :] · B[:, n0..): X token-major [k][m], f[k] one
// factor per token, B token-major [k][n]. The state update's product.
template <int NT, int K>
__device__ __forceinline__ void WarpGemmDecayedT(float (&acc)[NT][4], const nv_bf16* x, int ldx, int m0,
                                                 const float* f, const nv_bf16* b, int ldb, int n0) {
  const int t = Lane() & 3;
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t af[4];
    FragAT(af, x, ldx, m0, k0);
    const float f0 = f[k0 + 2 * t], f1 = f[k0 + 2 * t + 1], f2 = f[k0 + 2 * t + 8], f3 = f[k0 + 2 * t + 9];
    af[0] = Scale2(af[0], f0, f1);
    af[1] = Scale2(af[1], f0, f1);
    af[2] = Scale2(af[2], f2, f3);
    af[3] = Scale2(af[3], f2, f3);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bf[4];
      FragB(bf, b, ldb, k0, n0 + 8 * j);
      Mma(acc[j], af, bf[0], bf[1]);
      Mma(acc[j + 1], af, bf[2], bf[3]);
    }
  }
}

// Accumulator tile (rows m0.., cols n0..) → bf16 shared tile.
template <int NT>
__device__ __forceinline__ void StoreShared(nv_bf16* dst, int ld, int m0, int n0, const float (&acc)[NT][4]) {
  const int g = Lane() >> 2, t = Lane() & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = n0 + 8 * j + 2 * t;
    *reinterpret_cast<__nv_bfloat162*>(dst + (m0 + g) * ld + col) = __floats2bfloat162_rn(acc[j][0], acc[j][1]);
    *reinterpret_cast<__nv_bfloat162*>(dst + (m0 + g + 8) * ld + col) =
        __floats2bfloat162_rn(acc[j][2], acc[j][3]);
  }
}

// Accumulator tile → rows [0, len) of a chunk in global memory (row r at
// out + r·stride), written or added to.
template <int NT>
__device__ __forceinline__ void StoreGlobal(nv_bf16* out, int64_t stride, int m0, int n0, int len,
                                            const float (&acc)[NT][4], bool accumulate) {
  const int g = Lane() >> 2, t = Lane() & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + g + 8 * half;
    if (r >= len) continue;
    nv_bf16* row = out + r * stride;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      auto* p = reinterpret_cast<__nv_bfloat162*>(row + n0 + 8 * j + 2 * t);
      float x = acc[j][2 * half], y = acc[j][2 * half + 1];
      if (accumulate) {
        const float2 old = __bfloat1622float2(*p);
        x += old.x;
        y += old.y;
      }
      *p = __floats2bfloat162_rn(x, y);
    }
  }
}

// fp32 D × D state (row-major) ↔ a warp's accumulator tile.
template <int NT>
__device__ __forceinline__ void LoadState(float (&acc)[NT][4], const float* s, int d, int m0, int n0) {
  const int g = Lane() >> 2, t = Lane() & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = n0 + 8 * j + 2 * t;
    const float2 a = *reinterpret_cast<const float2*>(s + (m0 + g) * d + col);
    const float2 b = *reinterpret_cast<const float2*>(s + (m0 + g + 8) * d + col);
    acc[j][0] = a.x, acc[j][1] = a.y, acc[j][2] = b.x, acc[j][3] = b.y;
  }
}
template <int NT>
__device__ __forceinline__ void StoreState(float* s, int d, int m0, int n0, const float (&acc)[NT][4]) {
  const int g = Lane() >> 2, t = Lane() & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = n0 + 8 * j + 2 * t;
    *reinterpret_cast<float2*>(s + (m0 + g) * d + col) = make_float2(acc[j][0], acc[j][1]);
    *reinterpret_cast<float2*>(s + (m0 + g + 8) * d + col) = make_float2(acc[j][2], acc[j][3]);
  }
}

template <int NT>
__device__ __forceinline__ void ScaleAll(float (&acc)[NT][4], float s) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] *= s;
}
// Row r of the tile (rows m0..) times f[r].
template <int NT>
__device__ __forceinline__ void ScaleRows(float (&acc)[NT][4], int m0, const float* f) {
  const int g = Lane() >> 2;
  const float lo = f[m0 + g], hi = f[m0 + g + 8];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    acc[j][0] *= lo, acc[j][1] *= lo, acc[j][2] *= hi, acc[j][3] *= hi;
  }
}
// Scores tile (rows m0.., cols n0..) ⊙ decay mask: λ^(r−c) where the later
// index r and earlier index c satisfy c ≤ r, else 0. kRowIsLater picks
// which of (row, col) is the later token: rows for Q Kᵀ, columns for its
// transpose K Qᵀ.
template <int NT, bool kRowIsLater>
__device__ __forceinline__ void DecayMask(float (&acc)[NT][4], int m0, int n0, float log2_lambda) {
  const int g = Lane() >> 2, t = Lane() & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t + (e & 1);
      const int gap = kRowIsLater ? row - col : col - row;
      acc[j][e] = gap >= 0 ? acc[j][e] * exp2f(log2_lambda * static_cast<float>(gap)) : 0.f;
    }
}

// Tile geometry for head dim D: chunk tiles are C × (D + 8) bf16 (the pad
// keeps ldmatrix rows on distinct banks); state D × (D + 8).
template <int D>
struct Geometry {
  static_assert(D == 64 || D == 128, "head dims 64 and 128 are instantiated");
  static constexpr int kLd = D + 8;
  static constexpr int kTile = kChunk * kLd;   // elements
  static constexpr int kStateTile = D * kLd;  // elements
  // The state's warp tile: 16 rows × kStateCols.
  static constexpr int kRowGroups = D / 16;
  static constexpr int kColGroups = kWarps / kRowGroups;
  static constexpr int kStateCols = D / kColGroups;
  static constexpr int kStateNt = kStateCols / 8;
  // Output (C × D) warp tile: 16 rows × D/2.
  static constexpr int kOutNt = D / 16;
  __device__ static int StateRow(int w) { return 16 * (w % kRowGroups); }
  __device__ static int StateCol(int w) { return kStateCols * (w / kRowGroups); }
  __device__ static int OutRow(int w) { return 16 * (w % 4); }
  __device__ static int OutCol(int w) { return (D / 2) * (w / 4); }
  __device__ static int ScoreCol(int w) { return 32 * (w / 4); }  // score tile 16 × 32
};

// MoH's mask: token t of head h is active when on[h·blocks + t / block] ≠ 0;
// on == nullptr: every token is. Token indices fit an int (SegmentInfo), so
// the divisions are 32-bit: a 64-bit one is a ~70-instruction routine, and
// ten of them a chunk and thread made the masked kernels slower than the
// unmasked ones (docs/moh.md).
struct MaskArg {
  const int32_t* on = nullptr;
  int blocks = 0, block = 1;
};
__device__ __forceinline__ bool TokenActive(const MaskArg& m, int h, int t) {
  return m.on == nullptr || m.on[h * m.blocks + t / m.block] != 0;
}
// Which of a chunk's tokens [t0, t0 + len) are active, asked once a chunk
// (every thread gets the same answer: a few reads of the mask, no barrier):
// any (the chunk runs its output terms) and all (its rows need no per-row
// mask; with blocks of the chunk's size every active chunk is all active).
struct ChunkOn {
  bool any = true, all = true;
  // The mask LoadChunk applies to the chunk's rows: none when all are on.
  __device__ MaskArg RowMask(const MaskArg& m) const { return all ? MaskArg{} : m; }
};
__device__ __forceinline__ ChunkOn ChunkActivity(const MaskArg& m, int h, int t0, int len) {
  ChunkOn c;
  if (m.on == nullptr) return c;
  c.any = false;
  for (int b = t0 / m.block; b <= (t0 + len - 1) / m.block; ++b) {
    const bool on = m.on[h * m.blocks + b] != 0;
    c.any |= on;
    c.all &= on;
  }
  return c;
}

// Async copy of rows [0, len) of a chunk (row r at src + r·stride, token
// t0 + r) into a C × (D + 8) tile; rows past len, and with a mask the rows of
// inactive tokens, are zero.
template <int D>
__device__ __forceinline__ void LoadChunk(nv_bf16* tile, const nv_bf16* src, int64_t stride, int len,
                                          const MaskArg& mask = {}, int h = 0, int t0 = 0) {
  constexpr int kPieces = D / 8;
#pragma unroll
  for (int i = threadIdx.x; i < kChunk * kPieces; i += kThreads) {
    const int r = i / kPieces, c = (i % kPieces) * 8;
    const bool valid = r < len && TokenActive(mask, h, t0 + r);
    CpAsync16(tile + r * Geometry<D>::kLd + c, src + (valid ? r : 0) * stride + c, valid);
  }
}

// ---- (a) State walk over one segment ----
// kQueryMode false: chunks forward, X ← λ^len X + Σ_j λ^(len−1−j) a_jᵀ b_j
//   (a, b = k, v: the segment's memory state).
// kQueryMode true: chunks backward, X ← λ^len X + Σ_i λ^(i+1) a_iᵀ b_i
//   (a, b = q, do: the gradient the segment sends to its entry state).
// out [segments, H, D, D]. mask (query mode): b's rows of inactive tokens are
// 0, and chunks without an active token add nothing.
template <int D, bool kQueryMode>
__global__ void __launch_bounds__(kThreads, 2)
    StateWalkKernel(const nv_bf16* a, const nv_bf16* b, const float* decay, const SegmentInfo* segments, int heads,
                    MaskArg mask, float* out) {
  using G = Geometry<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  nv_bf16* tiles = reinterpret_cast<nv_bf16*>(smem);  // [2 stages][a, b]
  float* fac = reinterpret_cast<float*>(tiles + 4 * G::kTile);
  const SegmentInfo seg = segments[blockIdx.x];
  const int h = blockIdx.y, w = threadIdx.x / 32;
  const float l2 = log2f(decay[h]);
  const int64_t stride = static_cast<int64_t>(heads) * D;
  const int64_t base = (static_cast<int64_t>(seg.begin) * heads + h) * D;
  const int chunks = (seg.length + kChunk - 1) / kChunk;
  auto chunk_of = [&](int step) { return kQueryMode ? chunks - 1 - step : step; };
  auto activity = [&](int step) {
    const int c = chunk_of(step);
    return ChunkActivity(mask, h, seg.begin + c * kChunk, min(kChunk, seg.length - c * kChunk));
  };
  auto load = [&](int step, ChunkOn on) {
    const int c = chunk_of(step), len = min(kChunk, seg.length - c * kChunk);
    if (!on.any) return;
    nv_bf16* stage = tiles + (step & 1) * 2 * G::kTile;
    const int64_t off = base + static_cast<int64_t>(c) * kChunk * stride;
    LoadChunk<D>(stage, a + off, stride, len);
    LoadChunk<D>(stage + G::kTile, b + off, stride, len, on.RowMask(mask), h, seg.begin + c * kChunk);
  };
  float x[G::kStateNt][4];
  Zero(x);
  ChunkOn on = activity(0), on_next;
  load(0, on);
  CpAsyncCommit();
  for (int step = 0; step < chunks; ++step) {
    const int len = min(kChunk, seg.length - chunk_of(step) * kChunk);
    if (step + 1 < chunks) {
      on_next = activity(step + 1);
      load(step + 1, on_next);
    }
    CpAsyncCommit();
    if (threadIdx.x < kChunk) {
      const int i = threadIdx.x;
      fac[i] = i < len ? exp2f(l2 * static_cast<float>(kQueryMode ? i + 1 : len - 1 - i)) : 0.f;
    }
    CpAsyncWait<1>();
    __syncthreads();
    const nv_bf16* stage = tiles + (step & 1) * 2 * G::kTile;
    ScaleAll(x, exp2f(l2 * static_cast<float>(len)));
    if (on.any)
      WarpGemmDecayedT<G::kStateNt, kChunk>(x, stage, G::kLd, G::StateRow(w), fac, stage + G::kTile, G::kLd,
                                            G::StateCol(w));
    __syncthreads();
    on = on_next;
  }
  StoreState(out + (static_cast<int64_t>(blockIdx.x) * heads + h) * D * D, D, G::StateRow(w), G::StateCol(w), x);
}

// ---- (b) Scan over a row's segments, fp32 ----
// x = init (or 0; init_transposed reads init[j][i] for element (i, j)); for
// each segment s of the row, in order or reversed:
//   c = slot_s (0 when !has_contrib);  slot_s = x;  x = λ^(L_s) x + c
// then final (if given) = x, or += x. Forward: slot_s becomes the entry state
// E_s; reversed: the gradient of the state leaving s.
__global__ void __launch_bounds__(256)
    ScanKernel(float* states, const SegmentInfo* segments, const RowInfo* rows, int heads, int d,
               const float* decay, const float* init, bool init_transposed, bool reverse, bool has_contrib,
               float* final_state, bool accumulate_final) {
  const int dd = d * d;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= dd) return;
  const int h = blockIdx.y, r = blockIdx.z;
  const float l2 = log2f(decay[h]);
  const int64_t rh = static_cast<int64_t>(r) * heads + h;
  float x = 0.f;
  if (init) x = init[rh * dd + (init_transposed ? (e % d) * d + e / d : e)];
  const RowInfo row = rows[r];
  constexpr int kBatch = 8;  // contributions loaded ahead of the serial chain
  for (int i0 = 0; i0 < row.count; i0 += kBatch) {
    float c[kBatch];
    int s[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u;
      s[u] = i < row.count ? row.first + (reverse ? row.count - 1 - i : i) : -1;
      c[u] = (s[u] >= 0 && has_contrib) ? states[(static_cast<int64_t>(s[u]) * heads + h) * dd + e] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (s[u] < 0) break;
      states[(static_cast<int64_t>(s[u]) * heads + h) * dd + e] = x;
      x = exp2f(l2 * static_cast<float>(segments[s[u]].length)) * x + c[u];
    }
  }
  if (final_state) {
    float* f = final_state + rh * dd + e;
    *f = accumulate_final ? *f + x : x;
  }
}

// ---- (c) Output of each segment from its entry state ----
// o = [(Q Kᵀ) ⊙ D] V + diag(λ^(i+1)) Q S chunk by chunk, S from entry[seg].
// mask: q's rows of inactive tokens are 0, so are their o rows; a chunk
// without an active token writes 0 (adds nothing) and only updates S.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    ForwardOutputKernel(const nv_bf16* q, const nv_bf16* k, const nv_bf16* v, const float* decay,
                        const SegmentInfo* segments, int heads, const float* entry, MaskArg mask, nv_bf16* o,
                        bool accumulate) {
  using G = Geometry<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  nv_bf16* tiles = reinterpret_cast<nv_bf16*>(smem);      // [2 stages][q, k, v]
  nv_bf16* sb = tiles + 6 * G::kTile;                     // S in bf16, [D][D + 8]
  nv_bf16* ps = sb + G::kStateTile;                       // masked scores [C][C + 8]
  float* fq = reinterpret_cast<float*>(ps + kChunk * kScoreLd);  // λ^(i+1)
  float* fk = fq + kChunk;                                       // λ^(len−1−j)
  const SegmentInfo seg = segments[blockIdx.x];
  const int h = blockIdx.y, w = threadIdx.x / 32;
  const float l2 = log2f(decay[h]);
  const int64_t stride = static_cast<int64_t>(heads) * D;
  const int64_t base = (static_cast<int64_t>(seg.begin) * heads + h) * D;
  const int chunks = (seg.length + kChunk - 1) / kChunk;
  auto activity = [&](int c) {
    return ChunkActivity(mask, h, seg.begin + c * kChunk, min(kChunk, seg.length - c * kChunk));
  };
  auto load = [&](int c, ChunkOn on) {
    const int len = min(kChunk, seg.length - c * kChunk);
    nv_bf16* stage = tiles + (c & 1) * 3 * G::kTile;
    const int64_t off = base + static_cast<int64_t>(c) * kChunk * stride;
    if (on.any) LoadChunk<D>(stage, q + off, stride, len, on.RowMask(mask), h, seg.begin + c * kChunk);
    LoadChunk<D>(stage + G::kTile, k + off, stride, len);
    LoadChunk<D>(stage + 2 * G::kTile, v + off, stride, len);
  };
  const int sm0 = G::StateRow(w), sn0 = G::StateCol(w);
  const int om0 = G::OutRow(w), on0 = G::OutCol(w), pn0 = G::ScoreCol(w);
  float s[G::kStateNt][4];
  LoadState(s, entry + (static_cast<int64_t>(blockIdx.x) * heads + h) * D * D, D, sm0, sn0);
  ChunkOn on = activity(0), on_next;
  load(0, on);
  CpAsyncCommit();
  for (int c = 0; c < chunks; ++c) {
    const int len = min(kChunk, seg.length - c * kChunk);
    if (c + 1 < chunks) {
      on_next = activity(c + 1);
      load(c + 1, on_next);
    }
    CpAsyncCommit();
    StoreShared(sb, G::kLd, sm0, sn0, s);
    if (threadIdx.x < kChunk) {
      const int i = threadIdx.x;
      fq[i] = exp2f(l2 * static_cast<float>(i + 1));
      fk[i] = i < len ? exp2f(l2 * static_cast<float>(len - 1 - i)) : 0.f;
    }
    CpAsyncWait<1>();
    __syncthreads();
    const nv_bf16* qt = tiles + (c & 1) * 3 * G::kTile;
    const nv_bf16* kt = qt + G::kTile;
    const nv_bf16* vt = kt + G::kTile;
    float acc[G::kOutNt][4];
    Zero(acc);
    if (on.any) {
      {
        float p[4][4];
        Zero(p);
        WarpGemm<4, D, true>(p, qt, G::kLd, om0, kt, G::kLd, pn0);
        DecayMask<4, true>(p, om0, pn0, l2);
        StoreShared(ps, kScoreLd, om0, pn0, p);
      }
      WarpGemm<G::kOutNt, D, false>(acc, qt, G::kLd, om0, sb, G::kLd, on0);
      ScaleRows(acc, om0, fq);
      __syncthreads();
      WarpGemm<G::kOutNt, kChunk, false>(acc, ps, kScoreLd, om0, vt, G::kLd, on0);
    }
    if (on.any || !accumulate)
      StoreGlobal(o + base + static_cast<int64_t>(c) * kChunk * stride, stride, om0, on0, len, acc, accumulate);
    ScaleAll(s, exp2f(l2 * static_cast<float>(len)));
    WarpGemmDecayedT<G::kStateNt, kChunk>(s, kt, G::kLd, sm0, fk, vt, G::kLd, sn0);
    __syncthreads();
    on = on_next;
  }
}

// ---- (c') dK, dV of each segment, walking its chunks backwards ----
// dS starts as the gradient of the state leaving the segment (exit[seg]).
// With intra false only the state path runs (the chunk-state phase's
// backward): dK = diag(λ^(len−1−j)) V dSᵀ, dV = diag(λ^(len−1−j)) K dS.
// mask: do's rows of inactive tokens are 0; a chunk without an active token
// runs the state path only.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    DkDvKernel(const nv_bf16* q, const nv_bf16* k, const nv_bf16* v, const nv_bf16* d_o, const float* decay,
               const SegmentInfo* segments, int heads, const float* exit, MaskArg mask, nv_bf16* dk, nv_bf16* dv,
               bool accumulate, bool intra) {
  using G = Geometry<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  nv_bf16* tiles = reinterpret_cast<nv_bf16*>(smem);  // [2 stages][q, k, v, do]
  nv_bf16* dsb = tiles + 8 * G::kTile;                // dS in bf16
  nv_bf16* pts = dsb + G::kStateTile;                 // [(Q Kᵀ) ⊙ D]ᵀ
  nv_bf16* dats = pts + kChunk * kScoreLd;            // [(dO Vᵀ) ⊙ D]ᵀ
  float* fq = reinterpret_cast<float*>(dats + kChunk * kScoreLd);
  float* fk = fq + kChunk;
  const SegmentInfo seg = segments[blockIdx.x];
  const int h = blockIdx.y, w = threadIdx.x / 32;
  const float l2 = log2f(decay[h]);
  const int64_t stride = static_cast<int64_t>(heads) * D;
  const int64_t base = (static_cast<int64_t>(seg.begin) * heads + h) * D;
  const int chunks = (seg.length + kChunk - 1) / kChunk;
  // Which of chunk c's tokens are active; the chunk runs its intra terms when any is.
  auto activity = [&](int c) {
    ChunkOn on = ChunkActivity(mask, h, seg.begin + c * kChunk, min(kChunk, seg.length - c * kChunk));
    on.any &= intra;
    return on;
  };
  auto load = [&](int step, ChunkOn on) {
    const int c = chunks - 1 - step, len = min(kChunk, seg.length - c * kChunk);
    nv_bf16* stage = tiles + (step & 1) * 4 * G::kTile;
    const int64_t off = base + static_cast<int64_t>(c) * kChunk * stride;
    LoadChunk<D>(stage + G::kTile, k + off, stride, len);
    LoadChunk<D>(stage + 2 * G::kTile, v + off, stride, len);
    if (on.any) {
      LoadChunk<D>(stage, q + off, stride, len);
      LoadChunk<D>(stage + 3 * G::kTile, d_o + off, stride, len, on.RowMask(mask), h, seg.begin + c * kChunk);
    }
  };
  const int sm0 = G::StateRow(w), sn0 = G::StateCol(w);
  const int om0 = G::OutRow(w), on0 = G::OutCol(w), pn0 = G::ScoreCol(w);
  float ds[G::kStateNt][4];
  LoadState(ds, exit + (static_cast<int64_t>(blockIdx.x) * heads + h) * D * D, D, sm0, sn0);
  ChunkOn on = activity(chunks - 1), on_next;
  load(0, on);
  CpAsyncCommit();
  for (int step = 0; step < chunks; ++step) {
    const int c = chunks - 1 - step, len = min(kChunk, seg.length - c * kChunk);
    if (step + 1 < chunks) {
      on_next = activity(c - 1);
      load(step + 1, on_next);
    }
    CpAsyncCommit();
    StoreShared(dsb, G::kLd, sm0, sn0, ds);
    if (threadIdx.x < kChunk) {
      const int i = threadIdx.x;
      fq[i] = i < len ? exp2f(l2 * static_cast<float>(i + 1)) : 0.f;
      fk[i] = i < len ? exp2f(l2 * static_cast<float>(len - 1 - i)) : 0.f;
    }
    CpAsyncWait<1>();
    __syncthreads();
    const nv_bf16* qt = tiles + (step & 1) * 4 * G::kTile;
    const nv_bf16* kt = qt + G::kTile;
    const nv_bf16* vt = kt + G::kTile;
    const nv_bf16* dot = vt + G::kTile;
    const bool chunk_intra = on.any;
    if (chunk_intra) {
      float p[4][4];
      Zero(p);
      WarpGemm<4, D, true>(p, kt, G::kLd, om0, qt, G::kLd, pn0);  // k_j · q_i
      DecayMask<4, false>(p, om0, pn0, l2);
      StoreShared(pts, kScoreLd, om0, pn0, p);
      Zero(p);
      WarpGemm<4, D, true>(p, vt, G::kLd, om0, dot, G::kLd, pn0);  // v_j · do_i
      DecayMask<4, false>(p, om0, pn0, l2);
      StoreShared(dats, kScoreLd, om0, pn0, p);
    }
    float gv[G::kOutNt][4], gk[G::kOutNt][4];
    Zero(gv);
    Zero(gk);
    WarpGemm<G::kOutNt, D, false>(gv, kt, G::kLd, om0, dsb, G::kLd, on0);  // K dS
    WarpGemm<G::kOutNt, D, true>(gk, vt, G::kLd, om0, dsb, G::kLd, on0);   // V dSᵀ
    ScaleRows(gv, om0, fk);
    ScaleRows(gk, om0, fk);
    __syncthreads();
    if (chunk_intra) {
      WarpGemm<G::kOutNt, kChunk, false>(gv, pts, kScoreLd, om0, dot, G::kLd, on0);
      WarpGemm<G::kOutNt, kChunk, false>(gk, dats, kScoreLd, om0, qt, G::kLd, on0);
    }
    const int64_t off = base + static_cast<int64_t>(c) * kChunk * stride;
    StoreGlobal(dv + off, stride, om0, on0, len, gv, accumulate);
    StoreGlobal(dk + off, stride, om0, on0, len, gk, accumulate);
    ScaleAll(ds, exp2f(l2 * static_cast<float>(len)));
    if (chunk_intra) WarpGemmDecayedT<G::kStateNt, kChunk>(ds, qt, G::kLd, sm0, fq, dot, G::kLd, sn0);
    __syncthreads();
    on = on_next;
  }
}

// ---- (3) Inter-chunk phase: o_i += λ^(i+1) q_i S (S, or Sᵀ when transposed) ----
// One block per kInterTokens tokens of one head; i counts from the chunk's start.
template <int D>
__global__ void __launch_bounds__(kThreads)
    InterChunkKernel(const nv_bf16* q, const float* decay, int tokens, int heads, const float* s, bool transposed,
                     nv_bf16* o) {
  using G = Geometry<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  nv_bf16* qt = reinterpret_cast<nv_bf16*>(smem);
  nv_bf16* sb = qt + G::kTile;
  float* f = reinterpret_cast<float*>(sb + G::kStateTile);
  const int h = blockIdx.y, w = threadIdx.x / 32;
  const float l2 = log2f(decay[h]);
  const int64_t stride = static_cast<int64_t>(heads) * D;
  const float* sh = s + static_cast<int64_t>(h) * D * D;
  for (int e = threadIdx.x; e < D * D; e += kThreads) sb[(e / D) * G::kLd + e % D] = __float2bfloat16_rn(sh[e]);
  const int om0 = G::OutRow(w), on0 = G::OutCol(w);
  for (int t0 = blockIdx.x * kInterTokens; t0 < min(tokens, (blockIdx.x + 1) * kInterTokens); t0 += kChunk) {
    const int len = min(kChunk, tokens - t0);
    const int64_t off = (static_cast<int64_t>(t0) * heads + h) * D;
    LoadChunk<D>(qt, q + off, stride, len);
    CpAsyncCommit();
    if (threadIdx.x < kChunk) f[threadIdx.x] = exp2f(l2 * static_cast<float>(t0 + threadIdx.x + 1));
    CpAsyncWait<0>();
    __syncthreads();
    float acc[G::kOutNt][4];
    Zero(acc);
    if (transposed)
      WarpGemm<G::kOutNt, D, true>(acc, qt, G::kLd, om0, sb, G::kLd, on0);
    else
      WarpGemm<G::kOutNt, D, false>(acc, qt, G::kLd, om0, sb, G::kLd, on0);
    ScaleRows(acc, om0, f);
    StoreGlobal(o + off, stride, om0, on0, len, acc, /*accumulate=*/true);
    __syncthreads();
  }
}

// ---- Host side ----

template <int D>
struct Smem {
  using G = Geometry<D>;
  static constexpr size_t kStateWalk = 4 * G::kTile * 2 + kChunk * 4;
  static constexpr size_t kForward = (6 * G::kTile + G::kStateTile + kChunk * kScoreLd) * 2 + 2 * kChunk * 4;
  static constexpr size_t kDkDv = (8 * G::kTile + G::kStateTile + 2 * kChunk * kScoreLd) * 2 + 2 * kChunk * 4;
  static constexpr size_t kInter = (G::kTile + G::kStateTile) * 2 + kChunk * 4;
};

template <typename Kernel>
void AllowSmem(Kernel kernel, size_t bytes) {
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

cudaStream_t Native(CudaStream s) { return static_cast<cudaStream_t>(s); }

const nv_bf16* Bf(const Tensor& t) { return t.defined() ? static_cast<const nv_bf16*>(t.raw()) : nullptr; }
nv_bf16* BfMut(Tensor& t) { return static_cast<nv_bf16*>(t.raw()); }
const float* F32(const Tensor& t) { return t.defined() ? static_cast<const float*>(t.raw()) : nullptr; }
float* F32Mut(Tensor& t) { return t.defined() ? static_cast<float*>(t.raw()) : nullptr; }

// ---- Argument checks ----

struct Dims {
  int64_t t, h, d;
  int device;
};

void CheckCuda(const Tensor& t, const Shape& shape, DType dtype, int device, const char* name) {
  LOOM_CHECK(t.defined(), "[lightning_attention] CUDA: ", name, " is undefined");
  LOOM_CHECK(!t.device().is_cpu() && t.device().index == device, "[lightning_attention] CUDA: ", name, " is on ",
             t.device().ToString(), ", expected cuda:", device);
  LOOM_CHECK(t.shape() == shape, "[lightning_attention] CUDA: ", name, " is ", ShapeString(t.shape()),
             ", expected ", ShapeString(shape));
  LOOM_CHECK(t.dtype() == dtype, "[lightning_attention] CUDA: ", name, " is ", DTypeName(t.dtype()), ", expected ",
             DTypeName(dtype));
}

// q (or the first token-major operand) [T, H, D] bf16 fixes the dims.
Dims CheckTokens(const Tensor& q, const Tensor& decay, const char* name) {
  LOOM_CHECK(q.defined() && q.ndim() == 3 && !q.device().is_cpu(), "[lightning_attention] CUDA: ", name,
             " must be a CUDA [T, H, D] tensor, got ", q.defined() ? ShapeString(q.shape()) : std::string("undefined"),
             q.defined() ? " on " + q.device().ToString() : std::string());
  const Dims d{q.dim(0), q.dim(1), q.dim(2), q.device().index};
  LOOM_CHECK(d.d == 64 || d.d == 128, "[lightning_attention] CUDA: head dim ", d.d,
             " has no kernel instance (64 and 128 do; a new one is one line in DispatchHeadDim)");
  LOOM_CHECK(d.t < (int64_t{1} << 31) / 2, "[lightning_attention] CUDA: ", d.t, " tokens is too many");
  CheckCuda(q, q.shape(), DType::kBF16, d.device, name);
  CheckCuda(decay, {d.h}, DType::kF32, d.device, "decay");
  LOOM_CUDA_CHECK(cudaSetDevice(d.device));
  return d;
}

// ---- The plan: segments of every row, uploaded into the workspace ----

struct Plan {
  std::vector<int32_t> cu;  // the cu_seqlens it was made from
  int64_t segments = 0;
  int64_t rows = 0;
};

size_t AlignUp(size_t n) { return (n + 255) / 256 * 256; }
size_t PlanBytes(int64_t segments, int64_t rows) {
  return AlignUp(segments * sizeof(SegmentInfo) + rows * sizeof(RowInfo));
}

int64_t CountSegments(const std::vector<int32_t>& cu) {
  int64_t n = 0;
  for (size_t r = 0; r + 1 < cu.size(); ++r) n += (cu[r + 1] - cu[r] + kSegment - 1) / kSegment;
  return n;
}

// Device pointers into the workspace, valid for one call.
struct Scratch {
  const SegmentInfo* segments;
  const RowInfo* rows;
  float* states;  // [segments, H, D, D]
  int64_t nseg, nrows;
};

Scratch Prepare(const std::vector<int32_t>& cu, int64_t heads, int64_t d, int device, LightningWorkspace& ws,
                cudaStream_t stream) {
  const int64_t nseg = CountSegments(cu), nrows = static_cast<int64_t>(cu.size()) - 1;
  const size_t plan_bytes = PlanBytes(nseg, nrows);
  const size_t bytes = plan_bytes + static_cast<size_t>(nseg) * heads * d * d * sizeof(float);
  if (!ws.buffer.defined() || ws.buffer.nbytes() < bytes || ws.buffer.device().index != device) {
    ws.buffer = Tensor::Empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::kF32, Device::Cuda(device));
    ws.planned_cu.clear();
  }
  char* base = static_cast<char*>(ws.buffer.raw());
  if (ws.planned_cu != cu) {
    std::vector<SegmentInfo> segs;
    std::vector<RowInfo> rows;
    for (int64_t r = 0; r < nrows; ++r) {
      rows.push_back({static_cast<int>(segs.size()), 0});
      for (int32_t t = cu[r]; t < cu[r + 1]; t += kSegment) segs.push_back({static_cast<int>(r), t, std::min(kSegment, cu[r + 1] - t), 0});
      rows.back().count = static_cast<int>(segs.size()) - rows.back().first;
    }
    std::vector<char> host(plan_bytes, 0);
    std::memcpy(host.data(), segs.data(), segs.size() * sizeof(SegmentInfo));
    std::memcpy(host.data() + segs.size() * sizeof(SegmentInfo), rows.data(), rows.size() * sizeof(RowInfo));
    // Pageable source: the copy is staged before this returns, so `host` may go.
    LOOM_CUDA_CHECK(cudaMemcpyAsync(base, host.data(), plan_bytes, cudaMemcpyHostToDevice, stream));
    ws.planned_cu = cu;
  }
  return {reinterpret_cast<const SegmentInfo*>(base), reinterpret_cast<const RowInfo*>(base + nseg * sizeof(SegmentInfo)),
          reinterpret_cast<float*>(base + plan_bytes), nseg, nrows};
}

// ---- Launchers of each kernel, one head dim ----

template <int D>
void LaunchStateWalk(const nv_bf16* a, const nv_bf16* b, const float* decay, const Scratch& sc, int heads,
                     bool query_mode, const MaskArg& mask, cudaStream_t stream) {
  if (sc.nseg == 0) return;
  const dim3 grid(static_cast<unsigned>(sc.nseg), heads);
  if (query_mode) {
    AllowSmem(StateWalkKernel<D, true>, Smem<D>::kStateWalk);
    StateWalkKernel<D, true><<<grid, kThreads, Smem<D>::kStateWalk, stream>>>(a, b, decay, sc.segments, heads, mask,
                                                                               sc.states);
  } else {
    AllowSmem(StateWalkKernel<D, false>, Smem<D>::kStateWalk);
    StateWalkKernel<D, false><<<grid, kThreads, Smem<D>::kStateWalk, stream>>>(a, b, decay, sc.segments, heads,
                                                                                MaskArg{}, sc.states);
  }
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void LaunchScan(const Scratch& sc, int heads, int d, const float* decay, const float* init, bool init_transposed,
                bool reverse, bool has_contrib, float* final_state, bool accumulate_final, cudaStream_t stream) {
  if (sc.nrows == 0) return;
  const dim3 grid((d * d + 255) / 256, heads, static_cast<unsigned>(sc.nrows));
  ScanKernel<<<grid, 256, 0, stream>>>(sc.states, sc.segments, sc.rows, heads, d, decay, init, init_transposed, reverse,
                                       has_contrib, final_state, accumulate_final);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

template <int D>
void LaunchForwardOutput(const nv_bf16* q, const nv_bf16* k, const nv_bf16* v, const float* decay, const Scratch& sc,
                         int heads, const MaskArg& mask, nv_bf16* o, bool accumulate, cudaStream_t stream) {
  if (sc.nseg == 0) return;
  AllowSmem(ForwardOutputKernel<D>, Smem<D>::kForward);
  ForwardOutputKernel<D><<<dim3(static_cast<unsigned>(sc.nseg), heads), kThreads, Smem<D>::kForward, stream>>>(
      q, k, v, decay, sc.segments, heads, sc.states, mask, o, accumulate);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

template <int D>
void LaunchDkDv(const nv_bf16* q, const nv_bf16* k, const nv_bf16* v, const nv_bf16* d_o, const float* decay,
                const Scratch& sc, int heads, const MaskArg& mask, nv_bf16* dk, nv_bf16* dv, bool accumulate,
                bool intra, cudaStream_t stream) {
  if (sc.nseg == 0) return;
  AllowSmem(DkDvKernel<D>, Smem<D>::kDkDv);
  DkDvKernel<D><<<dim3(static_cast<unsigned>(sc.nseg), heads), kThreads, Smem<D>::kDkDv, stream>>>(
      q, k, v, d_o, decay, sc.segments, heads, sc.states, mask, dk, dv, accumulate, intra);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

template <int D>
void LaunchInter(const nv_bf16* q, const float* decay, int64_t tokens, int heads, const float* s, bool transposed,
                 nv_bf16* o, cudaStream_t stream) {
  if (tokens == 0) return;
  AllowSmem(InterChunkKernel<D>, Smem<D>::kInter);
  const dim3 grid(static_cast<unsigned>((tokens + kInterTokens - 1) / kInterTokens), heads);
  InterChunkKernel<D><<<grid, kThreads, Smem<D>::kInter, stream>>>(q, decay, static_cast<int>(tokens), heads, s,
                                                                   transposed, o);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// The one place a head dim becomes a template argument.
template <typename Fn>
void DispatchHeadDim(int64_t d, Fn&& fn) {
  switch (d) {
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    default: LOOM_CHECK(false, "[lightning_attention] CUDA: no kernel for head dim ", d);
  }
}

// ---- The pipelines ----

// o (written or added) = lightning attention of (q, k, v) from state_in
// (transposed when asked); state_out optional. a, b of the state walk are k, v.
// mask: on q's rows (MoH).
void ForwardPipeline(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay, const Dims& d,
                     const std::vector<int32_t>& cu, const float* state_in, bool state_in_transposed,
                     float* state_out, nv_bf16* o, bool accumulate, LightningWorkspace& ws, cudaStream_t stream,
                     const MaskArg& mask = {}) {
  const Scratch sc = Prepare(cu, d.h, d.d, d.device, ws, stream);
  const int heads = static_cast<int>(d.h);
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    LaunchStateWalk<D>(Bf(k), Bf(v), F32(decay), sc, heads, false, MaskArg{}, stream);
    LaunchScan(sc, heads, D, F32(decay), state_in, state_in_transposed, false, true, state_out, false, stream);
    LaunchForwardOutput<D>(Bf(q), Bf(k), Bf(v), F32(decay), sc, heads, mask, o, accumulate, stream);
  });
}

// dk, dv (written or added) from the exit gradients: reverse state walk of
// (q, do) (skipped for the state-only path), reverse scan from d_state_out.
// mask: on do's rows (MoH).
void DkDvPipeline(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& d_o, const Tensor& decay,
                  const Dims& d, const std::vector<int32_t>& cu, const float* d_state_out, float* d_state_in,
                  bool accumulate_d_state_in, Tensor& dk, Tensor& dv, bool accumulate, bool intra,
                  LightningWorkspace& ws, cudaStream_t stream, const MaskArg& mask = {}) {
  const Scratch sc = Prepare(cu, d.h, d.d, d.device, ws, stream);
  const int heads = static_cast<int>(d.h);
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (intra) LaunchStateWalk<D>(Bf(q), Bf(d_o), F32(decay), sc, heads, true, mask, stream);
    LaunchScan(sc, heads, D, F32(decay), d_state_out, false, true, intra, d_state_in, accumulate_d_state_in, stream);
    LaunchDkDv<D>(Bf(q), Bf(k), Bf(v), Bf(d_o), F32(decay), sc, heads, mask, BfMut(dk), BfMut(dv), accumulate,
                  intra, stream);
  });
}

// MoH's mask of a fused call: undefined, or i32 [H, ceil(T / block)] on q's device.
MaskArg MaskOf(const Tensor& active, int64_t block, const Dims& d) {
  if (!active.defined()) return {};
  LOOM_CHECK(block >= 1, "[lightning_attention] CUDA: mask block ", block, " must be >= 1");
  CheckCuda(active, {d.h, (d.t + block - 1) / block}, DType::kI32, d.device, "active");
  LOOM_CHECK(block < (int64_t{1} << 31), "[lightning_attention] CUDA: mask block ", block, " exceeds an int");
  return {static_cast<const int32_t*>(active.raw()), static_cast<int>(active.dim(1)), static_cast<int>(block)};
}

}  // namespace

// ---- Fused calls ----

void LightningAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                               const TokenRows& rows, const Tensor& state_in, Tensor& o, Tensor& state_out,
                               LightningWorkspace& workspace, CudaStream stream, const Tensor& active,
                               int64_t active_block) {
  NvtxRange range("LightningAttentionForward");
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(k, q.shape(), DType::kBF16, d.device, "k");
  CheckCuda(v, q.shape(), DType::kBF16, d.device, "v");
  CheckCuda(o, q.shape(), DType::kBF16, d.device, "o");
  CheckRowsHost(rows, d.t, kOp);
  const Shape state_shape{rows.rows(), d.h, d.d, d.d};
  if (state_in.defined()) CheckCuda(state_in, state_shape, DType::kF32, d.device, "state_in");
  if (state_out.defined()) CheckCuda(state_out, state_shape, DType::kF32, d.device, "state_out");
  ForwardPipeline(q, k, v, decay, d, HostCu(rows), F32(state_in), false, F32Mut(state_out), BfMut(o), false,
                  workspace, Native(stream), MaskOf(active, active_block, d));
}

void LightningAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                const TokenRows& rows, const Tensor& state_in, const Tensor& d_o,
                                const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_state_in,
                                LightningWorkspace& workspace, CudaStream stream, const Tensor& active,
                                int64_t active_block) {
  NvtxRange range("LightningAttentionBackward");
  const Dims d = CheckTokens(q, decay, "q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&d_o, "d_o"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}})
    CheckCuda(*t, q.shape(), DType::kBF16, d.device, name);
  CheckRowsHost(rows, d.t, kOp);
  const Shape state_shape{rows.rows(), d.h, d.d, d.d};
  if (state_in.defined()) CheckCuda(state_in, state_shape, DType::kF32, d.device, "state_in");
  if (d_state_out.defined()) CheckCuda(d_state_out, state_shape, DType::kF32, d.device, "d_state_out");
  if (d_state_in.defined()) CheckCuda(d_state_in, state_shape, DType::kF32, d.device, "d_state_in");
  const std::vector<int32_t> cu = HostCu(rows);
  const MaskArg mask = MaskOf(active, active_block, d);
  // dQ is the forward of (dO, V, K) from state_inᵀ (masked dO rows give 0).
  ForwardPipeline(d_o, v, k, decay, d, cu, F32(state_in), true, nullptr, BfMut(dq), false, workspace,
                  Native(stream), mask);
  DkDvPipeline(q, k, v, d_o, decay, d, cu, F32(d_state_out), F32Mut(d_state_in), false, dk, dv, false, true,
               workspace, Native(stream), mask);
}

// ---- Phases on one chunk (one row of C tokens) ----

bool LightningChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m,
                         LightningWorkspace& workspace, CudaStream stream) {
  NvtxRange range("LightningChunkState");
  const Dims d = CheckTokens(k, decay, "k");
  CheckCuda(v, k.shape(), DType::kBF16, d.device, "v");
  CheckCuda(m, {d.h, d.d, d.d}, DType::kF32, d.device, "m");
  CheckNoChunkDocs(doc_ids, kOp);
  const std::vector<int32_t> cu{0, static_cast<int32_t>(d.t)};
  const Scratch sc = Prepare(cu, d.h, d.d, d.device, workspace, Native(stream));
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    LaunchStateWalk<D>(Bf(k), Bf(v), F32(decay), sc, static_cast<int>(d.h), false, MaskArg{}, Native(stream));
    LaunchScan(sc, static_cast<int>(d.h), D, F32(decay), nullptr, false, false, true, F32Mut(m), false,
               Native(stream));
  });
  return false;  // no documents, so no boundary
}

void LightningChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                 const Tensor& dm, Tensor& dk, Tensor& dv, LightningWorkspace& workspace,
                                 CudaStream stream) {
  NvtxRange range("LightningChunkStateBackward");
  const Dims d = CheckTokens(k, decay, "k");
  CheckCuda(v, k.shape(), DType::kBF16, d.device, "v");
  CheckCuda(dk, k.shape(), DType::kBF16, d.device, "dk");
  CheckCuda(dv, k.shape(), DType::kBF16, d.device, "dv");
  CheckCuda(dm, {d.h, d.d, d.d}, DType::kF32, d.device, "dm");
  CheckNoChunkDocs(doc_ids, kOp);
  const std::vector<int32_t> cu{0, static_cast<int32_t>(d.t)};
  DkDvPipeline(Tensor(), k, v, Tensor(), decay, d, cu, F32(dm), nullptr, false, dk, dv, true, false, workspace,
               Native(stream));
}

void LightningIntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                         const Tensor& doc_ids, Tensor& o, LightningWorkspace& workspace, CudaStream stream) {
  NvtxRange range("LightningIntraChunk");
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(k, q.shape(), DType::kBF16, d.device, "k");
  CheckCuda(v, q.shape(), DType::kBF16, d.device, "v");
  CheckCuda(o, q.shape(), DType::kBF16, d.device, "o");
  CheckNoChunkDocs(doc_ids, kOp);
  ForwardPipeline(q, k, v, decay, d, {0, static_cast<int32_t>(d.t)}, nullptr, false, nullptr, BfMut(o), false,
                  workspace, Native(stream));
}

void LightningIntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                 const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv,
                                 LightningWorkspace& workspace, CudaStream stream) {
  NvtxRange range("LightningIntraChunkBackward");
  const Dims d = CheckTokens(q, decay, "q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&d_o, "d_o"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}})
    CheckCuda(*t, q.shape(), DType::kBF16, d.device, name);
  CheckNoChunkDocs(doc_ids, kOp);
  const std::vector<int32_t> cu{0, static_cast<int32_t>(d.t)};
  ForwardPipeline(d_o, v, k, decay, d, cu, nullptr, false, nullptr, BfMut(dq), true, workspace, Native(stream));
  DkDvPipeline(q, k, v, d_o, decay, d, cu, nullptr, nullptr, false, dk, dv, true, true, workspace, Native(stream));
}

void LightningInterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s, Tensor& o,
                         CudaStream stream) {
  NvtxRange range("LightningInterChunk");
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(s, {d.h, d.d, d.d}, DType::kF32, d.device, "s");
  CheckCuda(o, q.shape(), DType::kBF16, d.device, "o");
  CheckNoChunkDocs(doc_ids, kOp);
  DispatchHeadDim(d.d, [&](auto dim) {
    LaunchInter<decltype(dim)::value>(Bf(q), F32(decay), d.t, static_cast<int>(d.h), F32(s), false, BfMut(o),
                                      Native(stream));
  });
}

void LightningInterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s,
                                 const Tensor& d_o, Tensor& dq, Tensor& ds, LightningWorkspace& workspace,
                                 CudaStream stream) {
  NvtxRange range("LightningInterChunkBackward");
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(s, {d.h, d.d, d.d}, DType::kF32, d.device, "s");
  CheckCuda(ds, {d.h, d.d, d.d}, DType::kF32, d.device, "ds");
  CheckCuda(d_o, q.shape(), DType::kBF16, d.device, "d_o");
  CheckCuda(dq, q.shape(), DType::kBF16, d.device, "dq");
  CheckNoChunkDocs(doc_ids, kOp);
  const std::vector<int32_t> cu{0, static_cast<int32_t>(d.t)};
  const Scratch sc = Prepare(cu, d.h, d.d, d.device, workspace, Native(stream));
  const int heads = static_cast<int>(d.h);
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    // dq_i += λ^(i+1) do_i Sᵀ
    LaunchInter<D>(Bf(d_o), F32(decay), d.t, heads, F32(s), true, BfMut(dq), Native(stream));
    // dS += Σ_i λ^(i+1) q_iᵀ do_i: per-segment sums, folded by the reverse scan.
    LaunchStateWalk<D>(Bf(q), Bf(d_o), F32(decay), sc, heads, true, MaskArg{}, Native(stream));
    LaunchScan(sc, heads, D, F32(decay), nullptr, false, true, true, F32Mut(ds), true, Native(stream));
  });
}

}  // namespace loom::ops::cuda
