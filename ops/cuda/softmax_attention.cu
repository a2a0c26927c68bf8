// Loom's flash attention for Hopper (sm_90a), FA2 design: bf16 tiles in
// shared memory fed by cp.async, mma.sync m16n8k16 tensor-core products with
// f32 accumulators, ldmatrix fragments, the online softmax kept in
// registers. The math is ops/softmax_attention.h's; shapes:
//   q, o, d_o, dq [Tq, Hq, D] bf16    k, v, dk, dv [Tk, Hk, D] bf16
//   lse [Tq, Hq] f32 (natural log)    query head h reads KV head h / (Hq/Hk)
//
// Forward, one block = kBlockM queries of one row and one query head,
// 4 warps of 32 query rows each, walking kBlockN keys at a time:
//   S = Q Kᵀ (f32), m' = max(m, rowmax(S·c)), c = scale·log2(e),
//   P = 2^(S·c − m'), l' = 2^(m − m') l + rowsum(P), O' = 2^(m − m') O + P V,
//   at the end O /= l, lse = (m + log2 l) · ln 2.
//   Sigmoid: P = σ(scale·S + b) on visible entries, O = Σ P V, no m, l, lse.
//   K of tile j+1 loads while tile j's P V runs, V of tile j while its Q Kᵀ
//   runs (two cp.async groups in flight, FA2's schedule).
//
// Backward, three launches:
//   1. Prepare: Δ_i = Σ_d dO_id O_id and lse·log2(e) per (head, token), in
//      head-major order so the main kernel reads them contiguously.
//   2. KV pass: one block = kBlockN keys of one KV head, 8 warps of 16 keys.
//      dK and dV stay in registers while the block walks every query tile of
//      every query head in the GQA group (so no dK/dV reduction across
//      heads), recomputing Sᵀ = K Qᵀ and dPᵀ = V dOᵀ:
//        Pᵀ = 2^(Sᵀ·c − lse·log2 e),  dSᵀ = Pᵀ ⊙ (dPᵀ − Δ)
//        (sigmoid: Pᵀ = σ(scale·Sᵀ + b), dSᵀ = Pᵀ ⊙ (1 − Pᵀ) ⊙ dPᵀ)
//        dV += Pᵀ dO,  dK += dSᵀ Q,  dQ += dS K (dS through shared memory,
//        added to an f32 dQ buffer with vector atomics: order not fixed)
//      then dK ·= scale, dQ ·= scale.
//   3. Finish: dq = bf16(scale · dQ_f32).
// Gradient rule: dq, dk, dv are written (keys no query sees get 0).
//
// Masks: row r's query i has position q_offset + i, key j k_offset + j;
// causal: visible iff i − shift ≥ j, shift = k_offset − q_offset; documents:
// visible only within equal doc ids. Tiles wholly visible skip the mask;
// tiles wholly invisible are never visited (causal bounds; documents mask
// element-wise). A query that sees no key gets o = 0, lse = −∞.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------- PTX pieces

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled when !valid (src must still be a
// mapped address).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] · b[16x8], bf16 in, f32 accumulate. Fragments (lane =
// 4g + t): a0 (g, 2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
// b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); c0,c1 (g, 2t..2t+1), c2,c3 (g+8, ..).
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Two f32 added to global memory in one atomic (sm_90).
__device__ __forceinline__ void AtomicAdd2(float* p, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
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

struct MaskArgs {
  bool causal;
  int shift;            // k_offset − q_offset
  const int32_t* qdoc;  // this row's doc ids or null
  const int32_t* kdoc;
  int nq, nk;
  __device__ __forceinline__ bool Visible(int i, int j) const {
    if (j >= nk || i >= nq) return false;
    if (causal && i - shift < j) return false;
    if (qdoc && qdoc[i] != kdoc[j]) return false;
    return true;
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
  float scale, scale_log2, bias;
  bool causal, sigmoid;
  int shift;
};

// ------------------------------------------------------------------ forward

template <int D>
struct FwdTile {
  static constexpr int kM = 128, kN = D == 128 ? 32 : 64, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kSmem = (kM + 2 * kN) * D * 2;
};

template <int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads, 2) FlashForwardKernel(const Params p) {
  using T = FwdTile<D>;
  constexpr int kM = T::kM, kN = T::kN, kChunks = D / 8, kDt = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sq = SmemAddr(smem), sk = sq + kM * D * 2, sv = sk + kN * D * 2;

  const int tile = gridDim.x - 1 - blockIdx.x;  // heavy causal tiles first
  const int h = blockIdx.y, row = blockIdx.z, kvh = h / p.group;
  const int q0 = p.cu_q[row], nq = p.cu_q[row + 1] - q0;
  const int k0 = p.cu_k[row], nk = p.cu_k[row + 1] - k0;
  const int i0 = tile * kM;
  if (i0 >= nq) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const MaskArgs mask{p.causal, p.shift, p.doc_q ? p.doc_q + q0 : nullptr, p.doc_k ? p.doc_k + k0 : nullptr, nq, nk};

  int n_end = nk;
  if (p.causal) n_end = max(0, min(nk, i0 + kM - p.shift));
  const int n_tiles = (n_end + kN - 1) / kN;

  const int64_t ldq = p.hq * D, ldk = p.hk * D;
  const __nv_bfloat16* qbase = p.q + (q0 + i0) * ldq + h * D;
  const __nv_bfloat16* kbase = p.k + k0 * ldk + kvh * D;
  const __nv_bfloat16* vbase = p.v + k0 * ldk + kvh * D;

  // A operand rows (Q), B operand rows (K), transposed B (V).
  const FragAddr<kChunks> fq(sq, lane % 16, lane / 16);
  const FragAddr<kChunks> fk(sk, lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
  const FragAddr<kChunks> fv(sv, lane % 8 + 8 * ((lane / 8) % 2), lane / 16);

  float acc[2][kDt][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][dt][e] = 0.f;
  float m[2][2], l[2][2];  // [m-tile][row g / g+8], m in the log2 domain
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) m[mt][r] = -INFINITY, l[mt][r] = 0.f;

  if (n_tiles > 0) {
    LoadTile<kM, D, T::kThreads>(sq, qbase, ldq, nq - i0, tid);
    LoadTile<kN, D, T::kThreads>(sk, kbase, ldk, nk, tid);
    CpAsyncCommit();
  }
  for (int jt = 0; jt < n_tiles; ++jt) {
    const int j0 = jt * kN;
    CpAsyncWait<0>();
    __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
    LoadTile<kN, D, T::kThreads>(sv, vbase + j0 * ldk, ldk, nk - j0, tid);
    CpAsyncCommit();

    // S = Q K_jᵀ: 32 query rows (2 m-tiles) x 64 keys (8 n-tiles) a warp.
    float s[2][kN / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) LdMatrixX4(a[mt], fq.at(warp * 2 + mt, kk));
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        LdMatrixX4(b, fk.at(np, kk));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma(s[mt][2 * np], a[mt], b[0], b[1]);
          Mma(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    const bool need_mask = (p.causal && i0 - p.shift < j0 + kN - 1) || j0 + kN > nk || mask.qdoc != nullptr;
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = i0 + warp * 32 + mt * 16 + g + 8 * (e / 2), j = j0 + nt * 8 + 2 * t + (e % 2);
            // Rows past nq see nothing: m stays −∞, P = 0, nothing stored.
            if (!mask.Visible(i, j)) s[mt][nt][e] = -INFINITY;
          }
    }

    if (p.sigmoid) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = s[mt][nt][e];
            // σ(z) with z = −∞ (masked) is 0: 1/(1+e^∞) = 0.
            s[mt][nt][e] = 1.f / (1.f + exp2f(-(x * p.scale + p.bias) * kLog2e));
          }
    } else {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m[mt][r], mx * p.scale_log2);
          // A row with nothing visible yet keeps m = −∞; subtract 0 then so
          // that 2^(−∞ − (−∞)) never appears.
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m[mt][r] - m_use);
          m[mt][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const float e = exp2f(fmaf(s[mt][nt][2 * r + c], p.scale_log2, -m_use));
              s[mt][nt][2 * r + c] = e;
              sum += e;
            }
          l[mt][r] = l[mt][r] * alpha + sum;
