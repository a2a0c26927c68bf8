// f32 softmax / sigmoid attention on CUDA: the kernels of fp32 GPU runs,
// which must match the CPU (and a PyTorch oracle) to about 1e-5, so every
// product is an f32 FMA on CUDA cores (no tensor cores: TF32 keeps 10 bits).
// The math is ops/softmax_attention.h's; shapes:
//   q, o, d_o, dq [Tq, Hq, D] f32    k, v, dk, dv [Tk, Hk, D] f32
//   lse [Tq, Hq] f32 (natural log)   query head h reads KV head h / (Hq/Hk)
//
// Tiles of 64 queries × 64 keys in shared memory (rows padded to D + 1
// floats so the 16 rows a warp reads at once sit in 16 banks), 256 threads:
// thread (ty, tx) = (tid / 16, tid % 16) owns score rows ty + 16a and
// columns tx + 16b (a, b < 4), and output rows ty + 16a, columns tx + 16c.
// A row's 16 owners are 16 lanes of one warp, so row reductions are shuffles.
//
// Forward, one block = 64 queries of one row and one query head, walking the
// key tiles that causality and documents leave (FA2's online softmax):
//   S = scale·Q Kᵀ (−∞ where masked), m' = max(m, rowmax S),
//   P = exp(S − m'), l' = e^(m − m') l + rowsum P, O' = e^(m − m') O + P V;
//   at the end O /= l, lse = m + log l (−∞, O = 0 for a query with no key).
//   Sigmoid: P = σ(S + b) on visible entries, O = Σ P V, lse untouched.
// Backward (deterministic: each block owns what it writes, no atomics):
//   1. Δ_i = Σ_d dO_id O_id per (token, head).
//   2. KV pass: a block = 64 keys of one KV head, walking every query tile of
//      every query head of its GQA group that sees them; transposed tiles
//        Pᵀ = exp(Sᵀ − lse), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − Δ)
//        (sigmoid: Pᵀ = σ(Sᵀ + b), dSᵀ = Pᵀ ⊙ (1 − Pᵀ) ⊙ dPᵀ)
//        dV += Pᵀ dO, dK += scale · dSᵀ Q.
//   3. Q pass: a block = 64 queries of one head, walking its key tiles:
//        dQ += scale · dS K.
// Gradient rule: dq, dk, dv are written (keys no query sees get 0; tokens
// outside every row get 0).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/f32_tiles.cuh"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kScoreLd = kTile + 1;

struct Params {
  const float *q, *k, *v, *o, *d_o, *lse_in, *delta;
  const int32_t *cu_q, *cu_k, *doc_q, *doc_k;
  float *out, *lse, *dq, *dk, *dv;
  int64_t hq, hk, group;
  float scale, bias;
  bool causal, sigmoid;
  int shift;  // k_offset − q_offset: query i sees key j iff i − shift ≥ j
};

// Floats of shared memory: four D-wide tiles, two score tiles, doc ids.
template <int D>
constexpr int SmemBytes() {
  return (4 * kTile * (D + 1) + 2 * kTile * kScoreLd) * 4 + 2 * kTile * 4;
}

// rows [0, n) of one head of a [T, H, D] tensor, from token `first`, into a
// padded tile; rows ≥ n are zero.
template <int D>
__device__ void LoadTile(float* tile, const float* x, int64_t heads, int64_t head, int64_t first, int n) {
  for (int e = threadIdx.x; e < kTile * D; e += kThreads) {
    const int r = e / D, c = e % D;
    tile[r * (D + 1) + c] = r < n ? x[((first + r) * heads + head) * D + c] : 0.f;
  }
}

__device__ void LoadDocs(int* dst, const int32_t* doc, int64_t first, int n) {
  if (threadIdx.x < kTile) dst[threadIdx.x] = doc && static_cast<int>(threadIdx.x) < n ? doc[first + threadIdx.x] : 0;
}

