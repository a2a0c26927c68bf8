// f32 lightning attention on CUDA, for fp32 GPU runs: the math of
// ops/lightning_attention.h with every product an f32 FMA on CUDA cores (no
// tensor cores: TF32 would miss the 1e-5 agreement with the CPU).
//   q, k, v, o, d_o, dq, dk, dv [T, H, D] f32, D in {16, 32, 64, 128}
//   decay [H] f32, states [R, H, D, D] f32, all on one CUDA device
// Rows tile [0, T) (cu_seqlens on the host); documents inside a row are
// refused, as on the bf16 path: give each document its own row.
//
// A row of one head is cut into segments of 1,024 tokens, walked in chunks of
// C = 64 tokens, so the number of thread blocks grows with the tokens, not
// with rows × heads (8K tokens × 32 heads: 256 blocks).
// Forward, three launches:
//   (a) State: per segment s of L tokens, M_s = Σ_j λ^(L−1−j) k_jᵀ v_j.
//   (b) Scan, per (row, head) over its segments, one thread per state
//       element: E_0 = state_in, E_{s+1} = λ^L E_s + M_s; E_s overwrites M_s,
//       state_out = the last E.
//   (c) Output: per segment from S = E_s, per chunk of n tokens
//       O = [(Q Kᵀ) ⊙ D] V + diag(λ^(i+1)) Q S,  D[i,j] = λ^(i−j) (j ≤ i)
//       S ← λ^n S + (diag(λ^(n−1−j)) K)ᵀ V.
// Backward, with dS the gradient of the state leaving a chunk:
//   dQ = [(dO Vᵀ) ⊙ D] K + diag(λ^(i+1)) dO S_entryᵀ: the forward itself on
//        (dO, V, K) from state_inᵀ (its running state is Σ λ v_jᵀ k_j = Sᵀ).
//   (a') State in query mode: N_s = Σ_{i in s} λ^(i+1) q_iᵀ do_i (i local).
//   (b') Reverse scan: G_last = d_state_out, G_{s−1} = λ^L G_s + N_s; G_s
//        overwrites N_s (segment s's exit gradient), d_state_in = λ^L G_0 + N_0.
//   (c') DkDv: per segment, chunks last to first, from dS = G_s:
//        dV = [(Q Kᵀ) ⊙ D]ᵀ dO + diag(λ^(n−1−j)) K dS
//        dK = [(dO Vᵀ) ⊙ D]ᵀ Q + diag(λ^(n−1−j)) V dSᵀ
//        dS ← λ^n dS + (diag(λ^(i+1)) Q)ᵀ dO.
// Powers of λ are pow in double rounded to f32, as the CPU's tables are.
// Gradient rule: o, dq, dk, dv, state_out, d_state_in are written.
//
// 256 threads, thread (ty, tx) = (tid / 16, tid % 16): of a 64 × 64 score
// tile it owns rows ty + 16a, columns tx + 16b; of a 64 × D output tile rows
// ty + 16a, columns tx + 16c; of a D × D state rows ty + 16p, columns
// tx + 16q. Tiles are padded to D + 1 floats a row so that the 16 rows a
// warp reads at once sit in 16 banks.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/cuda/f32_tiles.cuh"
#include "ops/cuda/lightning_rows.h"
#include "ops/lightning_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

constexpr char kOp[] = "[lightning_attention_f32]";  // starts the row checks' messages

constexpr int kChunk = 64;
constexpr int kSegment = 1024;
constexpr int kThreads = 256;
constexpr int kScoreLd = kChunk + 1;

struct Segment {
  int row, begin, length, pad;
};

__device__ __forceinline__ float Pow(float lambda, int n) {
  return static_cast<float>(pow(static_cast<double>(lambda), static_cast<double>(n)));
}

// n rows of one head of a [T, H, D] tensor from token `first` into a padded
// tile; rows ≥ n are zero.
template <int D>
__device__ void LoadTile(float* tile, const float* x, int heads, int head, int64_t first, int n) {
  for (int e = threadIdx.x; e < kChunk * D; e += kThreads) {
    const int r = e / D, c = e % D;
    tile[r * (D + 1) + c] = r < n ? x[((first + r) * heads + head) * D + c] : 0.f;
  }
}

// score[i][j] = (x_i · y_j) λ^(i−j) for j ≤ i < n, else 0 (x, y padded tiles).
template <int D>
__device__ void MaskedScores(const float* x, const float* y, const float* pw, int n, float* score) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[4][4];
  RowDots<D>(x, y, ty, tx, acc);
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int i = ty + 16 * a, j = tx + 16 * b;
      score[i * kScoreLd + j] = (j <= i && i < n) ? acc[a][b] * pw[i - j] : 0.f;
    }
}