#pragma unroll
          for (int dt = 0; dt < kDt; ++dt) acc[mt][dt][2 * r] *= alpha, acc[mt][dt][2 * r + 1] *= alpha;
        }
    }

    CpAsyncWait<0>();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (jt + 1 < n_tiles) {
      LoadTile<kN, D, T::kThreads>(sk, kbase + (j0 + kN) * ldk, ldk, nk - j0 - kN, tid);
      CpAsyncCommit();
    }

    // O += P V_j: P (C fragments of S) is the A operand as it stands.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        a[mt][0] = PackBf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = PackBf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = PackBf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = PackBf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        LdMatrixX4Trans(b, fv.at(kk, dp));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma(acc[mt][2 * dp], a[mt], b[0], b[1]);
          Mma(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // O /= l, lse = (m + log2 l) ln 2; straight from the C fragments to global.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = i0 + warp * 32 + mt * 16 + g + 8 * r;
      float inv = 1.f;
      if (!p.sigmoid) {
        float sum = l[mt][r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv = sum > 0.f ? 1.f / sum : 0.f;
        if (t == 0 && i < nq)
          p.lse[(q0 + i) * p.hq + h] = sum > 0.f ? (m[mt][r] + log2f(sum)) * kLn2 : -INFINITY;
      }
      if (i < nq) {
        __nv_bfloat16* orow = p.out + (q0 + i) * ldq + h * D;
#pragma unroll
        for (int dt = 0; dt < kDt; ++dt)
          *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) =
              PackBf16(acc[mt][dt][2 * r] * inv, acc[mt][dt][2 * r + 1] * inv);
      }
    }
}