// Whether the document ranges of two tiles (ids non-decreasing) overlap.
__device__ bool DocsOverlap(const int32_t* doc_q, int64_t q0, int nq, const int32_t* doc_k, int64_t k0, int nk) {
  if (!doc_q) return true;
  return !(doc_k[k0 + nk - 1] < doc_q[q0] || doc_k[k0] > doc_q[q0 + nq - 1]);
}

__device__ __forceinline__ float RowMax16(float x) {
  for (int s = 8; s >= 1; s >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, s));
  return x;
}
__device__ __forceinline__ float RowSum16(float x) {
  for (int s = 8; s >= 1; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
  return x;
}

// σ(z) with the exp argument −|z| (never overflows), as the CPU computes it.
__device__ __forceinline__ float Sigmoid(float z) {
  const float t = expf(-fabsf(z));
  return (z >= 0 ? 1.f : t) / (1.f + t);
}

// acc[a][c] += Σ_j s[(ty + 16a)][j] · y[j][tx + 16c], s a score tile, y a
// padded D-wide tile, j < n.
template <int D>
__device__ __forceinline__ void AccumulateProduct(const float* s, const float* y, int n, int ty, int tx,
                                                  float (&acc)[4][D / 16]) {
  for (int j = 0; j < n; ++j) {
    float sa[4], yc[D / 16];
#pragma unroll
    for (int a = 0; a < 4; ++a) sa[a] = s[(ty + 16 * a) * kScoreLd + j];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) yc[c] = y[j * (D + 1) + tx + 16 * c];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < D / 16; ++c) acc[a][c] = fmaf(sa[a], yc[c], acc[a][c]);
  }
}

// ---------------------------------------------------------------- forward
template <int D>
__global__ void __launch_bounds__(kThreads) ForwardKernel(Params p) {
  constexpr int kLd = D + 1, kCols = D / 16;
  extern __shared__ float smem[];
  float* sq = smem;
  float* sk = sq + kTile * kLd;
  float* sv = sk + kTile * kLd;
  float* sp = sv + 2 * kTile * kLd;  // (the fourth D tile is unused here)
  int* sdq = reinterpret_cast<int*>(sp + 2 * kTile * kScoreLd);
  int* sdk = sdq + kTile;

  const int row = blockIdx.z, h = blockIdx.y;
  const int64_t g = h / p.group;
  const int64_t qb = p.cu_q[row], kb = p.cu_k[row];
  const int nq = p.cu_q[row + 1] - static_cast<int>(qb), nk = p.cu_k[row + 1] - static_cast<int>(kb);
  const int i0 = blockIdx.x * kTile;
  if (i0 >= nq) return;
  const int mq = min(kTile, nq - i0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  LoadTile<D>(sq, p.q, p.hq, h, qb + i0, mq);
  LoadDocs(sdq, p.doc_q, qb + i0, mq);
  const int hi = p.causal ? max(0, min(nk, i0 + mq - p.shift)) : nk;

  float m[4], l[4], acc[4][kCols];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[a][c] = 0.f;
  }

  for (int j0 = 0; j0 < hi; j0 += kTile) {
    const int nkt = min(kTile, nk - j0);
    if (!DocsOverlap(p.doc_q, qb + i0, mq, p.doc_k, kb + j0, nkt)) continue;
    __syncthreads();  // the previous tile's readers are done
    LoadTile<D>(sk, p.k, p.hk, g, kb + j0, nkt);
    LoadTile<D>(sv, p.v, p.hk, g, kb + j0, nkt);
    LoadDocs(sdk, p.doc_k, kb + j0, nkt);
    __syncthreads();
    float s[4][4];
    RowDots<D>(sq, sk, ty, tx, s);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int i = ty + 16 * a;
      float pr[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int j = tx + 16 * b;
        const bool visible = i < mq && j < nkt && (!p.causal || i0 + i - p.shift >= j0 + j) &&
                             (!p.doc_q || sdq[i] == sdk[j]);
        s[a][b] = visible ? s[a][b] * p.scale : -INFINITY;
      }
      if (p.sigmoid) {
#pragma unroll
        for (int b = 0; b < 4; ++b) pr[b] = s[a][b] == -INFINITY ? 0.f : Sigmoid(s[a][b] + p.bias);
      } else {
        const float mx = RowMax16(fmaxf(fmaxf(s[a][0], s[a][1]), fmaxf(s[a][2], s[a][3])));
        const float mn = fmaxf(m[a], mx);
        // Nothing visible yet: P = 0 and the (zero) running sums stay.
        const float corr = mn == -INFINITY ? 1.f : expf(m[a] - mn);
        float sum = 0.f;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          pr[b] = s[a][b] == -INFINITY ? 0.f : expf(s[a][b] - mn);
          sum += pr[b];
        }
        l[a] = l[a] * corr + RowSum16(sum);
        m[a] = mn;
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[a][c] *= corr;
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) sp[i * kScoreLd + tx + 16 * b] = pr[b];
    }
    __syncthreads();
    AccumulateProduct<D>(sp, sv, nkt, ty, tx, acc);
  }

