// Loom's flash attention backward KV pass on Hopper warpgroup MMA (wgmma),
// D = 64 and 128 (FA3's backward, Shah et al. 2024); the passes around it
// are in ops/cuda/flash_attention_backward.cu:
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
//                                        memory, staged there and added to
//                                        the f32 dQ by TMA tensor reductions
//   in five wgmma groups, each overlapped with the element-wise work that
//   follows its issue: Sᵀ | dPᵀ (runs while Pᵀ is formed) | dV (while dSᵀ is
//   formed) | dK (while dSᵀ goes to shared memory) | dQ. dQ is split by
//   column: warpgroup w takes columns w·D/2.. over all 128 keys. dQ is
//   skipped in deterministic mode (p.dq_acc null).
// Block order (the grid's z is the row): in a large grid the key tile is
// innermost (x, the KV head y), so the blocks on the SMs at a time are
// neighbouring key tiles of one head, which read the same Q and dO rows
// while these are in L2 (64K, Hk 32, H100: L2 hit rate 98.8%, DRAM 1.4%
// busy, against 75% and 31% with the heads innermost). In a small grid the
// KV head is innermost (x, the key tile y), so every head's heaviest tiles
// (the first, under a causal mask) start first: with the key tiles innermost
// the last head's tile 0 starts late and ends last. The longest block is
// about 2·SMs / blocks of an SM's share of the work (causal), so the small
// grid is the one under 20 blocks an SM, where that tail could pass 10%
// (gpu_1b_softmax's micro-batch at 8K, Hk 4: 256 blocks; the bench at 8K,
// D = 64, Hk 4, batch 8: 2048 blocks, 3-5% slower with key tiles innermost;
// 64K, Hk 8: 4096 blocks, 17-20% faster).
// Shared memory: 64-column panels with the 128-byte swizzle (ops/cuda/
// sm90.cuh). K, V [128][D]; Q, dO [2 buffers][64][D]; dSᵀ [128 keys][64
// queries]; lse2, Δ [2][64] f32; each key's visible queries [2][128] i32;
// dQ staging [2][2 warpgroups][64][D/2] f32; four mbarriers: 211 KB for
// D = 128, 115 KB for D = 64.
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
  static constexpr int kM = 64, kN = 128;
  static constexpr int kProducers = 128, kConsumers = 256, kThreads = kProducers + kConsumers;
  static constexpr int kKV = kN * D * 2, kQ = kM * D * 2, kDs = kN * kM * 2;
  // dQ staging, a warpgroup's 64 queries x D/2 f32 columns as 128-byte
  // swizzled boxes of 32 columns, [2 buffers][2 warpgroups].
  static constexpr int kStageBytes = kM * (D / 2) * 4, kStage = 2 * 2 * kStageBytes;
  // K | V | Q [2] | dO [2] | dSᵀ | dQ staging | stats | the queries each key
  // sees | 4 mbarriers; +1024 to align the base.
  static constexpr int kStats = 2 * kKV + 4 * kQ + kDs + kStage;
  static constexpr int kBars = kStats + 4 * kM * 4 + 2 * kN * 4;
  static constexpr int kSmem = kBars + 4 * 8 + 1024;
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

// The TMA maps: q and dO in boxes of 64 tokens by 64 columns of one head,
// the f32 dQ in boxes of 64 tokens by 32 columns.
struct BwdMaps {
  CUtensorMap q, d_o, dq;
};