// ---- (a) segment states ----
// key mode:   M = Σ_j λ^(L−1−j) a_jᵀ b_j;  query mode: N = Σ_j λ^(j+1) a_jᵀ b_j.
// Tokens a step of the state kernel stages (2 × 32 × D floats: 32 KiB of
// static shared memory at D = 128, under the 48 KiB static limit).
constexpr int kStateRows = 32;

template <int D, bool kQueryMode>
__global__ void __launch_bounds__(kThreads) StateKernel(const float* a, const float* b, const float* decay,
                                                        const Segment* segments, int heads, float* states) {
  constexpr int kPer = D / 16;
  __shared__ float sa[kStateRows * D], sb[kStateRows * D], w[kStateRows];
  const Segment seg = segments[blockIdx.x];
  const int h = blockIdx.y, ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const float lambda = decay[h];
  float acc[kPer][kPer] = {};
  for (int c0 = 0; c0 < seg.length; c0 += kStateRows) {
    const int n = min(kStateRows, seg.length - c0);
    __syncthreads();
    if (threadIdx.x < kStateRows) {
      const int j = c0 + threadIdx.x;
      w[threadIdx.x] = static_cast<int>(threadIdx.x) < n ? Pow(lambda, kQueryMode ? j + 1 : seg.length - 1 - j) : 0.f;
    }
    for (int e = threadIdx.x; e < kStateRows * D; e += kThreads) {
      const int r = e / D, c = e % D;
      const int64_t at = ((static_cast<int64_t>(seg.begin) + c0 + r) * heads + h) * D + c;
      sa[e] = r < n ? a[at] : 0.f;
      sb[e] = r < n ? b[at] : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      float x[kPer], y[kPer];
#pragma unroll
      for (int p = 0; p < kPer; ++p) x[p] = sa[j * D + ty + 16 * p] * w[j];
#pragma unroll
      for (int q = 0; q < kPer; ++q) y[q] = sb[j * D + tx + 16 * q];
#pragma unroll
      for (int p = 0; p < kPer; ++p)
#pragma unroll
        for (int q = 0; q < kPer; ++q) acc[p][q] = fmaf(x[p], y[q], acc[p][q]);
    }
  }
  float* out = states + (static_cast<int64_t>(blockIdx.x) * heads + h) * D * D;
#pragma unroll
  for (int p = 0; p < kPer; ++p)
#pragma unroll
    for (int q = 0; q < kPer; ++q) out[(ty + 16 * p) * D + tx + 16 * q] = acc[p][q];
}

// ---- (b) scans over a row's segments, one thread per state element ----
// Forward: states[s] := E_s (entry), final = E after the last segment.
// Reverse: states[s] := G_s (exit gradient), final = the row's entry gradient.
__global__ void ScanKernel(float* states, const Segment* segments, const int* row_first, int heads, int d,
                           const float* decay, const float* init, bool init_transposed, bool reverse, float* final,
                           bool accumulate_final) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, row = blockIdx.z;
  if (e >= d * d) return;
  const float lambda = decay[h];
  const int64_t row_state = (static_cast<int64_t>(row) * heads + h) * d * d;
  const int x = e / d, y = e % d;
  float s = init ? init[row_state + (init_transposed ? y * d + x : e)] : 0.f;
  const int first = row_first[row], last = row_first[row + 1];
  for (int i = 0; i < last - first; ++i) {
    const int seg = reverse ? last - 1 - i : first + i;
    float* m = states + (static_cast<int64_t>(seg) * heads + h) * d * d + e;
    const float contribution = *m;
    *m = s;
    s = Pow(lambda, segments[seg].length) * s + contribution;
  }
  if (final) final[row_state + e] = accumulate_final ? final[row_state + e] + s : s;
}

// ---- (c) outputs from each segment's entry state ----
template <int D>
constexpr int OutputSmem() {
  return (D * (D + 1) + 3 * kChunk * (D + 1) + kChunk * kScoreLd + kChunk + 2) * 4;
}