#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = ty + 16 * a;
    if (i >= mq) continue;
    const int64_t th = (qb + i0 + i) * p.hq + h;
    const float inv = p.sigmoid ? 1.f : (l[a] > 0 ? 1.f / l[a] : 0.f);
#pragma unroll
    for (int c = 0; c < kCols; ++c) p.out[th * D + tx + 16 * c] = acc[a][c] * inv;
    if (!p.sigmoid && tx == 0) p.lse[th] = l[a] > 0 ? m[a] + logf(l[a]) : -INFINITY;
  }
}

// ---------------------------------------------------------------- backward
// Δ per (token, head): one warp each.
template <int D>
__global__ void DeltaKernel(const float* o, const float* d_o, int64_t n, float* delta) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= n) return;
  float sum = 0.f;
  for (int c = lane; c < D; c += 32) sum = fmaf(o[w * D + c], d_o[w * D + c], sum);
  for (int s = 16; s >= 1; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
  if (lane == 0) delta[w] = sum;
}

template <int D>
__global__ void __launch_bounds__(kThreads) KeyValueGradKernel(Params p) {
  constexpr int kLd = D + 1, kCols = D / 16;
  extern __shared__ float smem[];
  float* sk = smem;
  float* sv = sk + kTile * kLd;
  float* sq = sv + kTile * kLd;
  float* sdo = sq + kTile * kLd;
  float* sp = sdo + kTile * kLd;      // Pᵀ [keys][queries]
  float* sds = sp + kTile * kScoreLd;  // dSᵀ
  int* sdq = reinterpret_cast<int*>(sds + kTile * kScoreLd);
  int* sdk = sdq + kTile;

  const int row = blockIdx.z, g = blockIdx.y;
  const int64_t qb = p.cu_q[row], kb = p.cu_k[row];
  const int nq = p.cu_q[row + 1] - static_cast<int>(qb), nk = p.cu_k[row + 1] - static_cast<int>(kb);
  const int j0 = blockIdx.x * kTile;
  if (j0 >= nk) return;
  const int nkt = min(kTile, nk - j0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  LoadTile<D>(sk, p.k, p.hk, g, kb + j0, nkt);
  LoadTile<D>(sv, p.v, p.hk, g, kb + j0, nkt);
  LoadDocs(sdk, p.doc_k, kb + j0, nkt);
  // Queries that see a key of the tile start at j0 + shift (causal).
  const int lo = p.causal ? max(0, min(nq, j0 + p.shift)) : 0;

  float dk[4][kCols], dv[4][kCols];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < kCols; ++c) dk[a][c] = dv[a][c] = 0.f;

  for (int64_t h = g * p.group; h < (g + 1) * p.group; ++h) {
    for (int i0 = lo; i0 < nq; i0 += kTile) {
      const int mq = min(kTile, nq - i0);
      if (!DocsOverlap(p.doc_q, qb + i0, mq, p.doc_k, kb + j0, nkt)) continue;
      __syncthreads();
      LoadTile<D>(sq, p.q, p.hq, h, qb + i0, mq);
      LoadTile<D>(sdo, p.d_o, p.hq, h, qb + i0, mq);
      LoadDocs(sdq, p.doc_q, qb + i0, mq);
      __syncthreads();
      float s[4][4], dp[4][4];
      RowDots<D>(sk, sq, ty, tx, s);
      RowDots<D>(sv, sdo, ty, tx, dp);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int i = tx + 16 * b;
        const int64_t th = (qb + i0 + i) * p.hq + h;
        const float lse = !p.sigmoid && i < mq ? p.lse_in[th] : 0.f;
        const float delta = !p.sigmoid && i < mq ? p.delta[th] : 0.f;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const int j = ty + 16 * a;
          const bool visible = i < mq && j < nkt && (!p.causal || i0 + i - p.shift >= j0 + j) &&
                               (!p.doc_q || sdq[i] == sdk[j]);
          float pr = 0.f, ds = 0.f;
          if (visible) {
            const float z = s[a][b] * p.scale;
            if (p.sigmoid) {
              pr = Sigmoid(z + p.bias);
              ds = pr * (1.f - pr) * dp[a][b];
            } else {
              pr = expf(z - lse);
              ds = pr * (dp[a][b] - delta);
            }
          }
          sp[j * kScoreLd + i] = pr;
          sds[j * kScoreLd + i] = ds;
        }
      }
      __syncthreads();
      AccumulateProduct<D>(sp, sdo, mq, ty, tx, dv);
      AccumulateProduct<D>(sds, sq, mq, ty, tx, dk);
    }
  }

