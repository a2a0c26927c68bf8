// Loom's flash attention backward KV pass on Hopper warpgroup MMA (wgmma),
// D = 64 and 128 (FA3's backward, Shah et al. 2024, without its producer
// warp); the passes around it are in ops/cuda/flash_attention_backward.cu:
//   one block = 128 keys of one KV head, two warpgroups of 64 keys each;
//   dK, dV [64 keys x D] f32 stay in a warpgroup's registers (D/2 + D/2 a
//   thread) while the block walks every query tile (64 queries) of every
//   query head of the GQA group (so no dK/dV reduction across heads); per
//   query tile:
//     Sᵀ = K_w Qᵀ, dPᵀ = V_w dOᵀ        m64n64k16, A and B from shared memory
//     Pᵀ = 2^(Sᵀ·c − lse·log2 e), dSᵀ = Pᵀ ⊙ (dPᵀ − Δ)
//     (sigmoid: Pᵀ = σ(scale·Sᵀ + b), dSᵀ = Pᵀ ⊙ (1 − Pᵀ) ⊙ dPᵀ)
//     dV += Pᵀ dO, dK += dSᵀ Q          m64nDk16, A = Pᵀ / dSᵀ in registers
//     dQ += dS K                         m64n(D/2)k16, dSᵀ through shared
//                                        memory, added to the f32 dQ by bulk
//                                        reductions a query row (D = 128) or
//                                        vector atomics (D = 64)
//   in five wgmma groups, each overlapped with the element-wise work that
//   follows its issue: Sᵀ | dPᵀ (runs while Pᵀ is formed) | dV (while dSᵀ is
//   formed) | dK (while dSᵀ goes to shared memory) | dQ. dQ is split by
//   column: warpgroup w takes columns w·D/2.. over all 128 keys. dQ is
//   skipped in deterministic mode (p.dq_acc null).
// Blocks run heaviest first: under a causal mask the first key tiles see
// the most queries, so the grid's x is the KV head and y the key tile.
// Shared memory: 64-column panels with the 128-byte swizzle (ops/cuda/
// sm90.cuh). K, V [128][D]; Q, dO [2 buffers][64][D]; dSᵀ [128 keys][64
// queries]; lse2, Δ [2][64] f32; each key's visible queries [2][128] i32;
// D = 128: dQ staging [2][2 warpgroups][64][72] f32: 219 KB for D = 128,
// 83 KB for D = 64.
// wgmma descriptors (PTX ISA "matrix descriptor", swizzle mode 128 B):
//   K-major (rows hold the contraction dim: K, V as A and Q, dO as B of the
//   first products): SBO = 1024 (8 rows to the next 8); the 16-wide k step
//   j inside a panel starts 32·j bytes further, panel p at p·(panel bytes).
//   MN-major (rows hold the contraction dim's index and the M or N dim runs
//   along the row: dO, Q as B of dV, dK; dSᵀ as A and K as B of dQ):
//   SBO = 1024 (8 contraction rows to the next 8), LBO = panel bytes (64
//   columns to the next 64); k step j starts 16·128·j bytes further.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/flash_common.cuh"
#include "ops/cuda/sm90.cuh"
#include "ops/cuda/tensor_map.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda::flash {
namespace {

using namespace sm90;

template <int D>
struct Sm90BwdTile {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static constexpr int kM = 64, kN = 128, kThreads = 256;
  static constexpr int kKV = kN * D * 2, kQ = kM * D * 2, kDs = kN * kM * 2;
  // How dQ reaches global memory: D = 128 stages it in shared memory for
  // bulk reductions, D = 64 adds it with atomics (its 128-byte rows made the
  // bulk path slower: 134 against 157 TFLOP/s backward at 8K, H100).
  static constexpr bool kBulkDq = D == 128;
  // dQ staging: [2 buffers][2 warpgroups][kM rows][D/2 + 8 f32] (rows
  // padded by 32 bytes, so each half-warp's 8-byte stores hit 32 banks).
  static constexpr int kStageLd = D / 2 + 8, kStage = kBulkDq ? 2 * 2 * kM * kStageLd * 4 : 0;
  // K | V | Q [2] | dO [2] | dSᵀ | stats | the queries each key sees | dQ
  // staging | the two Q/dO buffers' mbarriers; +1024 to align the base.
  static constexpr int kStats = 2 * kKV + 4 * kQ + kDs;
  static constexpr int kBars = kStats + 4 * kM * 4 + 2 * kN * 4 + kStage;
  static constexpr int kSmem = kBars + 2 * 8 + 1024;
  static_assert(kSmem <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

// d[64 x D] += A[64x16] · B[16 x D], A in registers, B MN-major.
template <int D>
__device__ __forceinline__ void WgmmaRS(float (&d)[D / 2], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (D == 128) WgmmaM64N128RS(d, a, b);
  else WgmmaM64N64RS(d, a, b);
}

// acc[64 keys x D] += c · B over 64 queries, committed as one wgmma group:
// c is a warpgroup's m64n64 f32 fragment (Pᵀ or dSᵀ), packed into the four
// k-step A fragments a (kept alive by the caller until the group is waited
// for: (g, 2t) (g+8, 2t) (g, 2t+8) (g+8, 2t+8) of each 16 queries); B is an
// MN-major [64 queries][D] tile at b (panel stride `panel`).
template <int D>
__device__ __forceinline__ void PackAndMma(float (&acc)[D / 2], const float (&c)[32], uint32_t (&a)[4][4], uint32_t b,
                                           uint32_t panel) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[kk][r] = PackBf16(c[8 * kk + 2 * r], c[8 * kk + 2 * r + 1]);
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) WgmmaRS<D>(acc, a[kk], Desc128B(b + kk * 16 * 128, panel, 1024));
  WgmmaCommit();
}

// The TMA maps of q and dO: boxes of 64 tokens by 64 columns of one head.
struct BwdMaps {
  CUtensorMap q, d_o;
};

// One block an SM: D = 64 fits two by shared memory, but at 128 registers
// it spills, and the 8K gpu_1b_softmax step measured 29.5k tokens/s so
// against 37.4k with one (H100).
template <int D>
__global__ void __launch_bounds__(Sm90BwdTile<D>::kThreads, 1)
    FlashBackwardSm90Kernel(const Params p, const __grid_constant__ BwdMaps maps) {
#if LOOM_SM90A
  using T = Sm90BwdTile<D>;
  constexpr int kM = T::kM, kN = T::kN, kAcc = D / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw), sk = (raw + 1023) & ~1023u;
  const uint32_t sv = sk + T::kKV, sq0 = sv + T::kKV, sdo0 = sq0 + 2 * T::kQ, sds = sdo0 + 2 * T::kQ;
  float* stats = reinterpret_cast<float*>(smem_raw + (sk - raw) + T::kStats);  // [2][lse2 kM, Δ kM]
  // Key kw's visible queries are [seen[kw], seen[kN + kw]) (in shared memory:
  // the loop has no registers to spare).
  int* seen = reinterpret_cast<int*>(stats + 4 * kM);
  float* dq_stage = reinterpret_cast<float*>(seen + 2 * kN);
  int dq_buf = 0;  // the staging buffer of the next dQ step (they alternate)
  // Q and dO of a step land by TMA on the mbarrier of their buffer; bit b of
  // `phases` is the parity buffer b's next fill completes.
  const uint32_t full = sk + T::kBars;
  uint32_t phases = 0;