template <int D>
__global__ void __launch_bounds__(kThreads) OutputKernel(const float* q, const float* k, const float* v,
                                                         const float* decay, const Segment* segments, int heads,
                                                         const float* states, float* o, bool accumulate) {
  constexpr int kLd = D + 1, kCols = D / 16;
  extern __shared__ float smem[];
  float* ss = smem;                  // S [D][D + 1]
  float* sq = ss + D * kLd;          // [64][D + 1]
  float* sk = sq + kChunk * kLd;
  float* sv = sk + kChunk * kLd;
  float* sa = sv + kChunk * kLd;     // masked scores [64][65]
  float* pw = sa + kChunk * kScoreLd;  // λ^0 .. λ^(C+1)
  const Segment seg = segments[blockIdx.x];
  const int h = blockIdx.y, ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const float lambda = decay[h];
  if (threadIdx.x < kChunk + 2) pw[threadIdx.x] = Pow(lambda, threadIdx.x);
  const float* entry = states + (static_cast<int64_t>(blockIdx.x) * heads + h) * D * D;
  for (int e = threadIdx.x; e < D * D; e += kThreads) ss[(e / D) * kLd + e % D] = entry[e];

  for (int c0 = 0; c0 < seg.length; c0 += kChunk) {
    const int n = min(kChunk, seg.length - c0);
    const int64_t first = static_cast<int64_t>(seg.begin) + c0;
    __syncthreads();  // the previous chunk's state update is done
    LoadTile<D>(sq, q, heads, h, first, n);
    LoadTile<D>(sk, k, heads, h, first, n);
    LoadTile<D>(sv, v, heads, h, first, n);
    __syncthreads();
    MaskedScores<D>(sq, sk, pw, n, sa);
    __syncthreads();
    // O = A V + diag(λ^(i+1)) Q S
    float intra[4][kCols] = {}, inter[4][kCols] = {};
    for (int j = 0; j < n; ++j) {
      float aa[4], vc[kCols];
#pragma unroll
      for (int a = 0; a < 4; ++a) aa[a] = sa[(ty + 16 * a) * kScoreLd + j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) vc[c] = sv[j * kLd + tx + 16 * c];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < kCols; ++c) intra[a][c] = fmaf(aa[a], vc[c], intra[a][c]);
    }
#pragma unroll 4
    for (int x = 0; x < D; ++x) {
      float qa[4], sc[kCols];
#pragma unroll
      for (int a = 0; a < 4; ++a) qa[a] = sq[(ty + 16 * a) * kLd + x];
#pragma unroll
      for (int c = 0; c < kCols; ++c) sc[c] = ss[x * kLd + tx + 16 * c];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < kCols; ++c) inter[a][c] = fmaf(qa[a], sc[c], inter[a][c]);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int i = ty + 16 * a;
      if (i >= n) continue;
      float* out = o + ((first + i) * heads + h) * D;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float value = intra[a][c] + pw[i + 1] * inter[a][c];
        out[tx + 16 * c] = accumulate ? out[tx + 16 * c] + value : value;
      }
    }
    __syncthreads();  // S is read above; each thread updates its own elements below
    // S ← λ^n S + Σ_j λ^(n−1−j) k_jᵀ v_j
    for (int p = 0; p < kCols; ++p)
      for (int qq = 0; qq < kCols; ++qq) {
        const int x = ty + 16 * p, y = tx + 16 * qq;
        float acc = 0.f;
        for (int j = 0; j < n; ++j) acc = fmaf(sk[j * kLd + x] * pw[n - 1 - j], sv[j * kLd + y], acc);
        ss[x * kLd + y] = pw[n] * ss[x * kLd + y] + acc;
      }
  }
}

// ---- (c') dK, dV from each segment's exit gradient ----
template <int D>
constexpr int DkDvSmem() {
  return (D * (D + 1) + 4 * kChunk * (D + 1) + kChunk * kScoreLd + kChunk + 2) * 4;
}