// ----------------------------------------------------------------- backward

// Δ = Σ_d dO·O and lse·log2(e), [Tq, Hq] -> [Hq, Tq]; one warp per
// (token, head).
template <int D>
__global__ void BackwardPrepareKernel(const __nv_bfloat16* o, const __nv_bfloat16* d_o, const float* lse,
                                      int64_t tq, int64_t hq, bool sigmoid, float* delta, float* lse2) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= tq * hq) return;
  const int64_t tok = w / hq, h = w % hq;
  if (sigmoid) return;
  float sum = 0.f;
#pragma unroll
  for (int d = lane * 2; d < D; d += 64) {
    const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(o + w * D + d);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(d_o + w * D + d);
    sum += __bfloat162float(a.x) * __bfloat162float(b.x) + __bfloat162float(a.y) * __bfloat162float(b.y);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    delta[h * tq + tok] = sum;
    lse2[h * tq + tok] = lse[w] * kLog2e;  // −∞ stays −∞
  }
}

template <int D>
struct BwdTile {
  static constexpr int kM = 64, kN = 128, kWarps = 8, kThreads = kWarps * 32;
  // K, V [kN][D]; Q, dO [2][kM][D]; dSᵀ [kN][kM]; lse2, Δ [2][kM] f32.
  static constexpr int kSmem = (2 * kN * D + 4 * kM * D + kN * kM) * 2 + 4 * kM * 4;
};