#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int j = ty + 16 * a;
    if (j >= nkt) continue;
    const int64_t base = ((kb + j0 + j) * p.hk + g) * D;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      p.dk[base + tx + 16 * c] = dk[a][c] * p.scale;
      p.dv[base + tx + 16 * c] = dv[a][c];
    }
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) QueryGradKernel(Params p) {
  constexpr int kLd = D + 1, kCols = D / 16;
  extern __shared__ float smem[];
  float* sq = smem;
  float* sdo = sq + kTile * kLd;
  float* sk = sdo + kTile * kLd;
  float* sv = sk + kTile * kLd;
  float* sds = sv + kTile * kLd;
  int* sdq = reinterpret_cast<int*>(sds + 2 * kTile * kScoreLd);
  int* sdk = sdq + kTile;

  const int row = blockIdx.z, h = blockIdx.y;
  const int64_t g = h / p.group;
  const int64_t qb = p.cu_q[row], kb = p.cu_k[row];
  const int nq = p.cu_q[row + 1] - static_cast<int>(qb), nk = p.cu_k[row + 1] - static_cast<int>(kb);
  const int i0 = blockIdx.x * kTile;
  if (i0 >= nq) return;
  const int mq = min(kTile, nq - i0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  LoadTile<D>(sq, p.q, p.hq, h, qb + i0, mq);
  LoadTile<D>(sdo, p.d_o, p.hq, h, qb + i0, mq);
  LoadDocs(sdq, p.doc_q, qb + i0, mq);
  const int hi = p.causal ? max(0, min(nk, i0 + mq - p.shift)) : nk;
  float lse[4], delta[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = ty + 16 * a;
    const int64_t th = (qb + i0 + i) * p.hq + h;
    lse[a] = !p.sigmoid && i < mq ? p.lse_in[th] : 0.f;
    delta[a] = !p.sigmoid && i < mq ? p.delta[th] : 0.f;
  }

  float dq[4][kCols];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < kCols; ++c) dq[a][c] = 0.f;

  for (int j0 = 0; j0 < hi; j0 += kTile) {
    const int nkt = min(kTile, nk - j0);
    if (!DocsOverlap(p.doc_q, qb + i0, mq, p.doc_k, kb + j0, nkt)) continue;
    __syncthreads();
    LoadTile<D>(sk, p.k, p.hk, g, kb + j0, nkt);
    LoadTile<D>(sv, p.v, p.hk, g, kb + j0, nkt);
    LoadDocs(sdk, p.doc_k, kb + j0, nkt);
    __syncthreads();
    float s[4][4], dp[4][4];
    RowDots<D>(sq, sk, ty, tx, s);
    RowDots<D>(sdo, sv, ty, tx, dp);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int i = ty + 16 * a;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int j = tx + 16 * b;
        const bool visible = i < mq && j < nkt && (!p.causal || i0 + i - p.shift >= j0 + j) &&
                             (!p.doc_q || sdq[i] == sdk[j]);
        float ds = 0.f;
        if (visible) {
          const float z = s[a][b] * p.scale;
          if (p.sigmoid) {
            const float pr = Sigmoid(z + p.bias);
            ds = pr * (1.f - pr) * dp[a][b];
          } else {
            ds = expf(z - lse[a]) * (dp[a][b] - delta[a]);
          }
        }
        sds[i * kScoreLd + j] = ds;
      }
    }
    __syncthreads();
    AccumulateProduct<D>(sds, sk, nkt, ty, tx, dq);
  }