template <int D>
__global__ void __launch_bounds__(kThreads) DkDvKernel(const float* q, const float* k, const float* v,
                                                       const float* d_o, const float* decay,
                                                       const Segment* segments, int heads, const float* states,
                                                       float* dk, float* dv, bool intra, bool accumulate) {
  constexpr int kLd = D + 1, kCols = D / 16;
  extern __shared__ float smem[];
  float* sg = smem;                  // dS [D][D + 1]
  float* sq = sg + D * kLd;
  float* sk = sq + kChunk * kLd;
  float* sv = sk + kChunk * kLd;
  float* sdo = sv + kChunk * kLd;
  float* sa = sdo + kChunk * kLd;    // masked scores [64][65]
  float* pw = sa + kChunk * kScoreLd;
  const Segment seg = segments[blockIdx.x];
  const int h = blockIdx.y, ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const float lambda = decay[h];
  if (threadIdx.x < kChunk + 2) pw[threadIdx.x] = Pow(lambda, threadIdx.x);
  const float* exit = states + (static_cast<int64_t>(blockIdx.x) * heads + h) * D * D;
  for (int e = threadIdx.x; e < D * D; e += kThreads) sg[(e / D) * kLd + e % D] = exit[e];

  const int chunks = (seg.length + kChunk - 1) / kChunk;
  for (int c = chunks - 1; c >= 0; --c) {
    const int c0 = c * kChunk, n = min(kChunk, seg.length - c0);
    const int64_t first = static_cast<int64_t>(seg.begin) + c0;
    __syncthreads();
    if (intra) LoadTile<D>(sq, q, heads, h, first, n);
    LoadTile<D>(sk, k, heads, h, first, n);
    LoadTile<D>(sv, v, heads, h, first, n);
    if (intra) LoadTile<D>(sdo, d_o, heads, h, first, n);
    __syncthreads();
    // Rows j of this thread: ty + 16a; columns tx + 16cc.
    float acc[4][kCols] = {};
    // dV = Aᵀ dO + diag(λ^(n−1−j)) K dS,  A = (Q Kᵀ) ⊙ D (no A without intra)
    if (intra) MaskedScores<D>(sq, sk, pw, n, sa);
    __syncthreads();
    for (int i = 0; intra && i < n; ++i) {
      float aa[4], dc[kCols];
#pragma unroll
      for (int a = 0; a < 4; ++a) aa[a] = sa[i * kScoreLd + ty + 16 * a];
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) dc[cc] = sdo[i * kLd + tx + 16 * cc];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) acc[a][cc] = fmaf(aa[a], dc[cc], acc[a][cc]);
    }
    {
      float st[4][kCols] = {};
#pragma unroll 4
      for (int y = 0; y < D; ++y) {
        float ka[4], gc[kCols];
#pragma unroll
        for (int a = 0; a < 4; ++a) ka[a] = sk[(ty + 16 * a) * kLd + y];
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) gc[cc] = sg[y * kLd + tx + 16 * cc];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int cc = 0; cc < kCols; ++cc) st[a][cc] = fmaf(ka[a], gc[cc], st[a][cc]);
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int j = ty + 16 * a;
        if (j >= n) continue;
        float* out = dv + ((first + j) * heads + h) * D;
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) {
          const float value = acc[a][cc] + pw[n - 1 - j] * st[a][cc];
          out[tx + 16 * cc] = accumulate ? out[tx + 16 * cc] + value : value;
        }
      }
    }
    __syncthreads();  // sa is rewritten below
    // dK = Bᵀ Q + diag(λ^(n−1−j)) V dSᵀ,  B = (dO Vᵀ) ⊙ D
    if (intra) MaskedScores<D>(sdo, sv, pw, n, sa);
    __syncthreads();
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) acc[a][cc] = 0.f;
    for (int i = 0; intra && i < n; ++i) {
      float ba[4], qc[kCols];
#pragma unroll
      for (int a = 0; a < 4; ++a) ba[a] = sa[i * kScoreLd + ty + 16 * a];
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) qc[cc] = sq[i * kLd + tx + 16 * cc];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) acc[a][cc] = fmaf(ba[a], qc[cc], acc[a][cc]);
    }
    {
      float st[4][kCols] = {};
#pragma unroll 4
      for (int y = 0; y < D; ++y) {
        float va[4], gc[kCols];
#pragma unroll
        for (int a = 0; a < 4; ++a) va[a] = sv[(ty + 16 * a) * kLd + y];
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) gc[cc] = sg[(tx + 16 * cc) * kLd + y];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int cc = 0; cc < kCols; ++cc) st[a][cc] = fmaf(va[a], gc[cc], st[a][cc]);
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int j = ty + 16 * a;
        if (j >= n) continue;
        float* out = dk + ((first + j) * heads + h) * D;
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) {
          const float value = acc[a][cc] + pw[n - 1 - j] * st[a][cc];
          out[tx + 16 * cc] = accumulate ? out[tx + 16 * cc] + value : value;
        }
      }
    }
    __syncthreads();  // dS is read above; each thread updates its own elements below
    // dS ← λ^n dS + Σ_i λ^(i+1) q_iᵀ do_i
    for (int p = 0; p < kCols; ++p)
      for (int qq = 0; qq < kCols; ++qq) {
        const int x = ty + 16 * p, y = tx + 16 * qq;
        float g = 0.f;
        for (int i = 0; intra && i < n; ++i) g = fmaf(sq[i * kLd + x] * pw[i + 1], sdo[i * kLd + y], g);
        sg[x * kLd + y] = pw[n] * sg[x * kLd + y] + g;
      }
  }
}

