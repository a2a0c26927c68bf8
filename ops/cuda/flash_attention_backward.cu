// Loom's flash attention backward for Hopper (sm_90a): the entry point, the
// passes around the KV pass and the deterministic dQ pass (the forward and
// the shared pieces: ops/cuda/flash_attention_forward_sm90.cu,
// ops/cuda/flash_common.cuh). Shapes:
//   q, o, d_o, dq [Tq, Hq, D] bf16    k, v, dk, dv [Tk, Hk, D] bf16
//   lse [Tq, Hq] f32 (natural log)    query head h reads KV head h / (Hq/Hk)
//
// Backward, three launches:
//   1. Prepare: Δ_i = Σ_d dO_id O_id and lse·log2(e) per (head, token), in
//      head-major order so the main kernel reads them contiguously.
//   2. KV pass on wgmma (ops/cuda/flash_attention_backward_sm90.cu): one
//      block per 128 keys of a KV head keeps dK, dV in registers while it
//      walks every query tile of the GQA group's heads, and adds dQ to an f32
//      buffer by bulk reductions (D = 128) or vector atomics (D = 64), in no
//      fixed order.
//   3. Finish: dq = bf16(scale · dQ_f32).
// Deterministic mode (AttentionOptions::deterministic): step 2 skips dQ and
// a dQ pass replaces step 3: one block per query tile and query head walks
// the key tiles in order, recomputes S, dP, dS and keeps dQ in registers
// (two more products per tile, no atomics, bitwise repeatable).
// Gradient rule: dq, dk, dv are written (keys no query sees get 0).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/flash_common.cuh"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace flash {
// The KV pass on wgmma, D in {64, 128} (ops/cuda/flash_attention_backward_sm90.cu).
void LaunchBackwardSm90(const Params& p, int64_t d, int64_t max_k, int64_t rows, cudaStream_t stream);
}  // namespace flash