#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = ty + 16 * a;
    if (i >= mq) continue;
    const int64_t base = ((qb + i0 + i) * p.hq + h) * D;
#pragma unroll
    for (int c = 0; c < kCols; ++c) p.dq[base + tx + 16 * c] = dq[a][c] * p.scale;
  }
}

// One warp per (token, head) row of o.
template <typename T>
__global__ void MergeKernel(bool sigmoid, T* o, float* lse, const T* ob, const float* lseb, int64_t rows, int d) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  T* x = o + row * d;
  const T* y = ob + row * d;
  if (sigmoid) {
    for (int c = lane; c < d; c += 32) x[c] = static_cast<T>(static_cast<float>(x[c]) + static_cast<float>(y[c]));
    return;
  }
  const float la = lse[row], lb = lseb[row];
  if (lb == -INFINITY) return;  // the block shows this query nothing
  if (la == -INFINITY) {
    for (int c = lane; c < d; c += 32) x[c] = y[c];
    __syncwarp();
    if (lane == 0) lse[row] = lb;
    return;
  }
  const float m = fmaxf(la, lb), wa = expf(la - m), wb = expf(lb - m), sum = wa + wb;
  for (int c = lane; c < d; c += 32)
    x[c] = static_cast<T>((wa * static_cast<float>(x[c]) + wb * static_cast<float>(y[c])) / sum);
  __syncwarp();
  if (lane == 0) lse[row] = m + logf(sum);
}