// ---- the inter-chunk phase: o_i += λ^(i+1) q_i S (S, or Sᵀ if transposed) ----
template <int D>
constexpr int InterSmem() {
  return (D * (D + 1) + kChunk * (D + 1) + kChunk) * 4;
}

template <int D>
__global__ void __launch_bounds__(kThreads) InterKernel(const float* q, const float* decay, int tokens, int heads,
                                                        const float* s, bool transposed, float* o) {
  constexpr int kLd = D + 1, kCols = D / 16;
  extern __shared__ float smem[];
  float* ss = smem;
  float* sq = ss + D * kLd;
  float* w = sq + kChunk * kLd;
  const int h = blockIdx.y, ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int n = min(kChunk, tokens - static_cast<int>(first));
  const float* state = s + static_cast<int64_t>(h) * D * D;
  for (int e = threadIdx.x; e < D * D; e += kThreads) {
    const int x = e / D, y = e % D;
    ss[x * kLd + y] = transposed ? state[y * D + x] : state[e];
  }
  if (threadIdx.x < kChunk) w[threadIdx.x] = Pow(decay[h], static_cast<int>(first) + threadIdx.x + 1);
  LoadTile<D>(sq, q, heads, h, first, n);
  __syncthreads();
  float acc[4][kCols] = {};
#pragma unroll 4
  for (int x = 0; x < D; ++x) {
    float qa[4], sc[kCols];
#pragma unroll
    for (int a = 0; a < 4; ++a) qa[a] = sq[(ty + 16 * a) * kLd + x];
#pragma unroll
    for (int c = 0; c < kCols; ++c) sc[c] = ss[x * kLd + tx + 16 * c];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[a][c] = fmaf(qa[a], sc[c], acc[a][c]);
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = ty + 16 * a;
    if (i >= n) continue;
    float* out = o + ((first + i) * heads + h) * D;
#pragma unroll
    for (int c = 0; c < kCols; ++c) out[tx + 16 * c] += w[i] * acc[a][c];
  }
}

// ------------------------------------------------------------------ host side

struct Dims {
  int64_t t, h, d;
  int device;
};

void CheckCuda(const Tensor& t, const Shape& shape, int device, const char* name) {
  LOOM_CHECK(t.defined() && !t.device().is_cpu() && t.device().index == device && t.dtype() == DType::kF32 &&
                 t.shape() == shape,
             "[lightning_attention_f32] ", name, " must be f32 ", ShapeString(shape), " on cuda:", device, ", got ",
             t.defined() ? DTypeName(t.dtype()) : "undefined", " ", ShapeString(t.shape()), " on ",
             t.device().ToString());
}

// q (or the chunk phase's first operand) and decay.
Dims CheckTokens(const Tensor& q, const Tensor& decay, const char* name) {
  LOOM_CHECK(q.defined() && !q.device().is_cpu() && q.ndim() == 3 && q.dtype() == DType::kF32,
             "[lightning_attention_f32] ", name, " must be f32 [T, H, D] on a CUDA device, got ",
             q.defined() ? DTypeName(q.dtype()) : "undefined", " ", ShapeString(q.shape()));
  const Dims d{q.dim(0), q.dim(1), q.dim(2), q.device().index};
  LOOM_CHECK(d.d == 16 || d.d == 32 || d.d == 64 || d.d == 128, "[lightning_attention_f32] head dim ", d.d,
             " not compiled: 16, 32, 64 or 128 (Dk = Dv)");
  LOOM_CHECK(d.t < (int64_t{1} << 31), "[lightning_attention_f32] token count must fit i32");
  CheckCuda(decay, {d.h}, d.device, "decay");
  LOOM_CUDA_CHECK(cudaSetDevice(d.device));
  return d;
}