  const int kvh = blockIdx.x, row = blockIdx.z;
  const int j0 = blockIdx.y * kN;
  const MaskArgs mask = RowMask(p, row);
  const int q0 = p.cu_q[row], nq = mask.nq, k0 = p.cu_k[row], nk = mask.nk;
  if (j0 >= nk) return;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;

  // The query tiles that see a key of this tile: none before the causal
  // bound, none outside its keys' documents.
  int i_lo, i_hi;
  mask.QueriesOf(j0, min(j0 + kN, nk), i_lo, i_hi);
  if (p.causal) i_lo = max(i_lo, j0 + p.shift);
  const int it_begin = max(0, i_lo) / kM;
  const int it_end = (i_hi + kM - 1) / kM;
  const int n_it = max(0, it_end - it_begin);
  const int steps = n_it * static_cast<int>(p.group);

  const int64_t ldk = p.hk * D;
  // MoH: a step whose (query head, query tile) is skipped loads and computes
  // nothing (every thread decides alike, so the barriers still pair up).
  auto step_active = [&](int s) {
    const int i0 = (it_begin + s % n_it) * kM;
    return QueryTileActive(p, kvh * p.group + s / n_it, q0 + i0, min(kM, nq - i0));
  };
  // Step s's Q and dO tiles into buffer buf (one thread, TMA: boxes past the
  // row's end read the next row's tokens or zeros, whose queries the mask
  // hides), and its lse2, Δ (cp.async).
  auto issue = [&](int s, int buf) {
    const int h = kvh * p.group + s / n_it, i0 = (it_begin + s % n_it) * kM;
    if (tid == 0) {
      const uint32_t bar = full + 8 * buf;
      MbarArriveExpectTx(bar, 2 * T::kQ);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        TmaLoad3d(sq0 + buf * T::kQ + c * kM * 128, &maps.q, c * 64, h, q0 + i0, bar);
        TmaLoad3d(sdo0 + buf * T::kQ + c * kM * 128, &maps.d_o, c * 64, h, q0 + i0, bar);
      }
    }
    if (!p.sigmoid && tid < 2 * kM) {
      const int r = tid % kM;
      const bool ok = i0 + r < nq;
      const float* src = (tid < kM ? p.lse2 : p.delta) + h * p.tq + q0 + i0 + (ok ? r : 0);
      CpAsync4(SmemAddr(stats + buf * 2 * kM + tid), src, ok);
    }
  };

  if (tid == 0) {
    MbarInit(full, 1);
    MbarInit(full + 8, 1);
    FenceBarrierInit();
  }
  __syncthreads();  // the mbarriers are set up before anyone waits on them
  if (tid < kN) mask.QueriesSeeing(j0 + tid, seen[tid], seen[kN + tid]);  // read after the loop's first barrier
  LoadPanels<kN, D, T::kThreads>(sk, p.k + (k0 + j0) * ldk + kvh * D, ldk, nk - j0, tid);
  LoadPanels<kN, D, T::kThreads>(sv, p.v + (k0 + j0) * ldk + kvh * D, ldk, nk - j0, tid);
  if (steps > 0 && step_active(0)) issue(0, 0);
  CpAsyncCommit();

  float dk[kAcc], dv[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) dk[i] = 0.f, dv[i] = 0.f;

  // This thread's keys (C rows of Sᵀ): kw + g and kw + g + 8.
  const int kw = wg * 64 + warp * 16;
  constexpr uint32_t kPanelKV = kN * 128, kPanelQ = kM * 128;
  for (int s = 0; s < steps; ++s) {
    const int buf = s & 1;
    const int h = kvh * p.group + s / n_it, i0 = (it_begin + s % n_it) * kM;
    const bool active = step_active(s);
    CpAsyncWait<0>();
    if (active) {
      MbarWait(full + 8 * buf, (phases >> buf) & 1);
      phases ^= 1u << buf;
    }
    FenceProxyAsync();
    __syncthreads();  // step s landed and is visible to wgmma; buffer buf ^ 1 is free
    if (s + 1 < steps && step_active(s + 1)) issue(s + 1, buf ^ 1);
    CpAsyncCommit();
    if (!active) continue;
    const uint32_t sq = sq0 + buf * T::kQ, sdo = sdo0 + buf * T::kQ;
    const float* lse2 = stats + buf * 2 * kM;
    const float* delta = lse2 + kM;

    // Five wgmma groups a step, each overlapped with the element-wise work
    // that follows its issue: Sᵀ | dPᵀ (runs while Pᵀ is formed) | dV (while
    // dSᵀ is formed) | dK (while dSᵀ goes to shared memory) | dQ.
    float st[32], dpt[32];
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk / 4) * kPanelKV + wg * 64 * 128 + (kk % 4) * 32;
      const uint32_t qoff = (kk / 4) * kPanelQ + (kk % 4) * 32;
      WgmmaM64N64SS<false>(st, Desc128B(sk + koff, 16, 1024), Desc128B(sq + qoff, 16, 1024), kk > 0);
    }
    WgmmaCommit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk / 4) * kPanelKV + wg * 64 * 128 + (kk % 4) * 32;
      const uint32_t qoff = (kk / 4) * kPanelQ + (kk % 4) * 32;
      WgmmaM64N64SS<false>(dpt, Desc128B(sv + koff, 16, 1024), Desc128B(sdo + qoff, 16, 1024), kk > 0);
    }
    WgmmaCommit();
    WgmmaWait<1>();
    FenceRegs(st);

    // Pᵀ into st. Element i of the C fragment: key kw + g + 8·(i mod 4 / 2),
    // query 8·(i / 4) + 2t + i mod 2.
    // Every key sees every query of the tile unless it lies outside the
    // range all keys see: the first key's and the last key's ranges meet
    // (both bounds are non-decreasing along the keys).
    const bool need_mask = i0 < max(seen[0], seen[kN - 1]) || i0 + kM > min(seen[kN], seen[2 * kN - 1]);
    // The variant's and the mask's branches are taken once a step, outside
    // the unrolled loops, so a step issues only its own instructions.
    auto form_p = [&](auto prob, auto masked) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int il = 8 * (i / 4) + 2 * t + (i % 2), key = kw + g + 8 * ((i % 4) / 2);
        if constexpr (masked) {
          const bool visible = i0 + il >= seen[key] && i0 + il < seen[kN + key];
          st[i] = visible ? prob(st[i], il) : 0.f;
        } else {
          st[i] = prob(st[i], il);
        }
      }
    };
    auto form_p_masked_or_not = [&](auto prob) {
      if (need_mask) form_p(prob, std::true_type{});
      else form_p(prob, std::false_type{});
    };
    if (p.sigmoid)
      form_p_masked_or_not([&](float s, int) { return Sigmoid(s * p.scale + p.bias); });
    else
      form_p_masked_or_not([&](float s, int il) { return Exp2(fmaf(s, p.scale_log2, -lse2[il])); });
    // dV += Pᵀ dO over the 64 queries.
    uint32_t ap[4][4], ads[4][4];
    PackAndMma<D>(dv, st, ap, sdo, kPanelQ);
    WgmmaWait<1>();
    FenceRegs(dpt);

    // dSᵀ = Pᵀ ⊙ (dPᵀ − Δ), sigmoid: Pᵀ ⊙ (1 − Pᵀ) ⊙ dPᵀ (Pᵀ is 0 where masked).
    if (p.sigmoid) {
#pragma unroll
      for (int i = 0; i < 32; ++i) dpt[i] *= st[i] * (1.f - st[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) dpt[i] = st[i] * (dpt[i] - delta[8 * (i / 4) + 2 * t + (i % 2)]);
    }
    // dK += dSᵀ Q over the 64 queries.
    PackAndMma<D>(dk, dpt, ads, sq, kPanelQ);
    WgmmaWait<1>();  // dV done: Pᵀ's registers are free
    FenceRegs(dv);
    FenceRegs(ap);
    if (!p.dq_acc) {
      WgmmaWait<0>();
      FenceRegs(dk);
      FenceRegs(ads);
      continue;
    }
    // dSᵀ rows kw + g (+8), queries 8j + 2t: 4-byte stores into the
    // swizzled panel ((kw + g) mod 8 = g).
    {
      const uint32_t r0 = sds + (kw + g) * 128 + 4 * t, r8 = r0 + 8 * 128;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t c = (j ^ g) * 16;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(r0 + c), "r"(ads[j / 2][(j % 2) * 2]));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(r8 + c), "r"(ads[j / 2][(j % 2) * 2 + 1]));
      }
    }
    FenceProxyAsync();
    // The bulk reductions two dQ steps back have read staging buffer dq_buf
    // (the last step's may still run); the barrier below tells everyone.
    if (T::kBulkDq && tid % 128 < kM) BulkWaitRead<1>();
    __syncthreads();  // dSᵀ complete

    // dQ[64 queries x D/2 columns from col0] += dS K over all 128 keys:
    // A = dS (MN-major: dSᵀ rows are keys), B = K's columns (MN-major: panel
    // col0 / 64, starting (col0 mod 64)·2 bytes into its rows), k steps of
    // 16 keys. D = 128: m64n64; D = 64: m64n32.
    constexpr int kDqN = D / 2;
    const int col0 = wg * kDqN;
    const uint32_t kcols = sk + (col0 / 64) * kPanelKV + (col0 % 64) * 2;
    float dq[kDqN / 2];
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint64_t a = Desc128B(sds + kk * 16 * 128, kPanelKV, 1024);
      const uint64_t b = Desc128B(kcols + kk * 16 * 128, kPanelKV, 1024);
      if constexpr (D == 128) WgmmaM64N64SS<true>(dq, a, b, kk > 0);
      else WgmmaM64N32SS<true>(dq, a, b, kk > 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(dk);
    FenceRegs(ads);
    FenceRegs(dq);
    if constexpr (T::kBulkDq) {
      // dQ into this warpgroup's staging rows, then one bulk reduction a query
      // row adds them to the f32 dQ (the TMA unit's work, where atomics took
      // kDqN / 4 instructions a thread).
      float* stage = dq_stage + (dq_buf * 2 + wg) * kM * T::kStageLd;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float* row = stage + (warp * 16 + g + 8 * r) * T::kStageLd + 2 * t;
#pragma unroll
        for (int j = 0; j < kDqN / 8; ++j)
          *reinterpret_cast<float2*>(row + 8 * j) = make_float2(dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
      }
      FenceProxyAsync();
      NamedBarSync(1 + wg, 128);  // the warpgroup's rows are staged
      if (const int rl = tid % 128; rl < kM) {
        if (i0 + rl < nq)
          BulkReduceAddF32(p.dq_acc + ((q0 + i0 + rl) * p.hq + h) * D + col0, SmemAddr(stage + rl * T::kStageLd),
                           kDqN * 4);
        BulkCommit();  // one group a dQ step, empty or not: the waits count them
      }
      dq_buf ^= 1;
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + warp * 16 + g + 8 * r;
        if (i >= nq) continue;
        float* dst = p.dq_acc + ((q0 + i) * p.hq + h) * D + col0 + 2 * t;
#pragma unroll
        for (int j = 0; j < kDqN / 8; ++j) AtomicAdd2(dst + 8 * j, dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
      }
    }
    // The next step's barrier orders these reads of dSᵀ before the next writes.
  }
  CpAsyncWait<0>();
  if (T::kBulkDq && tid % 128 < kM) BulkWait<0>();  // the staging buffers outlive the reductions

  // dK ·= scale; this thread's keys kw + g (+8), columns 8j + 2t.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + kw + g + 8 * r;
    if (j >= nk) continue;
    __nv_bfloat16* dkr = p.dk + (k0 + j) * ldk + kvh * D + 2 * t;
    __nv_bfloat16* dvr = p.dv + (k0 + j) * ldk + kvh * D + 2 * t;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      *reinterpret_cast<uint32_t*>(dkr + 8 * c) = PackBf16(dk[4 * c + 2 * r] * p.scale, dk[4 * c + 2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvr + 8 * c) = PackBf16(dv[4 * c + 2 * r], dv[4 * c + 2 * r + 1]);
    }
  }