__global__ void FillKernel(float* x, int64_t n, float value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

// ------------------------------------------------------------------ host side

void CheckTensor(const Tensor& t, const Tensor& like, const char* name, const Shape& shape) {
  LOOM_CHECK(t.defined() && t.dtype() == DType::kF32 && t.shape() == shape && t.device() == like.device(),
             "[attention_f32] ", name, " must be f32 ", ShapeString(shape), " on ", like.device().ToString(),
             ", got ", t.defined() ? DTypeName(t.dtype()) : "undefined", " ", ShapeString(t.shape()), " on ",
             t.device().ToString());
}

Params MakeParams(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                  const CudaTokenRows& k_rows, const AttentionOptions& options) {
  LOOM_CHECK(q.defined() && !q.device().is_cpu() && q.dtype() == DType::kF32 && q.ndim() == 3,
             "[attention_f32] q must be f32 [Tq, Hq, D] on a CUDA device, got ",
             q.defined() ? DTypeName(q.dtype()) : "undefined", " ", ShapeString(q.shape()), " on ",
             q.device().ToString());
  const int64_t d = q.dim(2);
  LOOM_CHECK(d == 16 || d == 32 || d == 64 || d == 128, "[attention_f32] head dim ", d,
             " not compiled: 16, 32, 64 or 128");
  LOOM_CHECK(k.ndim() == 3 && k.dim(2) == d && k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, "[attention_f32] k ",
             ShapeString(k.shape()), " must be [Tk, Hk, D] with Hq = ", q.dim(1), " a multiple of Hk");
  CheckTensor(k, q, "k", k.shape());
  CheckTensor(v, q, "v", k.shape());
  CheckDeviceRows(q_rows, q, "attention_f32", "q_rows");
  CheckDeviceRows(k_rows, k, "attention_f32", "k_rows");
  LOOM_CHECK(q_rows.rows() == k_rows.rows(), "[attention_f32] ", q_rows.rows(), " query rows but ", k_rows.rows(),
             " key rows");
  LOOM_CHECK(q_rows.doc_ids.defined() == k_rows.doc_ids.defined(),
             "[attention_f32] doc_ids must be given for both q_rows and k_rows or for neither");
  LOOM_CHECK(q_rows.rows() <= 65535, "[attention_f32] at most 65535 rows, got ", q_rows.rows());
  LOOM_CHECK(q.dim(0) < (int64_t{1} << 31) && k.dim(0) < (int64_t{1} << 31),
             "[attention_f32] token counts must fit i32");
  const int64_t shift = options.k_offset - options.q_offset;
  LOOM_CHECK(shift > -(int64_t{1} << 30) && shift < (int64_t{1} << 30),
             "[attention_f32] |k_offset − q_offset| too large");
  Params p{};
  p.q = q.data<float>();
  p.k = k.data<float>();
  p.v = v.data<float>();
  p.cu_q = q_rows.cu_seqlens.data<int32_t>();
  p.cu_k = k_rows.cu_seqlens.data<int32_t>();
  p.doc_q = q_rows.doc_ids.defined() ? q_rows.doc_ids.data<int32_t>() : nullptr;
  p.doc_k = k_rows.doc_ids.defined() ? k_rows.doc_ids.data<int32_t>() : nullptr;
  p.hq = q.dim(1);
  p.hk = k.dim(1);
  p.group = q.dim(1) / k.dim(1);
  p.scale = static_cast<float>(options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d)));
  p.bias = static_cast<float>(options.sigmoid_bias);
  p.causal = options.causal;
  p.sigmoid = options.sigmoid;
  p.shift = static_cast<int>(shift);
  LOOM_CUDA_CHECK(cudaSetDevice(q.device().index));
  return p;
}

// The one place a head dim becomes a template argument.
template <typename Fn>
void DispatchHeadDim(int64_t d, Fn&& fn) {
  switch (d) {
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    default: LOOM_CHECK(false, "[attention_f32] no kernel for head dim ", d);
  }
}

template <typename Kernel>
void Launch(Kernel kernel, int smem, int64_t tiles_of, int64_t heads, int64_t rows, const Params& p,
            cudaStream_t stream) {
  const int64_t tiles = (tiles_of + kTile - 1) / kTile;
  if (tiles == 0 || heads == 0 || rows == 0) return;
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads), static_cast<unsigned>(rows)), kThreads,
           smem, stream>>>(p);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void Fill(Tensor& t, float value, cudaStream_t stream) {
  if (t.numel() == 0) return;
  FillKernel<<<(t.numel() + 255) / 256, 256, 0, stream>>>(t.data<float>(), t.numel(), value);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void AttentionF32Forward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                         const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                         CudaStream stream) {
  Params p = MakeParams(q, k, v, q_rows, k_rows, options);
  CheckTensor(o, q, "o", q.shape());
  if (!options.sigmoid) CheckTensor(lse, q, "lse", {q.dim(0), q.dim(1)});
  p.out = o.data<float>();
  p.lse = options.sigmoid ? nullptr : lse.data<float>();
  auto s = static_cast<cudaStream_t>(stream);
  if (!q_rows.uniform) {  // tokens outside every row: o = 0, lse = −∞ (as on the CPU)
    LOOM_CUDA_CHECK(cudaMemsetAsync(o.raw(), 0, o.nbytes(), s));
    if (!options.sigmoid) Fill(lse, -INFINITY, s);
  }
  DispatchHeadDim(q.dim(2), [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    Launch(ForwardKernel<D>, SmemBytes<D>(), q_rows.max_len, q.dim(1), q_rows.rows(), p, s);
  });
}