// The segment plan and the per-segment states, on the device for one call
// (stream-ordered memory, freed by ~Scratch after the launches are queued).
struct Scratch {
  int64_t segments = 0, rows = 0;
  size_t plan_bytes = 0, state_bytes = 0;
  void* base = nullptr;
  cudaStream_t stream = nullptr;
  const Segment* segs() const { return static_cast<const Segment*>(base); }
  const int* row_first() const { return reinterpret_cast<const int*>(segs() + segments); }
  float* states() const { return reinterpret_cast<float*>(static_cast<char*>(base) + plan_bytes); }
  Scratch(const std::vector<int32_t>& cu, const Dims& d, cudaStream_t s) : stream(s) {
    rows = static_cast<int64_t>(cu.size()) - 1;
    std::vector<Segment> plan;
    std::vector<int> first;
    for (int64_t r = 0; r < rows; ++r) {
      first.push_back(static_cast<int>(plan.size()));
      for (int32_t t = cu[r]; t < cu[r + 1]; t += kSegment)
        plan.push_back({static_cast<int>(r), t, std::min(kSegment, cu[r + 1] - t), 0});
    }
    first.push_back(static_cast<int>(plan.size()));
    segments = static_cast<int64_t>(plan.size());
    plan_bytes = (segments * sizeof(Segment) + (rows + 1) * sizeof(int) + 255) / 256 * 256;
    state_bytes = static_cast<size_t>(segments) * d.h * d.d * d.d * sizeof(float);
    base = CudaAllocAsync(plan_bytes + state_bytes, stream);
    std::vector<char> host(plan_bytes, 0);
    std::memcpy(host.data(), plan.data(), plan.size() * sizeof(Segment));
    std::memcpy(host.data() + plan.size() * sizeof(Segment), first.data(), first.size() * sizeof(int));
    // Pageable source: staged before this returns, so `host` may go.
    LOOM_CUDA_CHECK(cudaMemcpyAsync(base, host.data(), plan_bytes, cudaMemcpyHostToDevice, stream));
  }
  ~Scratch() { cudaFreeAsync(base, stream); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

template <typename Fn>
void DispatchHeadDim(int64_t d, Fn&& fn) {
  switch (d) {
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    default: LOOM_CHECK(false, "[lightning_attention_f32] no kernel for head dim ", d);
  }
}

const float* F32(const Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }
float* F32Mut(Tensor& t) { return t.defined() ? t.data<float>() : nullptr; }

template <typename Kernel>
void Allow(Kernel kernel, int smem) {
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
}

void LaunchScan(const Scratch& sc, const Dims& d, const float* decay, const float* init, bool init_transposed,
                bool reverse, float* final, bool accumulate_final, cudaStream_t stream) {
  if (sc.rows == 0 || d.h == 0) return;
  const int dd = static_cast<int>(d.d);
  ScanKernel<<<dim3((dd * dd + 255) / 256, static_cast<unsigned>(d.h), static_cast<unsigned>(sc.rows)), 256, 0,
               stream>>>(sc.states(), sc.segs(), sc.row_first(), static_cast<int>(d.h), dd, decay, init,
                         init_transposed, reverse, final, accumulate_final);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// o (written or added) = lightning attention of (q, k, v) from `init`
// (transposed if asked); `final` (optional) = the state after each row.
void ForwardPipeline(const float* q, const float* k, const float* v, const float* decay, const Dims& d,
                     const Scratch& sc, const float* init, bool init_transposed, float* final, float* o,
                     bool accumulate, cudaStream_t stream) {
  if (sc.rows == 0 || d.h == 0) return;
  const int heads = static_cast<int>(d.h);
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const dim3 grid(static_cast<unsigned>(sc.segments), heads);
    if (sc.segments > 0) {
      StateKernel<D, false><<<grid, kThreads, 0, stream>>>(k, v, decay, sc.segs(), heads, sc.states());
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
    LaunchScan(sc, d, decay, init, init_transposed, false, final, false, stream);
    if (sc.segments > 0 && o) {
      Allow(OutputKernel<D>, OutputSmem<D>());
      OutputKernel<D><<<grid, kThreads, OutputSmem<D>(), stream>>>(q, k, v, decay, sc.segs(), heads, sc.states(), o,
                                                                   accumulate);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
  });
}

// dk, dv (written or added) from the exit gradients: per-segment sums of
// (q, do) (intra) or none (the state-only path), the reverse scan from
// d_state_out (optional), d_state_in (optional) = the rows' entry gradient.
void DkDvPipeline(const float* q, const float* k, const float* v, const float* d_o, const float* decay,
                  const Dims& d, const Scratch& sc, const float* d_state_out, float* d_state_in,
                  bool accumulate_d_state_in, float* dk, float* dv, bool accumulate, bool intra,
                  cudaStream_t stream) {
  if (sc.rows == 0 || d.h == 0) return;
  const int heads = static_cast<int>(d.h);
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const dim3 grid(static_cast<unsigned>(sc.segments), heads);
    if (sc.segments > 0) {
      if (intra) {
        StateKernel<D, true><<<grid, kThreads, 0, stream>>>(q, d_o, decay, sc.segs(), heads, sc.states());
        LOOM_CUDA_CHECK(cudaGetLastError());
      } else {
        LOOM_CUDA_CHECK(cudaMemsetAsync(sc.states(), 0, sc.state_bytes, stream));
      }
    }
    LaunchScan(sc, d, decay, d_state_out, false, true, d_state_in, accumulate_d_state_in, stream);
    if (sc.segments > 0 && dk) {
      Allow(DkDvKernel<D>, DkDvSmem<D>());
      DkDvKernel<D><<<grid, kThreads, DkDvSmem<D>(), stream>>>(q, k, v, d_o, decay, sc.segs(), heads, sc.states(),
                                                              dk, dv, intra, accumulate);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
  });
}

void LaunchInter(const float* q, const float* decay, const Dims& d, const float* s, bool transposed, float* o,
                 cudaStream_t stream) {
  if (d.t == 0 || d.h == 0) return;
  DispatchHeadDim(d.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    Allow(InterKernel<D>, InterSmem<D>());
    const dim3 grid(static_cast<unsigned>((d.t + kChunk - 1) / kChunk), static_cast<unsigned>(d.h));
    InterKernel<D><<<grid, kThreads, InterSmem<D>(), stream>>>(q, decay, static_cast<int>(d.t),
                                                               static_cast<int>(d.h), s, transposed, o);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace

// ---- Fused calls ----

void LightningAttentionF32Forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                  const TokenRows& rows, const Tensor& state_in, Tensor& o, Tensor& state_out,
                                  CudaStream stream) {
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(k, q.shape(), d.device, "k");
  CheckCuda(v, q.shape(), d.device, "v");
  CheckCuda(o, q.shape(), d.device, "o");
  CheckRowsHost(rows, d.t, kOp);
  const Shape state_shape{rows.rows(), d.h, d.d, d.d};
  if (state_in.defined()) CheckCuda(state_in, state_shape, d.device, "state_in");
  if (state_out.defined()) CheckCuda(state_out, state_shape, d.device, "state_out");
  auto s = static_cast<cudaStream_t>(stream);
  const Scratch sc(HostCu(rows), d, s);
  ForwardPipeline(q.data<float>(), k.data<float>(), v.data<float>(), decay.data<float>(), d, sc, F32(state_in),
                  false, F32Mut(state_out), o.data<float>(), false, s);
}

void LightningAttentionF32Backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                   const TokenRows& rows, const Tensor& state_in, const Tensor& d_o,
                                   const Tensor& d_state_out, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& d_state_in,
                                   CudaStream stream) {
  const Dims d = CheckTokens(q, decay, "q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&d_o, "d_o"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}})
    CheckCuda(*t, q.shape(), d.device, name);
  CheckRowsHost(rows, d.t, kOp);
  const Shape state_shape{rows.rows(), d.h, d.d, d.d};
  if (state_in.defined()) CheckCuda(state_in, state_shape, d.device, "state_in");
  if (d_state_out.defined()) CheckCuda(d_state_out, state_shape, d.device, "d_state_out");
  if (d_state_in.defined()) CheckCuda(d_state_in, state_shape, d.device, "d_state_in");
  auto s = static_cast<cudaStream_t>(stream);
  const Scratch sc(HostCu(rows), d, s);
  // dQ: the forward of (dO, V, K) from state_inᵀ.
  ForwardPipeline(d_o.data<float>(), v.data<float>(), k.data<float>(), decay.data<float>(), d, sc, F32(state_in),
                  true, nullptr, dq.data<float>(), false, s);
  DkDvPipeline(q.data<float>(), k.data<float>(), v.data<float>(), d_o.data<float>(), decay.data<float>(), d, sc,
               F32(d_state_out), F32Mut(d_state_in), false, dk.data<float>(), dv.data<float>(), false, true, s);
}

// ---- Phases on one chunk (one row of C tokens) ----

bool LightningF32ChunkState(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids, Tensor& m,
                            CudaStream stream) {
  const Dims d = CheckTokens(k, decay, "k");
  CheckCuda(v, k.shape(), d.device, "v");
  CheckCuda(m, {d.h, d.d, d.d}, d.device, "m");
  CheckNoChunkDocs(doc_ids, kOp);
  auto s = static_cast<cudaStream_t>(stream);
  const Scratch sc({0, static_cast<int32_t>(d.t)}, d, s);
  ForwardPipeline(nullptr, k.data<float>(), v.data<float>(), decay.data<float>(), d, sc, nullptr, false,
                  m.data<float>(), nullptr, false, s);
  return false;  // no documents, so no boundary
}

void LightningF32ChunkStateBackward(const Tensor& k, const Tensor& v, const Tensor& decay, const Tensor& doc_ids,
                                    const Tensor& dm, Tensor& dk, Tensor& dv, CudaStream stream) {
  const Dims d = CheckTokens(k, decay, "k");
  for (auto [t, name] : {std::pair{&v, "v"}, {&dk, "dk"}, {&dv, "dv"}}) CheckCuda(*t, k.shape(), d.device, name);
  CheckCuda(dm, {d.h, d.d, d.d}, d.device, "dm");
  CheckNoChunkDocs(doc_ids, kOp);
  auto s = static_cast<cudaStream_t>(stream);
  const Scratch sc({0, static_cast<int32_t>(d.t)}, d, s);
  DkDvPipeline(nullptr, k.data<float>(), v.data<float>(), nullptr, decay.data<float>(), d, sc, dm.data<float>(),
               nullptr, false, dk.data<float>(), dv.data<float>(), true, false, s);
}

void LightningF32IntraChunk(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                            const Tensor& doc_ids, Tensor& o, CudaStream stream) {
  const Dims d = CheckTokens(q, decay, "q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&o, "o"}}) CheckCuda(*t, q.shape(), d.device, name);
  CheckNoChunkDocs(doc_ids, kOp);
  auto s = static_cast<cudaStream_t>(stream);
  const Scratch sc({0, static_cast<int32_t>(d.t)}, d, s);
  ForwardPipeline(q.data<float>(), k.data<float>(), v.data<float>(), decay.data<float>(), d, sc, nullptr, false,
                  nullptr, o.data<float>(), false, s);
}

void LightningF32IntraChunkBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay,
                                    const Tensor& doc_ids, const Tensor& d_o, Tensor& dq, Tensor& dk, Tensor& dv,
                                    CudaStream stream) {
  const Dims d = CheckTokens(q, decay, "q");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&d_o, "d_o"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}})
    CheckCuda(*t, q.shape(), d.device, name);
  CheckNoChunkDocs(doc_ids, kOp);
  auto s = static_cast<cudaStream_t>(stream);
  const Scratch sc({0, static_cast<int32_t>(d.t)}, d, s);
  ForwardPipeline(d_o.data<float>(), v.data<float>(), k.data<float>(), decay.data<float>(), d, sc, nullptr, false,
                  nullptr, dq.data<float>(), true, s);
  DkDvPipeline(q.data<float>(), k.data<float>(), v.data<float>(), d_o.data<float>(), decay.data<float>(), d, sc,
               nullptr, nullptr, false, dk.data<float>(), dv.data<float>(), true, true, s);
}