namespace {

using namespace flash;

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

// Deterministic dQ pass (AttentionOptions::deterministic): one block = kM
// queries of one row and one query head, 4 warps of 16 query rows, walking
// the key tiles in order and recomputing S = Q Kᵀ and dP = dO Vᵀ:
//   P = 2^(S·c − lse·log2 e), dS = P ⊙ (dP − Δ)  (sigmoid: P ⊙ (1 − P) ⊙ dP),
//   dQ += dS K in registers, then dq = bf16(scale · dQ).
// Each dq element is written once, summed in the same order every run. K, V
// of tile j+1 load while tile j runs.
template <int D>
struct DqTile {
  static constexpr int kM = 64, kN = 64, kWarps = 4, kThreads = kWarps * 32;
  // Q, dO [kM][D]; K, V [2][kN][D].
  static constexpr int kSmem = (2 * kM * D + 4 * kN * D) * 2;
};

template <int D>
__global__ void __launch_bounds__(DqTile<D>::kThreads, 2)
    FlashBackwardDqKernel(const Params p, __nv_bfloat16* dq_out) {
  using T = DqTile<D>;
  constexpr int kM = T::kM, kN = T::kN, kChunks = D / 8, kDt = D / 8;
  constexpr uint32_t kTileKV = kN * D * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sq = SmemAddr(smem), sdo = sq + kM * D * 2, sk0 = sdo + kM * D * 2, sv0 = sk0 + 2 * kTileKV;

  const MaskArgs mask = RowMask(p, blockIdx.z);
  QueryTileBlock b;
  if (!PlaceQueryTile<kM, kN>(p, mask, b)) return;
  // A query tile MoH skips walks no key tile: its dq is 0.
  const int h = b.h, kvh = b.kvh, q0 = b.q0, nq = b.nq, k0 = b.k0, nk = b.nk, i0 = b.i0, n_tiles = b.n_tiles;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;

  const int64_t ldq = p.hq * D, ldk = p.hk * D;
  const int j_first = b.first_tile * kN;  // the key tiles run in order from here
  const __nv_bfloat16* kbase = p.k + (k0 + j_first) * ldk + kvh * D;
  const __nv_bfloat16* vbase = p.v + (k0 + j_first) * ldk + kvh * D;

  // lse·log2 e, Δ and the keys seen of this thread's two query rows (g, g + 8).
  float lse2[2], delta[2];
  int klo[2], khi[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + warp * 16 + g + 8 * r;
    mask.KeysSeenBy(i, klo[r], khi[r]);
    const bool ok = i < nq && !p.sigmoid;
    lse2[r] = ok ? p.lse2[h * p.tq + q0 + i] : 0.f;
    delta[r] = ok ? p.delta[h * p.tq + q0 + i] : 0.f;
  }

  // Lane offsets: A rows of Q, dO; B rows of K, V (keys along n);
  // transposed B of K (keys along k).
  const FragAddr<kChunks> fa(0, lane % 16, lane / 16);
  const FragAddr<kChunks> fb(0, lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
  const FragAddr<kChunks> fbt(0, lane % 8 + 8 * ((lane / 8) % 2), lane / 16);

  float dq[kDt][4];
#pragma unroll
  for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;

  if (n_tiles > 0) {
    const int64_t off = (q0 + i0) * ldq + h * D;
    LoadTile<kM, D, T::kThreads>(sq, p.q + off, ldq, nq - i0, tid);
    LoadTile<kM, D, T::kThreads>(sdo, p.d_o + off, ldq, nq - i0, tid);
    LoadTile<kN, D, T::kThreads>(sk0, kbase, ldk, nk - j_first, tid);
    LoadTile<kN, D, T::kThreads>(sv0, vbase, ldk, nk - j_first, tid);
    CpAsyncCommit();
  }
  for (int jt = 0; jt < n_tiles; ++jt) {
    const int jr = jt * kN, j0 = j_first + jr, buf = jt & 1;  // jr: from kbase
    CpAsyncWait<0>();
    __syncthreads();  // tile jt landed; nobody reads buffer buf ^ 1 any more
    if (jt + 1 < n_tiles) {
      LoadTile<kN, D, T::kThreads>(sk0 + (buf ^ 1) * kTileKV, kbase + (jr + kN) * ldk, ldk, nk - j0 - kN, tid);
      LoadTile<kN, D, T::kThreads>(sv0 + (buf ^ 1) * kTileKV, vbase + (jr + kN) * ldk, ldk, nk - j0 - kN, tid);
    }
    CpAsyncCommit();
    const uint32_t sk = sk0 + buf * kTileKV, sv = sv0 + buf * kTileKV;

    // S = Q Kᵀ and dP = dO Vᵀ: 16 queries x 64 keys a warp.
    float s[kN / 8][4], dp[kN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f, dp[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ao[4];
      LdMatrixX4(aq, sq + fa.at(warp, kk));
      LdMatrixX4(ao, sdo + fa.at(warp, kk));
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t bk[4], bv[4];
        LdMatrixX4(bk, sk + fb.at(np, kk));
        LdMatrixX4(bv, sv + fb.at(np, kk));
        Mma(s[2 * np], aq, bk[0], bk[1]);
        Mma(s[2 * np + 1], aq, bk[2], bk[3]);
        Mma(dp[2 * np], ao, bv[0], bv[1]);
        Mma(dp[2 * np + 1], ao, bv[2], bv[3]);
      }
    }

    // dS into s. Element (query i, key j). The variant's and the mask's
    // branches are taken once a tile, outside the unrolled loop (as in the
    // KV pass), so a tile issues only its own instructions.
    const bool need_mask = klo[0] > j0 || khi[0] < j0 + kN || klo[1] > j0 || khi[1] < j0 + kN;
    auto form_ds = [&](auto grad, auto masked) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, j = j0 + nt * 8 + 2 * t + (e % 2);
          const float ds = grad(s[nt][e], dp[nt][e], r);
          if constexpr (masked) s[nt][e] = j >= klo[r] && j < khi[r] ? ds : 0.f;
          else s[nt][e] = ds;
        }
    };
    auto form_ds_masked_or_not = [&](auto grad) {
      if (need_mask) form_ds(grad, std::true_type{});
      else form_ds(grad, std::false_type{});
    };
    if (p.sigmoid) {
      form_ds_masked_or_not([&](float sv, float dpv, int) {
        const float pe = Sigmoid(sv * p.scale + p.bias);
        return pe * (1.f - pe) * dpv;
      });
    } else {
      form_ds_masked_or_not([&](float sv, float dpv, int r) {
        return Exp2(fmaf(sv, p.scale_log2, -lse2[r])) * (dpv - delta[r]);
      });
    }

    // dQ += dS K_j: dS's C fragments are A fragments (k = the 64 keys).
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint32_t a[4] = {PackBf16(s[2 * kk][0], s[2 * kk][1]), PackBf16(s[2 * kk][2], s[2 * kk][3]),
                             PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp2 = 0; dp2 < D / 16; ++dp2) {
        uint32_t b[4];
        LdMatrixX4Trans(b, sk + fbt.at(kk, dp2));
        Mma(dq[2 * dp2], a, b[0], b[1]);
        Mma(dq[2 * dp2 + 1], a, b[2], b[3]);
      }
    }
  }
  CpAsyncWait<0>();  // no copy may be in flight when the block exits

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + warp * 16 + g + 8 * r;
    if (i >= nq) continue;
    __nv_bfloat16* out = dq_out + (q0 + i) * ldq + h * D;
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt)
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * t) = PackBf16(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
  }
}