#else
  __trap();  // sm_90a code only (sm90.cuh)
#endif
}

}  // namespace

void LaunchBackwardSm90(const Params& p, int64_t d, int64_t max_k, int64_t rows, cudaStream_t stream) {
  const dim3 grid(p.hk, (max_k + 127) / 128, rows);  // heaviest (first) key tiles first
  if (max_k == 0 || rows == 0) return;
  // The maps end where the last row does: boxes past it read zeros (tokens
  // in no row may hold anything, NaN included). Without queries no block
  // loads a tile (each still writes dk = dv = 0): k's map stands in.
  constexpr int kRows = Sm90BwdTile<64>::kM;
  BwdMaps maps;
  maps.q = p.q_end > 0 ? Bf16TokenPanelMap(p.q, p.q_end, p.hq, d, kRows) : Bf16TokenPanelMap(p.k, p.k_end, p.hk, d, kRows);
  maps.d_o = p.q_end > 0 ? Bf16TokenPanelMap(p.d_o, p.q_end, p.hq, d, kRows) : maps.q;
  if (d == 64) {
    using T = Sm90BwdTile<64>;
    LaunchTiles<FlashBackwardSm90Kernel<64>>(grid, T::kThreads, T::kSmem, stream, p, maps);
  } else {
    using T = Sm90BwdTile<128>;
    LaunchTiles<FlashBackwardSm90Kernel<128>>(grid, T::kThreads, T::kSmem, stream, p, maps);
  }
}

}  // namespace loom::ops::cuda::flash
