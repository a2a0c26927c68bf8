// Loom's flash attention backward for Hopper (sm_90a), FA2 design (the
// forward and the shared pieces: ops/cuda/softmax_attention.cu,
// ops/cuda/flash_common.cuh). Shapes:
//   q, o, d_o, dq [Tq, Hq, D] bf16    k, v, dk, dv [Tk, Hk, D] bf16
//   lse [Tq, Hq] f32 (natural log)    query head h reads KV head h / (Hq/Hk)
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
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ops/cuda/flash_common.cuh"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
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

__global__ void BackwardFinishKernel(const float* dq_acc, int64_t n, float scale, __nv_bfloat16* dq) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  const float4 v = *reinterpret_cast<const float4*>(dq_acc + i);
  uint2 out{PackBf16(v.x * scale, v.y * scale), PackBf16(v.z * scale, v.w * scale)};
  *reinterpret_cast<uint2*>(dq + i) = out;
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


}  // namespace loom::ops::cuda