// One block an SM (D = 64 would fit two by shared memory, but not by
// registers). FA3's roles: warpgroup 0 is the producer (setmaxnreg down to
// 24): its warp 0 loads each step's Q and dO by TMA and lse2, Δ by cp.async
// onto the buffer's `full` mbarrier, once the consumers have released the
// buffer's previous step (`empty`); its other warps idle. Warpgroups 1
// and 2 are the consumers (setmaxnreg up to 240: dK 64 + dV 64 + Sᵀ 32 +
// dPᵀ 32 f32 a thread), which meet only around dSᵀ: named barrier 1 (dSᵀ
// complete, before dQ) and barriers 2 and 3 (warpgroup 0's, 1's dQ has read
// dSᵀ, before the next step overwrites it). dQ goes out as TMA tensor
// reductions, one per warpgroup, step and 32 columns, issued by one thread
// of the warpgroup: a dQ warp issuing one bulk reduction per query row (128
// a step) measured 282-293 TFLOP/s and vector atomics 389-403 at 16K and
// 64K, D = 128 (H100), against 457-472 for these (docs/kernels/attention.md).
template <int D>
__global__ void __launch_bounds__(Sm90BwdTile<D>::kThreads, 1)
    FlashBackwardSm90Kernel(const Params p, const __grid_constant__ BwdMaps maps, bool heads_inner) {
#if LOOM_SM90A
  using T = Sm90BwdTile<D>;
  constexpr int kM = T::kM, kN = T::kN, kAcc = D / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw), sk = (raw + 1023) & ~1023u;
  const uint32_t sv = sk + T::kKV, sq0 = sv + T::kKV, sdo0 = sq0 + 2 * T::kQ, sds = sdo0 + 2 * T::kQ;
  const uint32_t sstage = sds + T::kDs;
  float* stats = reinterpret_cast<float*>(smem_raw + (sk - raw) + T::kStats);  // [2][lse2 kM, Δ kM]
  // Key kw's visible queries are [seen[kw], seen[kN + kw]) (in shared memory:
  // the loop has no registers to spare).
  int* seen = reinterpret_cast<int*>(stats + 4 * kM);
  // The n-th active step uses buffer n mod 2 of Q, dO and the stats, and
  // completes phase (n / 2) mod 2 of that buffer's mbarriers.
  const uint32_t bars = sk + T::kBars;
  auto full = [bars](int b) { return bars + 8 * b; };
  auto empty = [bars](int b) { return bars + 8 * (2 + b); };

  const int kvh = heads_inner ? blockIdx.x : blockIdx.y, row = blockIdx.z;
  const int j0 = (heads_inner ? blockIdx.y : blockIdx.x) * kN;
  const MaskArgs mask = RowMask(p, row);
  const int q0 = p.cu_q[row], nq = mask.nq, k0 = p.cu_k[row], nk = mask.nk;
  if (j0 >= nk) return;
  const int tid = threadIdx.x;

  // The query tiles that see a key of this tile: none before the causal
  // bound, none outside its keys' documents.
  int i_lo, i_hi;
  mask.QueriesOf(j0, min(j0 + kN, nk), i_lo, i_hi);
  if (p.causal) i_lo = max(i_lo, j0 + p.shift);
  const int it_begin = max(0, i_lo) / kM;
  const int it_end = (i_hi + kM - 1) / kM;
  const int n_it = max(0, it_end - it_begin);
  const int steps = n_it * static_cast<int>(p.group);
  // Step s is query head head(s) and query tile row0(s). MoH: a step whose
  // (query head, query tile) is skipped is no step for any role.
  auto head = [&](int s) { return static_cast<int>(kvh * p.group) + s / n_it; };
  auto row0 = [&](int s) { return (it_begin + s % n_it) * kM; };
  auto active = [&](int s) { return QueryTileActive(p, head(s), q0 + row0(s), min(kM, nq - row0(s))); };

  if (tid == 0) {
    for (int b = 0; b < 2; ++b) {
      MbarInit(full(b), 1 + 32);  // the TMA's expect_tx and warp 0's 32 stats loaders
      MbarInit(empty(b), T::kConsumers);
    }
    FenceBarrierInit();
  }
  __syncthreads();

  // ------------------------------------------------------------ producer
  if (tid < T::kProducers) {
    SetMaxRegsDec<24>();
    const int warp = tid / 32, lane = tid % 32;
    if (warp == 0) {
      // Q, dO: boxes of 64 tokens by 64 columns of one head, past the row's
      // end into the next row's tokens or zeros (those queries are masked).
      for (int s = 0, n = 0; s < steps; ++s) {
        if (!active(s)) continue;
        const int b = n & 1, h = head(s), i0 = row0(s);
        if (n >= 2) MbarWait(empty(b), ((n >> 1) & 1) ^ 1);  // step n − 2 released it
        if (lane == 0) {
          MbarArriveExpectTx(full(b), 2 * T::kQ);
#pragma unroll
          for (int c = 0; c < D / 64; ++c) {
            TmaLoad3d(sq0 + b * T::kQ + c * kM * 128, &maps.q, c * 64, h, q0 + i0, full(b));
            TmaLoad3d(sdo0 + b * T::kQ + c * kM * 128, &maps.d_o, c * 64, h, q0 + i0, full(b));
          }
        }
        if (!p.sigmoid) {
#pragma unroll
          for (int e = lane; e < 2 * kM; e += 32) {
            const int r = e % kM;
            const bool ok = i0 + r < nq;
            const float* src = (e < kM ? p.lse2 : p.delta) + h * p.tq + q0 + i0 + (ok ? r : 0);
            CpAsync4(SmemAddr(stats + b * 2 * kM + e), src, ok);
          }
          CpAsyncCommit();
          CpAsyncWait<0>();
        }
        MbarArrive(full(b));
        ++n;
      }
    }
    return;
  }

  // ------------------------------------------------------------ consumers
  SetMaxRegsInc<240>();
  const int ctid = tid - T::kProducers;
  const int wg = ctid / 128, warp = (ctid % 128) / 32, lane = ctid % 32, g = lane / 4, t = lane % 4;
  const int64_t ldk = p.hk * D;
  if (ctid < kN) mask.QueriesSeeing(j0 + ctid, seen[ctid], seen[kN + ctid]);
  LoadPanels<kN, D, T::kConsumers>(sk, p.k + (k0 + j0) * ldk + kvh * D, ldk, nk - j0, ctid);
  LoadPanels<kN, D, T::kConsumers>(sv, p.v + (k0 + j0) * ldk + kvh * D, ldk, nk - j0, ctid);
  CpAsyncCommit();

  float dk[kAcc], dv[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) dk[i] = 0.f, dv[i] = 0.f;
  CpAsyncWait<0>();
  FenceProxyAsync();
  NamedBarSync(4, T::kConsumers);  // K, V and `seen` are in shared memory
  // Every key of the tile sees the queries [all_lo, all_hi): the first key's
  // and the last key's ranges meet (both bounds are non-decreasing along the
  // keys).
  const int all_lo = max(seen[0], seen[kN - 1]), all_hi = min(seen[kN], seen[2 * kN - 1]);

  // This thread's keys (C rows of Sᵀ): kw + g and kw + g + 8.
  const int kw = wg * 64 + warp * 16;
  const bool issuer = ctid % 128 == 0;  // issues its warpgroup's dQ reductions
  constexpr uint32_t kPanelKV = kN * 128, kPanelQ = kM * 128;
  int n = 0;
  for (int s = 0; s < steps; ++s) {
    if (!active(s)) continue;
    const int b = n & 1, h = head(s), i0 = row0(s);
    MbarWait(full(b), (n >> 1) & 1);
    const uint32_t sq = sq0 + b * T::kQ, sdo = sdo0 + b * T::kQ;
    const float* lse2 = stats + b * 2 * kM;
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
    const bool need_mask = i0 < all_lo || i0 + kM > all_hi;
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
    // This thread's queries' Δ (8c + 2t and + 1 for c < 8, in fragment
    // order) into registers while dPᵀ and dV run (lse2's too would spill).
    float delta_r[16];
    if (!p.sigmoid) {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float2 x = *reinterpret_cast<const float2*>(delta + 8 * c + 2 * t);
        delta_r[2 * c] = x.x, delta_r[2 * c + 1] = x.y;
      }
    }
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
      for (int i = 0; i < 32; ++i) dpt[i] = st[i] * (dpt[i] - delta_r[2 * (i / 4) + i % 2]);
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
      MbarArrive(empty(b));  // this step's Q, dO and stats are read
      ++n;
      continue;
    }
    // dSᵀ rows kw + g (+8), queries 8j + 2t: 4-byte stores into the
    // swizzled panel ((kw + g) mod 8 = g), once the other warpgroup's dQ of
    // the step before has read the panel.
    if (n > 0) NamedBarSync(3 - wg, T::kConsumers);
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
    NamedBarSync(1, T::kConsumers);  // dSᵀ complete

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
      const uint64_t bk = Desc128B(kcols + kk * 16 * 128, kPanelKV, 1024);
      if constexpr (D == 128) WgmmaM64N64SS<true>(dq, a, bk, kk > 0);
      else WgmmaM64N32SS<true>(dq, a, bk, kk > 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceRegs(dk);
    FenceRegs(ads);
    FenceRegs(dq);
    NamedBarArrive(2 + wg, T::kConsumers);  // this warpgroup's dQ has read dSᵀ
    MbarArrive(empty(b));                    // and dK has read Q
    // dQ into this warpgroup's staging tile of buffer b (free once the
    // reduction of step n − 2 has read it), then one thread adds the tile to
    // the f32 dQ by TMA, one box of 32 columns at a time. Queries past the
    // row's end hold exact zeros (their P is masked), so a box reaching into
    // the next row adds nothing there; the map drops tokens past the last row.
    const uint32_t stage = sstage + (b * 2 + wg) * T::kStageBytes;
    if (issuer) BulkWaitRead<1>();
    NamedBarSync(5 + wg, 128);  // the buffer is free
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qr = warp * 16 + g + 8 * r;  // qr mod 8 = g
#pragma unroll
      for (int j = 0; j < kDqN / 8; ++j) {
        // Columns 8j + 2t, +1: box j / 4, 16-byte chunk (2 (j mod 4) + t / 2) ^ g.
        const uint32_t at = stage + (j / 4) * (kM * 128) + qr * 128 + (((2 * (j % 4) + t / 2) ^ g) * 16) + (t % 2) * 8;
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at), "f"(dq[4 * j + 2 * r]), "f"(dq[4 * j + 2 * r + 1]));
      }
    }
    FenceProxyAsync();
    NamedBarSync(5 + wg, 128);  // the tile is staged
    if (issuer) {
#pragma unroll
      for (int c = 0; c < kDqN / 32; ++c) TmaReduceAdd3d(&maps.dq, stage + c * kM * 128, col0 + 32 * c, h, q0 + i0);
      BulkCommit();
    }
    ++n;
  }
  // Pairs the other warpgroup's last "dQ has read dSᵀ" arrival.
  if (p.dq_acc && n > 0) NamedBarSync(3 - wg, T::kConsumers);
  if (p.dq_acc && issuer) BulkWait<0>();  // the staging outlives the reductions

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
  if (max_k == 0 || rows == 0) return;  // else k_end > 0 (CheckDeviceRows)
  constexpr int kN = Sm90BwdTile<64>::kN;
  static const int sms = [] {
    int device = 0, n = 0;
    LOOM_CUDA_CHECK(cudaGetDevice(&device));
    LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  const int64_t tiles = (max_k + kN - 1) / kN;
  const bool heads_inner = tiles * p.hk * rows < 20 * sms;  // the block order above
  const dim3 grid = heads_inner ? dim3(p.hk, tiles, rows) : dim3(tiles, p.hk, rows);
  // The maps end where the last row does: boxes past it read zeros (tokens
  // in no row may hold anything, NaN included). Without queries no block
  // loads a tile (each still writes dk = dv = 0): k's map stands in.
  constexpr int kRows = Sm90BwdTile<64>::kM;
  BwdMaps maps;
  maps.q = p.q_end > 0 ? Bf16TokenPanelMap(p.q, p.q_end, p.hq, d, kRows) : Bf16TokenPanelMap(p.k, p.k_end, p.hk, d, kRows);
  maps.d_o = p.q_end > 0 ? Bf16TokenPanelMap(p.d_o, p.q_end, p.hq, d, kRows) : maps.q;
  maps.dq = p.dq_acc && p.q_end > 0 ? F32TokenPanelMap(p.dq_acc, p.q_end, p.hq, d, kRows) : CUtensorMap{};
  if (d == 64) {
    using T = Sm90BwdTile<64>;
    LaunchTiles<FlashBackwardSm90Kernel<64>>(grid, T::kThreads, T::kSmem, stream, p, maps, heads_inner);
  } else {
    using T = Sm90BwdTile<128>;
    LaunchTiles<FlashBackwardSm90Kernel<128>>(grid, T::kThreads, T::kSmem, stream, p, maps, heads_inner);
  }
}

}  // namespace loom::ops::cuda::flash