template <int D>
__global__ void __launch_bounds__(BwdTile<D>::kThreads, 1) FlashBackwardKernel(const Params p) {
  using T = BwdTile<D>;
  constexpr int kM = T::kM, kN = T::kN, kChunks = D / 8, kDt = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sk = SmemAddr(smem), sv = sk + kN * D * 2;
  const uint32_t sq0 = sv + kN * D * 2;                   // Q buffers, then dO buffers
  const uint32_t sdo0 = sq0 + 2 * kM * D * 2;
  const uint32_t sds = sdo0 + 2 * kM * D * 2;             // dSᵀ [kN keys][kM queries]
  float* stats = reinterpret_cast<float*>(smem + (2 * kN * D + 4 * kM * D + kN * kM) * 2);  // [2][lse2 kM, Δ kM]

  const int kvh = blockIdx.y, row = blockIdx.z;
  const int j0 = blockIdx.x * kN;
  const int q0 = p.cu_q[row], nq = p.cu_q[row + 1] - q0;
  const int k0 = p.cu_k[row], nk = p.cu_k[row + 1] - k0;
  if (j0 >= nk) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const MaskArgs mask{p.causal, p.shift, p.doc_q ? p.doc_q + q0 : nullptr, p.doc_k ? p.doc_k + k0 : nullptr, nq, nk};

  // Query tiles that can see some key of [j0, j0 + kN): i ≥ j0 + shift.
  int it_begin = 0;
  if (p.causal) it_begin = max(0, j0 + p.shift) / kM;
  const int it_end = (nq + kM - 1) / kM;
  const int n_it = max(0, it_end - it_begin);
  const int steps = n_it * static_cast<int>(p.group);

  const int64_t ldq = p.hq * D, ldk = p.hk * D;
  // Step s: query head kvh·group + s / n_it, query tile it_begin + s % n_it.
  auto issue = [&](int s, int buf) {
    const int h = kvh * p.group + s / n_it, i0 = (it_begin + s % n_it) * kM;
    const int64_t off = (q0 + i0) * ldq + h * D;
    LoadTile<kM, D, T::kThreads>(sq0 + buf * kM * D * 2, p.q + off, ldq, nq - i0, tid);
    LoadTile<kM, D, T::kThreads>(sdo0 + buf * kM * D * 2, p.d_o + off, ldq, nq - i0, tid);
    if (!p.sigmoid && tid < 2 * kM) {
      const int r = tid % kM;
      const bool ok = i0 + r < nq;
      const float* src = (tid < kM ? p.lse2 : p.delta) + h * p.tq + q0 + i0 + (ok ? r : 0);
      CpAsync4(SmemAddr(stats + buf * 2 * kM + tid), src, ok);
    }
  };

  LoadTile<kN, D, T::kThreads>(sk, p.k + k0 * ldk + kvh * D + j0 * ldk, ldk, nk - j0, tid);
  LoadTile<kN, D, T::kThreads>(sv, p.v + k0 * ldk + kvh * D + j0 * ldk, ldk, nk - j0, tid);
  if (steps > 0) issue(0, 0);
  CpAsyncCommit();

  float dk[kDt][4], dv[kDt][4];
#pragma unroll
  for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = 0.f, dv[dt][e] = 0.f;

  const int kw = warp * 16;  // this warp's keys within the tile
  for (int s = 0; s < steps; ++s) {
    const int buf = s & 1;
    const int h = kvh * p.group + s / n_it, i0 = (it_begin + s % n_it) * kM;
    CpAsyncWait<0>();
    __syncthreads();  // step s landed; nobody reads buffer buf ^ 1 any more
    if (s + 1 < steps) issue(s + 1, buf ^ 1);
    CpAsyncCommit();
    const uint32_t sq = sq0 + buf * kM * D * 2, sdo = sdo0 + buf * kM * D * 2;
    const float* lse2 = stats + buf * 2 * kM;
    const float* delta = lse2 + kM;

    // Sᵀ = K_w Qᵀ and dPᵀ = V_w dOᵀ: 16 keys x 64 queries a warp.
    float st[kM / 8][4], dpt[kM / 8][4];
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = 0.f, dpt[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      LdMatrixX4(ak, sk + Swz<kChunks>(kw + lane % 16, kk * 2 + lane / 16));
      LdMatrixX4(av, sv + Swz<kChunks>(kw + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < kM / 16; ++np) {
        uint32_t bq[4], bo[4];
        const int r = np * 16 + lane % 8 + 8 * (lane / 16), c = kk * 2 + (lane / 8) % 2;
        LdMatrixX4(bq, sq + Swz<kChunks>(r, c));
        LdMatrixX4(bo, sdo + Swz<kChunks>(r, c));
        Mma(st[2 * np], ak, bq[0], bq[1]);
        Mma(st[2 * np + 1], ak, bq[2], bq[3]);
        Mma(dpt[2 * np], av, bo[0], bo[1]);
        Mma(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // Pᵀ into st, dSᵀ into dpt. Element (key j, query i).
    const bool need_mask = (p.causal && i0 - p.shift < j0 + kN - 1) || i0 + kM > nq || j0 + kN > nk ||
                           mask.qdoc != nullptr;
#pragma unroll
    for (int nt = 0; nt < kM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + 2 * t + (e % 2);
        const int j = j0 + kw + g + 8 * (e / 2);
        const bool visible = !need_mask || mask.Visible(i0 + il, j);
        float pe, ds;
        if (p.sigmoid) {
          pe = 1.f / (1.f + exp2f(-(st[nt][e] * p.scale + p.bias) * kLog2e));
          ds = pe * (1.f - pe) * dpt[nt][e];
        } else {
          pe = exp2f(fmaf(st[nt][e], p.scale_log2, -lse2[il]));
          ds = pe * (dpt[nt][e] - delta[il]);
        }
        st[nt][e] = visible ? pe : 0.f;
        dpt[nt][e] = visible ? ds : 0.f;
      }

    // dV += Pᵀ dO and dK += dSᵀ Q (k = the 64 queries); dSᵀ to shared memory.
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      ap[0] = PackBf16(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = PackBf16(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = PackBf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = PackBf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      ads[0] = PackBf16(dpt[2 * kk][0], dpt[2 * kk][1]);
      ads[1] = PackBf16(dpt[2 * kk][2], dpt[2 * kk][3]);
      ads[2] = PackBf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      ads[3] = PackBf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      // dSᵀ rows kw + g (+8), queries kk·16 + 2t (+8): 4-byte stores into the
      // swizzled [kN][kM] tile (kM/8 chunks a row).
      {
        constexpr int kSc = kM / 8;
        const int c0 = kk * 2, c1 = kk * 2 + 1, w0 = (2 * t) * 2;  // byte in chunk
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sds + Swz<kSc>(kw + g, c0) + w0), "r"(ads[0]));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sds + Swz<kSc>(kw + g + 8, c0) + w0), "r"(ads[1]));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sds + Swz<kSc>(kw + g, c1) + w0), "r"(ads[2]));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sds + Swz<kSc>(kw + g + 8, c1) + w0), "r"(ads[3]));
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bo[4], bq[4];
        const int r = kk * 16 + lane % 8 + 8 * ((lane / 8) % 2), c = dp * 2 + lane / 16;
        LdMatrixX4Trans(bo, sdo + Swz<kChunks>(r, c));
        LdMatrixX4Trans(bq, sq + Swz<kChunks>(r, c));
        Mma(dv[2 * dp], ap, bo[0], bo[1]);
        Mma(dv[2 * dp + 1], ap, bo[2], bo[3]);
        Mma(dk[2 * dp], ads, bq[0], bq[1]);
        Mma(dk[2 * dp + 1], ads, bq[2], bq[3]);
      }
    }
    __syncthreads();  // dSᵀ complete

    // dQ[64 x D] += dS K: warp w owns query m-tile w % 4 and half the head dim.
    {
      constexpr int kHalf = D / 2, kSc = kM / 8;
      const int mtile = warp % 4, d0 = (warp / 4) * kHalf;
      float dq[kHalf / 8][4];
#pragma unroll
      for (int nt = 0; nt < kHalf / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        uint32_t a[4];
        LdMatrixX4Trans(a, sds + Swz<kSc>(kk * 16 + lane % 8 + 8 * (lane / 16), mtile * 2 + (lane / 8) % 2));
#pragma unroll
        for (int dp = 0; dp < kHalf / 16; ++dp) {
          uint32_t b[4];
          LdMatrixX4Trans(b, sk + Swz<kChunks>(kk * 16 + lane % 8 + 8 * ((lane / 8) % 2), d0 / 8 + dp * 2 + lane / 16));
          Mma(dq[2 * dp], a, b[0], b[1]);
          Mma(dq[2 * dp + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + mtile * 16 + g + 8 * r;
        if (i >= nq) continue;
        float* dst = p.dq_acc + ((q0 + i) * p.hq + h) * D + d0 + 2 * t;
#pragma unroll
        for (int nt = 0; nt < kHalf / 8; ++nt) AtomicAdd2(dst + nt * 8, dq[nt][2 * r], dq[nt][2 * r + 1]);
      }
    }
    // The next step's wait + barrier orders these reads of dSᵀ before the
    // next writes.
  }
  CpAsyncWait<0>();  // no copy may be in flight when the block exits

  // dK ·= scale; write this warp's 16 keys.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + kw + g + 8 * r;
    if (j >= nk) continue;
    __nv_bfloat16* dkr = p.dk + (k0 + j) * ldk + kvh * D;
    __nv_bfloat16* dvr = p.dv + (k0 + j) * ldk + kvh * D;
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt) {
      *reinterpret_cast<uint32_t*>(dkr + dt * 8 + 2 * t) =
          PackBf16(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvr + dt * 8 + 2 * t) = PackBf16(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

__global__ void FillKernel(float* x, int64_t n, float value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

__global__ void BackwardFinishKernel(const float* dq_acc, int64_t n, float scale, __nv_bfloat16* dq) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  const float4 v = *reinterpret_cast<const float4*>(dq_acc + i);
  uint2 out{PackBf16(v.x * scale, v.y * scale), PackBf16(v.z * scale, v.w * scale)};
  *reinterpret_cast<uint2*>(dq + i) = out;
}

// ------------------------------------------------------------------ host side

const __nv_bfloat16* Bf16(const Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.raw()); }
__nv_bfloat16* Bf16Mut(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.raw()); }

void CheckTensor(const Tensor& t, const Tensor& like, const char* name, DType dtype, const Shape& shape) {
  LOOM_CHECK(t.defined() && t.dtype() == dtype && t.shape() == shape && t.device() == like.device(),
             "[flash_attention] ", name, " must be ", DTypeName(dtype), " ", ShapeString(shape), " on ",
             like.device().ToString(), ", got ", t.defined() ? DTypeName(t.dtype()) : "undefined", " ",
             ShapeString(t.shape()), " on ", t.device().ToString());
}

Params MakeParams(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                  const CudaTokenRows& k_rows, const AttentionOptions& options, const char* op) {
  LOOM_CHECK(!q.device().is_cpu() && q.dtype() == DType::kBF16 && q.ndim() == 3, "[", op,
             "] q must be bf16 [Tq, Hq, D] on a CUDA device, got ", DTypeName(q.dtype()), " ", ShapeString(q.shape()),
             " on ", q.device().ToString());
  const int64_t d = q.dim(2);
  LOOM_CHECK(d == 64 || d == 128, "[", op, "] head dim ", d, " not compiled: 64 or 128");
  LOOM_CHECK(k.ndim() == 3 && k.dim(2) == d && k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, "[", op, "] k ",
             ShapeString(k.shape()), " must be [Tk, Hk, D] with Hq = ", q.dim(1), " a multiple of Hk");
  CheckTensor(k, q, "k", DType::kBF16, k.shape());
  CheckTensor(v, q, "v", DType::kBF16, k.shape());
  CheckDeviceRows(q_rows, q, "flash_attention", "q_rows");
  CheckDeviceRows(k_rows, k, "flash_attention", "k_rows");
  LOOM_CHECK(q_rows.rows() == k_rows.rows(), "[", op, "] ", q_rows.rows(), " query rows but ", k_rows.rows(),
             " key rows");
  LOOM_CHECK(q_rows.doc_ids.defined() == k_rows.doc_ids.defined(), "[", op,
             "] doc_ids must be given for both q_rows and k_rows or for neither");
  LOOM_CHECK(q_rows.rows() <= 65535, "[", op, "] at most 65535 rows, got ", q_rows.rows());
  LOOM_CHECK(q.dim(0) < (int64_t{1} << 31) && k.dim(0) < (int64_t{1} << 31), "[", op, "] token counts must fit i32");
  const int64_t shift = options.k_offset - options.q_offset;
  LOOM_CHECK(shift > -(int64_t{1} << 30) && shift < (int64_t{1} << 30), "[", op, "] |k_offset − q_offset| too large");
  const double scale = options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  Params p{};
  p.q = Bf16(q);
  p.k = Bf16(k);
  p.v = Bf16(v);
  p.cu_q = q_rows.cu_seqlens.data<int32_t>();
  p.cu_k = k_rows.cu_seqlens.data<int32_t>();
  p.doc_q = q_rows.doc_ids.defined() ? q_rows.doc_ids.data<int32_t>() : nullptr;
  p.doc_k = k_rows.doc_ids.defined() ? k_rows.doc_ids.data<int32_t>() : nullptr;
  p.tq = q.dim(0);
  p.hq = q.dim(1);
  p.hk = k.dim(1);
  p.group = q.dim(1) / k.dim(1);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.bias = static_cast<float>(options.sigmoid_bias);
  p.causal = options.causal;
  p.sigmoid = options.sigmoid;
  p.shift = static_cast<int>(shift);
  LOOM_CUDA_CHECK(cudaSetDevice(q.device().index));
  return p;
}

template <int D>
void LaunchForward(const Params& p, int64_t max_q, int64_t rows, cudaStream_t stream) {
  using T = FwdTile<D>;
  static bool configured = [] {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(FlashForwardKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         T::kSmem));
    return true;
  }();
  (void)configured;
  const dim3 grid((max_q + T::kM - 1) / T::kM, p.hq, rows);
  if (grid.x == 0 || rows == 0) return;
  FlashForwardKernel<D><<<grid, T::kThreads, T::kSmem, stream>>>(p);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

template <int D>
void LaunchBackward(const Params& p, int64_t max_k, int64_t rows, cudaStream_t stream) {
  using T = BwdTile<D>;
  static bool configured = [] {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(FlashBackwardKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         T::kSmem));
    return true;
  }();
  (void)configured;
  const dim3 grid((max_k + T::kN - 1) / T::kN, p.hk, rows);
  if (grid.x == 0 || rows == 0) return;
  FlashBackwardKernel<D><<<grid, T::kThreads, T::kSmem, stream>>>(p);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void CheckDeviceRows(const CudaTokenRows& rows, const Tensor& like, const char* op, const char* name) {
  LOOM_CHECK(rows.cu_seqlens.defined() && rows.cu_seqlens.dtype() == DType::kI32 && rows.cu_seqlens.ndim() == 1 &&
                 rows.cu_seqlens.numel() >= 1 && rows.cu_seqlens.device() == like.device(),
             "[", op, "] ", name, ".cu_seqlens must be an i32 vector [R+1] on ", like.device().ToString(),
             " (ops::cuda::ToDevice makes one)");
  LOOM_CHECK(!rows.doc_ids.defined() || (rows.doc_ids.dtype() == DType::kI32 && rows.doc_ids.numel() == like.dim(0) &&
                                         rows.doc_ids.device() == like.device()),
             "[", op, "] ", name, ".doc_ids must be i32 [", like.dim(0), "] on ", like.device().ToString());
  LOOM_CHECK(rows.max_len >= 0 && rows.max_len <= like.dim(0), "[", op, "] ", name, ".max_len ", rows.max_len,
             " is not in [0, ", like.dim(0), "]");
}

CudaTokenRows ToDevice(const TokenRows& rows, int device) {
  LOOM_CHECK(rows.cu_seqlens.defined() && rows.cu_seqlens.device().is_cpu() &&
                 rows.cu_seqlens.dtype() == DType::kI32 && rows.cu_seqlens.numel() >= 1,
             "[flash_attention] ToDevice takes CPU rows with an i32 cu_seqlens [R+1]");
  CudaTokenRows out;
  out.cu_seqlens = Tensor::Empty(rows.cu_seqlens.shape(), DType::kI32, Device::Cuda(device));
  out.cu_seqlens.CopyFrom(rows.cu_seqlens);
  bool uniform = rows.rows() > 0 && rows.begin(0) == 0;
  for (int64_t r = 0; r < rows.rows(); ++r) {
    const int64_t len = rows.end(r) - rows.begin(r);
    LOOM_CHECK(len >= 0, "[flash_attention] row ", r, " has negative length");
    if (r > 0 && (len != out.max_len || rows.begin(r) != rows.end(r - 1))) uniform = false;
    out.max_len = std::max(out.max_len, len);
  }
  out.uniform = uniform;
  if (rows.has_docs()) {
    out.doc_ids = Tensor::Empty(rows.doc_ids.shape(), DType::kI32, Device::Cuda(device));
    out.doc_ids.CopyFrom(rows.doc_ids);
  }
  return out;
}

AttentionBackend ParseAttentionBackend(const std::string& name) {
  if (name == "loom") return AttentionBackend::kLoom;
  if (name == "cudnn") return AttentionBackend::kCudnn;
  LOOM_CHECK(false, "[attention] model.attention_backend must be \"loom\" or \"cudnn\", got \"", name, "\"");
  return AttentionBackend::kLoom;
}

void FlashAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                           const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                           CudaStream stream) {
  Params p = MakeParams(q, k, v, q_rows, k_rows, options, "flash_attention");
  CheckTensor(o, q, "o", DType::kBF16, q.shape());
  if (!options.sigmoid) CheckTensor(lse, q, "lse", DType::kF32, {q.dim(0), q.dim(1)});
  p.out = Bf16Mut(o);
  p.lse = options.sigmoid ? nullptr : lse.data<float>();
  auto s = static_cast<cudaStream_t>(stream);
  if (!q_rows.uniform) {  // tokens outside every row: o = 0, lse = −∞ (as on the CPU)
    LOOM_CUDA_CHECK(cudaMemsetAsync(o.raw(), 0, o.nbytes(), s));
    if (!options.sigmoid && lse.numel() > 0) {
      FillKernel<<<(lse.numel() + 255) / 256, 256, 0, s>>>(lse.data<float>(), lse.numel(), -INFINITY);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
  }
  if (q.dim(2) == 64) LaunchForward<64>(p, q_rows.max_len, q_rows.rows(), s);
  else LaunchForward<128>(p, q_rows.max_len, q_rows.rows(), s);
}

void FlashAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                            const Tensor& d_o, const CudaTokenRows& q_rows, const CudaTokenRows& k_rows,
                            const AttentionOptions& options, Tensor& dq, Tensor& dk, Tensor& dv, CudaStream stream) {
  Params p = MakeParams(q, k, v, q_rows, k_rows, options, "flash_attention");
  CheckTensor(o, q, "o", DType::kBF16, q.shape());
  CheckTensor(d_o, q, "d_o", DType::kBF16, q.shape());
  if (!options.sigmoid) CheckTensor(lse, q, "lse", DType::kF32, {q.dim(0), q.dim(1)});
  CheckTensor(dq, q, "dq", DType::kBF16, q.shape());
  CheckTensor(dk, q, "dk", DType::kBF16, k.shape());
  CheckTensor(dv, q, "dv", DType::kBF16, k.shape());
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t tq = q.dim(0), hq = q.dim(1), d = q.dim(2);
  if (!k_rows.uniform) {  // keys outside every row keep dk = dv = 0
    LOOM_CUDA_CHECK(cudaMemsetAsync(dk.raw(), 0, dk.nbytes(), s));
    LOOM_CUDA_CHECK(cudaMemsetAsync(dv.raw(), 0, dv.nbytes(), s));
  }
  // Scratch: dQ in f32 [Tq, Hq, D], Δ and lse·log2 e [Hq, Tq], from the
  // device's stream-ordered pool. The pool keeps freed memory (release
  // threshold raised once) so that each step does not map a fresh GiB.
  static bool pool_kept = [&] {
    cudaMemPool_t pool;
    LOOM_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, q.device().index));
    uint64_t keep = UINT64_MAX;
    LOOM_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return true;
  }();
  (void)pool_kept;
  float* scratch = nullptr;
  const size_t dq_n = static_cast<size_t>(tq * hq * d), stat_n = static_cast<size_t>(tq * hq);
  LOOM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&scratch), (dq_n + 2 * stat_n) * sizeof(float), s));
  p.dq_acc = scratch;
  float* delta = scratch + dq_n;
  float* lse2 = delta + stat_n;
  p.delta = delta;
  p.lse2 = lse2;
  p.o = Bf16(o);
  p.d_o = Bf16(d_o);
  p.dk = Bf16Mut(dk);
  p.dv = Bf16Mut(dv);
  LOOM_CUDA_CHECK(cudaMemsetAsync(p.dq_acc, 0, dq_n * sizeof(float), s));
  if (!options.sigmoid && tq * hq > 0) {
    const int64_t blocks = (tq * hq * 32 + 255) / 256;
    if (d == 64)
      BackwardPrepareKernel<64><<<blocks, 256, 0, s>>>(p.o, p.d_o, lse.data<float>(), tq, hq, false, delta, lse2);
    else
      BackwardPrepareKernel<128><<<blocks, 256, 0, s>>>(p.o, p.d_o, lse.data<float>(), tq, hq, false, delta, lse2);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  if (d == 64) LaunchBackward<64>(p, k_rows.max_len, k_rows.rows(), s);
  else LaunchBackward<128>(p, k_rows.max_len, k_rows.rows(), s);
  if (dq_n > 0) {
    BackwardFinishKernel<<<(dq_n / 4 + 255) / 256, 256, 0, s>>>(p.dq_acc, dq_n, p.scale, Bf16Mut(dq));
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  LOOM_CUDA_CHECK(cudaFreeAsync(scratch, s));
}

void AttentionForward(AttentionBackend backend, const Tensor& q, const Tensor& k, const Tensor& v,
                      const CudaTokenRows& q_rows, const CudaTokenRows& k_rows, const AttentionOptions& options,
                      Tensor& o, Tensor& lse, CudaStream stream) {
  if (backend == AttentionBackend::kCudnn) return CudnnAttentionForward(q, k, v, q_rows, k_rows, options, o, lse, stream);
  FlashAttentionForward(q, k, v, q_rows, k_rows, options, o, lse, stream);
}

void AttentionBackward(AttentionBackend backend, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& o, const Tensor& lse, const Tensor& d_o, const CudaTokenRows& q_rows,
                       const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& dq, Tensor& dk,
                       Tensor& dv, CudaStream stream) {
  if (backend == AttentionBackend::kCudnn)
    return CudnnAttentionBackward(q, k, v, o, lse, d_o, q_rows, k_rows, options, dq, dk, dv, stream);
  FlashAttentionBackward(q, k, v, o, lse, d_o, q_rows, k_rows, options, dq, dk, dv, stream);
}

}  // namespace loom::ops::cuda