void AttentionF32Backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                          const Tensor& d_o, const CudaTokenRows& q_rows, const CudaTokenRows& k_rows,
                          const AttentionOptions& options, Tensor& dq, Tensor& dk, Tensor& dv, CudaStream stream) {
  Params p = MakeParams(q, k, v, q_rows, k_rows, options);
  CheckTensor(o, q, "o", q.shape());
  CheckTensor(d_o, q, "d_o", q.shape());
  if (!options.sigmoid) CheckTensor(lse, q, "lse", {q.dim(0), q.dim(1)});
  CheckTensor(dq, q, "dq", q.shape());
  CheckTensor(dk, q, "dk", k.shape());
  CheckTensor(dv, q, "dv", k.shape());
  auto s = static_cast<cudaStream_t>(stream);
  if (!q_rows.uniform) LOOM_CUDA_CHECK(cudaMemsetAsync(dq.raw(), 0, dq.nbytes(), s));
  if (!k_rows.uniform) {
    LOOM_CUDA_CHECK(cudaMemsetAsync(dk.raw(), 0, dk.nbytes(), s));
    LOOM_CUDA_CHECK(cudaMemsetAsync(dv.raw(), 0, dv.nbytes(), s));
  }
  const int64_t n = q.dim(0) * q.dim(1);
  float* delta = nullptr;
  if (!options.sigmoid && n > 0) {
    delta = static_cast<float*>(CudaAllocAsync(n * sizeof(float), s));
  }
  p.o = o.data<float>();
  p.d_o = d_o.data<float>();
  p.lse_in = options.sigmoid ? nullptr : lse.data<float>();
  p.delta = delta;
  p.dq = dq.data<float>();
  p.dk = dk.data<float>();
  p.dv = dv.data<float>();
  DispatchHeadDim(q.dim(2), [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (delta) {
      DeltaKernel<D><<<(n * 32 + 255) / 256, 256, 0, s>>>(p.o, p.d_o, n, delta);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
    Launch(KeyValueGradKernel<D>, SmemBytes<D>(), k_rows.max_len, k.dim(1), k_rows.rows(), p, s);
    Launch(QueryGradKernel<D>, SmemBytes<D>(), q_rows.max_len, q.dim(1), q_rows.rows(), p, s);
  });
  if (delta) LOOM_CUDA_CHECK(cudaFreeAsync(delta, s));
}

void MergeAttentionPartial(bool sigmoid, Tensor& o, Tensor& lse, const Tensor& o_b, const Tensor& lse_b,
                           CudaStream stream) {
  LOOM_CHECK(!o.device().is_cpu() && (o.dtype() == DType::kF32 || o.dtype() == DType::kBF16) && o.ndim() == 3,
             "[cp_attention] merge: o must be f32 or bf16 [N, H, D] on a CUDA device, got ", DTypeName(o.dtype()),
             " ", ShapeString(o.shape()), " on ", o.device().ToString());
  LOOM_CHECK(o_b.device() == o.device() && o_b.dtype() == o.dtype() && o_b.shape() == o.shape(),
             "[cp_attention] merge: o_b ", ShapeString(o_b.shape()), " must match o ", ShapeString(o.shape()));
  const int64_t rows = o.dim(0) * o.dim(1);
  if (!sigmoid) {
    CheckTensor(lse, o, "lse", {o.dim(0), o.dim(1)});
    CheckTensor(lse_b, o, "lse_b", {o.dim(0), o.dim(1)});
  }
  if (rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int d = static_cast<int>(o.dim(2));
  const unsigned blocks = static_cast<unsigned>((rows * 32 + 255) / 256);
  float* l = sigmoid ? nullptr : lse.data<float>();
  const float* lb = sigmoid ? nullptr : lse_b.data<float>();
  if (o.dtype() == DType::kF32) {
    MergeKernel<float><<<blocks, 256, 0, s>>>(sigmoid, o.data<float>(), l, o_b.data<float>(), lb, rows, d);
  } else {
    MergeKernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(sigmoid, static_cast<__nv_bfloat16*>(o.raw()), l,
                                                      static_cast<const __nv_bfloat16*>(o_b.raw()), lb, rows, d);
  }
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