void LightningF32InterChunk(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s_in,
                            Tensor& o, CudaStream stream) {
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(s_in, {d.h, d.d, d.d}, d.device, "s");
  CheckCuda(o, q.shape(), d.device, "o");
  CheckNoChunkDocs(doc_ids, kOp);
  LaunchInter(q.data<float>(), decay.data<float>(), d, s_in.data<float>(), false, o.data<float>(),
              static_cast<cudaStream_t>(stream));
}

void LightningF32InterChunkBackward(const Tensor& q, const Tensor& decay, const Tensor& doc_ids, const Tensor& s_in,
                                    const Tensor& d_o, Tensor& dq, Tensor& ds, CudaStream stream) {
  const Dims d = CheckTokens(q, decay, "q");
  CheckCuda(s_in, {d.h, d.d, d.d}, d.device, "s");
  CheckCuda(ds, {d.h, d.d, d.d}, d.device, "ds");
  CheckCuda(d_o, q.shape(), d.device, "d_o");
  CheckCuda(dq, q.shape(), d.device, "dq");
  CheckNoChunkDocs(doc_ids, kOp);
  auto s = static_cast<cudaStream_t>(stream);
  // dq_i += λ^(i+1) do_i Sᵀ
  LaunchInter(d_o.data<float>(), decay.data<float>(), d, s_in.data<float>(), true, dq.data<float>(), s);
  // dS += Σ_i λ^(i+1) q_iᵀ do_i: per-segment sums folded by the reverse scan.
  const Scratch sc({0, static_cast<int32_t>(d.t)}, d, s);
  DkDvPipeline(q.data<float>(), nullptr, nullptr, d_o.data<float>(), decay.data<float>(), d, sc, nullptr,
               ds.data<float>(), true, nullptr, nullptr, false, true, s);
}

}  // namespace loom::ops::cuda