__global__ void BackwardFinishKernel(const float* dq_acc, int64_t n, float scale, __nv_bfloat16* dq) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  const float4 v = *reinterpret_cast<const float4*>(dq_acc + i);
  uint2 out{PackBf16(v.x * scale, v.y * scale), PackBf16(v.z * scale, v.w * scale)};
  *reinterpret_cast<uint2*>(dq + i) = out;
}

template <int D>
void LaunchBackwardDq(const Params& p, int64_t max_q, int64_t rows, __nv_bfloat16* dq, cudaStream_t stream) {
  using T = DqTile<D>;
  LaunchTiles<FlashBackwardDqKernel<D>>(dim3((max_q + T::kM - 1) / T::kM, p.hq, rows), T::kThreads, T::kSmem, stream,
                                        p, dq);
}

}  // namespace

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
  // device's pool (which keeps freed memory, runtime/cuda_runtime.h).
  // Deterministic mode has no dQ buffer: the dQ pass writes dq itself.
  const bool dq_atomic = !options.deterministic;
  const size_t dq_n = static_cast<size_t>(tq * hq * d), stat_n = static_cast<size_t>(tq * hq);
  const size_t acc_n = dq_atomic ? dq_n : 0;
  float* scratch = static_cast<float*>(CudaAllocAsync((acc_n + 2 * stat_n) * sizeof(float), s));
  p.dq_acc = dq_atomic ? scratch : nullptr;
  float* delta = scratch + acc_n;
  float* lse2 = delta + stat_n;
  p.delta = delta;
  p.lse2 = lse2;
  p.o = Bf16(o);
  p.d_o = Bf16(d_o);
  p.dk = Bf16Mut(dk);
  p.dv = Bf16Mut(dv);
  if (dq_atomic) LOOM_CUDA_CHECK(cudaMemsetAsync(p.dq_acc, 0, dq_n * sizeof(float), s));
  if (!options.sigmoid && tq * hq > 0) {
    const int64_t blocks = (tq * hq * 32 + 255) / 256;
    if (d == 64)
      BackwardPrepareKernel<64><<<blocks, 256, 0, s>>>(p.o, p.d_o, lse.data<float>(), tq, hq, false, delta, lse2);
    else
      BackwardPrepareKernel<128><<<blocks, 256, 0, s>>>(p.o, p.d_o, lse.data<float>(), tq, hq, false, delta, lse2);
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  LaunchBackwardSm90(p, d, k_rows.max_len, k_rows.rows(), s);
  if (dq_atomic && dq_n > 0) {
    BackwardFinishKernel<<<(dq_n / 4 + 255) / 256, 256, 0, s>>>(p.dq_acc, dq_n, p.scale, Bf16Mut(dq));
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  if (!dq_atomic) {
    // Queries outside every row keep dq = 0.
    if (!q_rows.uniform) LOOM_CUDA_CHECK(cudaMemsetAsync(dq.raw(), 0, dq.nbytes(), s));
    if (d == 64) LaunchBackwardDq<64>(p, q_rows.max_len, q_rows.rows(), Bf16Mut(dq), s);
    else LaunchBackwardDq<128>(p, q_rows.max_len, q_rows.rows(), Bf16Mut(dq), s);
  }
  LOOM_CUDA_CHECK(cudaFreeAsync(scratch, s));
}

}  // namespace loom::ops::cuda
