// Loom's flash attention forward for Hopper, FA3 design (Shah et al. 2024,
// "FlashAttention-3"): warpgroup MMA (wgmma) on bf16 tiles in 128-byte
// swizzled shared memory, a producer warpgroup whose one thread streams Q, K
// and V tiles in by TMA completing on mbarriers, and two consumer warpgroups of
// 64 query rows each. The math is ops/softmax_attention.h's (masks, LSE,
// sigmoid: ops/cuda/flash_common.cuh):
//   S = Q Kᵀ (wgmma, Q and K from shared memory, f32 accumulators),
//   m' = max(m, rowmax(S·c)), c = scale·log2(e), P = 2^(S·c − m'),
//   l' = 2^(m − m') l + rowsum(P), O' = 2^(m − m') O + P V
//   (wgmma, P from registers as the A operand, V from shared memory),
//   at the end O /= l, lse = (m + log2 l)·ln 2.
//   Sigmoid: P = σ(scale·S + b) on visible entries, O = Σ P V, no m, l, lse.
// One block = kM = 128 queries of one row and one query head; it walks its
// key tiles (kN = 128) from the last (the causal diagonal, masked) to the
// first, through three K and V stages. A consumer step (j this tile, j' the
// previous one), FA3's intra-warpgroup overlap:
//   [turn] issue S_j = Q K_jᵀ; O ·= α_{j'} (the rescale the softmax of step
//   j' computed); issue O += P_{j'} V_{j'} [end of turn]; wait S_j; softmax
//   of S_j (P_j, α_j) while P·V runs; wait P·V.
// The turns alternate between the two consumer warpgroups (FA3's pingpong,
// two named barriers), so that one's softmax runs under the other's wgmmas.
// Shared memory (D = 128): Q 32 KB, K and V three stages of 32 KB each:
// 224 KB, one block an SM. 384 threads start with 168 registers each; the
// producer warpgroup gives back to 40 and the consumers take 232 (O 64 + S 64
// + P 32 a consumer thread) through setmaxnreg: 128·40 + 256·232 ≤ 64 Ki.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ops/cuda/flash_common.cuh"
#include "ops/cuda/sm90.cuh"
#include "ops/cuda/tensor_map.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda::flash {
namespace {

using namespace sm90;

template <int D>
struct Sm90FwdTile {
  static constexpr int kM = 128, kN = 128, kStages = 3;
  static constexpr int kProducers = 128, kConsumers = 256, kThreads = kProducers + kConsumers;
  static constexpr int kQBytes = kM * D * 2, kTileBytes = kN * D * 2;
  // Q | K stages | V stages | 1 + 4·kStages mbarriers; +1024 to align the base.
  // D = 128: 32 + 96 + 96 KB, under the 227 KB a block may have.
  static constexpr int kBarOffset = kQBytes + 2 * kStages * kTileBytes;
  static constexpr int kSmem = kBarOffset + 8 * (1 + 4 * kStages) + 1024;
  static_assert(kSmem <= 227 * 1024, "shared memory over the sm_90 per-block limit");
};

// The TMA maps of q, k, v: boxes of 128 tokens by 64 columns of one head.
struct FwdMaps {
  CUtensorMap q, k, v;
};

template <int D>
__global__ void __launch_bounds__(Sm90FwdTile<D>::kThreads, 1)
    FlashForwardSm90Kernel(const Params p, const __grid_constant__ FwdMaps maps) {
#if LOOM_SM90A
  using T = Sm90FwdTile<D>;
  constexpr int kM = T::kM, kN = T::kN;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t sq = (SmemAddr(smem_raw) + 1023) & ~1023u;
  const uint32_t sk = sq + T::kQBytes, sv = sk + T::kStages * T::kTileBytes;
  // Barriers: 0 Q full; per stage s: K full, V full, K empty, V empty.
  const uint32_t bars = sq + T::kBarOffset;
  constexpr int S = T::kStages;
  auto k_full = [bars](int s) { return bars + 8 * (1 + s); };
  auto v_full = [bars](int s) { return bars + 8 * (1 + S + s); };
  auto k_empty = [bars](int s) { return bars + 8 * (1 + 2 * S + s); };
  auto v_empty = [bars](int s) { return bars + 8 * (1 + 3 * S + s); };
  // Step `it` uses stage it mod S; its fill is phase (it / S) mod 2 of that
  // stage's barriers.
  auto stage = [](int it) { return it % S; };
  auto phase = [](int it) { return static_cast<uint32_t>((it / S) & 1); };

  const MaskArgs mask = RowMask(p, blockIdx.z);
  QueryTileBlock b;
  if (!PlaceQueryTile<kM, kN>(p, mask, b)) return;
  // A query tile MoH skips sees no key: o = 0, lse = −∞ (the CPU's skipped rows).
  const int h = b.h, kvh = b.kvh, q0 = b.q0, nq = b.nq, k0 = b.k0, i0 = b.i0, n_tiles = b.n_tiles;
  // Step `it` takes key tile last_tile − it (the diagonal first).
  const int last_tile = b.first_tile + n_tiles - 1;
  const int64_t ldq = p.hq * D;
  const int tid = threadIdx.x;

  if (tid == 0) {
    MbarInit(bars, 1);
    for (int s = 0; s < S; ++s) {
      MbarInit(k_full(s), 1);
      MbarInit(v_full(s), 1);
      MbarInit(k_empty(s), T::kConsumers);
      MbarInit(v_empty(s), T::kConsumers);
    }
    FenceBarrierInit();
  }
  __syncthreads();

  // ------------------------------------------------------------ producer
  // One thread issues every load, as TMA boxes of 128 tokens by 64 columns
  // (one swizzled panel each). Step `it` fills stage it mod S with key tile
  // last_tile − it once the consumers have released that stage's previous
  // tile (step it − S). Boxes run past a row's end into the next row's
  // tokens (zeros past the last row's end): those keys are masked, so their
  // P is 0 and V's rows there add 0, and those queries are never stored.
  if (tid < T::kProducers) {
    SetMaxRegsDec<40>();
    if (n_tiles == 0 || tid != 0) return;
    MbarArriveExpectTx(bars, T::kQBytes);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) TmaLoad3d(sq + c * kM * 128, &maps.q, c * 64, h, q0 + i0, bars);
    for (int it = 0; it < n_tiles; ++it) {
      const int j = k0 + (last_tile - it) * kN, st = stage(it);
      const uint32_t parity = phase(it) ^ 1;  // the release of step it − S
      if (it >= S) MbarWait(k_empty(st), parity);
      MbarArriveExpectTx(k_full(st), T::kTileBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c)
        TmaLoad3d(sk + st * T::kTileBytes + c * kN * 128, &maps.k, c * 64, kvh, j, k_full(st));
      if (it >= S) MbarWait(v_empty(st), parity);
      MbarArriveExpectTx(v_full(st), T::kTileBytes);
#pragma unroll
      for (int c = 0; c < D / 64; ++c)
        TmaLoad3d(sv + st * T::kTileBytes + c * kN * 128, &maps.v, c * 64, kvh, j, v_full(st));
    }
    return;
  }

  // ------------------------------------------------------------ consumers
  SetMaxRegsInc<232>();
  const int wg = tid / 128 - 1, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int iw = i0 + wg * 64 + warp * 16 + g;  // this thread's rows: iw and iw + 8
  int klo[2], khi[2];                            // the keys each row sees
  mask.KeysSeenBy(iw, klo[0], khi[0]);
  mask.KeysSeenBy(iw + 8, klo[1], khi[1]);

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // m in the log2 domain

  // S = Q Kᵀ for the K tile in stage st (issued, not waited).
  const uint64_t qdesc = Desc128B(sq + wg * 64 * 128, 16, 1024);
  auto issue_qk = [&](float (&s)[kN / 2], int st) {
    const uint32_t kt = sk + st * T::kTileBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * 128 * 128 + (kk % 4) * 32;  // panel, 16-column step (kM = kN = 128)
      WgmmaM64N128SS(s, qdesc + (off >> 4), Desc128B(kt + off, 16, 1024), kk > 0);
    }
    WgmmaCommit();
  };
  // O += P V for the V tile in stage st (issued, not waited).
  auto issue_pv = [&](const uint32_t (&pa)[kN / 16][4], int st) {
    const uint32_t vt = sv + st * T::kTileBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint64_t b = Desc128B(vt + kk * 16 * 128, kN * 128, 1024);
      if constexpr (D == 128) WgmmaM64N128RS(o, pa[kk], b);
      else WgmmaM64N64RS(o, pa[kk], b);
    }
    WgmmaCommit();
  };
  // Mask, then P in place of S; alpha = 2^(m_old − m_new) per row.
  auto softmax = [&](float (&s)[kN / 2], int j0, float (&alpha)[2]) {
    if (klo[0] > j0 || khi[0] < j0 + kN || klo[1] > j0 || khi[1] < j0 + kN) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + nt * 8 + 2 * t + (e % 2), r = e / 2;
          if (j < klo[r] || j >= khi[r]) s[4 * nt + e] = -INFINITY;
        }
    }
    if (p.sigmoid) {
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) s[i] = Sigmoid(s[i] * p.scale + p.bias);  // σ(−∞) = 0
      alpha[0] = alpha[1] = 1.f;
      return;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx * p.scale_log2);
      // A row with nothing visible yet keeps m = −∞; subtract 0 then so that
      // 2^(−∞ − (−∞)) never appears.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = Exp2(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float e = Exp2(fmaf(s[4 * nt + 2 * r + c], p.scale_log2, -m_use));
          s[4 * nt + 2 * r + c] = e;
          sum += e;
        }
      l[r] = l[r] * alpha[r] + sum;
    }
  };
  // The S fragment of keys 16kk..16kk+15 is the A fragment of P V as it stands.
  auto to_bf16 = [](const float (&s)[kN / 2], uint32_t (&pa)[kN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk)
#pragma unroll
      for (int q = 0; q < 4; ++q) pa[kk][q] = PackBf16(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
  };

  // Pingpong (FA3): the two warpgroups take turns issuing their wgmmas, so
  // one's softmax runs while the other's products occupy the tensor cores.
  // Warpgroup w waits on named barrier 1 + w; the other opens it. Each takes
  // n_tiles + 1 turns; warpgroup 0 has the first.
  auto my_turn = [&] { NamedBarSync(1 + wg, T::kConsumers); };
  auto your_turn = [&] { NamedBarArrive(2 - wg, T::kConsumers); };
  // O ·= alpha, skipped when neither row's maximum moved (alpha = 1 exactly):
  // past the first tiles of a row that is most tiles.
  auto rescale = [&](const float (&alpha)[2]) {
    if (alpha[0] == 1.f && alpha[1] == 1.f) return;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[4 * dt] *= alpha[0], o[4 * dt + 1] *= alpha[0];
      o[4 * dt + 2] *= alpha[1], o[4 * dt + 3] *= alpha[1];
    }
  };
  if (n_tiles > 0) {
    if (wg == 1) your_turn();
    MbarWait(bars, 0);
    float s[kN / 2], alpha[2];
    uint32_t pa[kN / 16][4];
    MbarWait(k_full(0), 0);
    my_turn();
    issue_qk(s, 0);
    your_turn();
    WgmmaWait<0>();
    FenceRegs(s);
    MbarArrive(k_empty(0));
    softmax(s, last_tile * kN, alpha);  // O is still 0: rescaling it is harmless
    to_bf16(s, pa);
    for (int it = 1; it < n_tiles; ++it) {
      const int st = stage(it), prev = stage(it - 1);
      MbarWait(k_full(st), phase(it));
      MbarWait(v_full(prev), phase(it - 1));
      my_turn();
      issue_qk(s, st);
      rescale(alpha);  // by the last softmax's alpha; O is idle until P_{j'} V_{j'} below
      issue_pv(pa, prev);
      your_turn();
      WgmmaWait<1>();  // S_j landed; P_{j'} V_{j'} may still run
      FenceRegs(s);
      MbarArrive(k_empty(st));
      softmax(s, (last_tile - it) * kN, alpha);
      WgmmaWait<0>();
      FenceRegs(o);
      MbarArrive(v_empty(prev));
      to_bf16(s, pa);
    }
    const int last = stage(n_tiles - 1);
    MbarWait(v_full(last), phase(n_tiles - 1));
    my_turn();
    rescale(alpha);
    issue_pv(pa, last);
    if (wg == 0) your_turn();  // warpgroup 1's last turn opens nothing
    WgmmaWait<0>();
    FenceRegs(o);
    MbarArrive(v_empty(last));
  }

  // O /= l, lse = (m + log2 l) ln 2; straight from the accumulators to global.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = iw + 8 * r;
    float inv = 1.f;
    if (!p.sigmoid) {
      float sum = l[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv = sum > 0.f ? 1.f / sum : 0.f;
      if (t == 0 && i < nq) p.lse[(q0 + i) * p.hq + h] = sum > 0.f ? (m[r] + log2f(sum)) * kLn2 : -INFINITY;
    }
    if (i < nq) {
      __nv_bfloat16* orow = p.out + (q0 + i) * ldq + h * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = PackBf16(o[4 * dt + 2 * r] * inv, o[4 * dt + 2 * r + 1] * inv);
    }
  }
#else
  __trap();  // sm_90a code only (sm90.cuh)
#endif
}

template <int D>
void Launch(const Params& p, int64_t max_q, int64_t rows, cudaStream_t stream) {
  using T = Sm90FwdTile<D>;
  static_assert(T::kM == T::kN, "one box shape for Q, K and V");
  if (max_q == 0 || rows == 0) return;  // else q_end > 0 (CheckDeviceRows)
  FwdMaps maps;
  // The maps end where the last row does, so that a box past it reads zeros
  // (tokens in no row may hold anything, NaN included).
  maps.q = Bf16TokenPanelMap(p.q, p.q_end, p.hq, D, T::kM);
  // Without keys no block loads K or V: q's map stands in.
  maps.k = p.k_end > 0 ? Bf16TokenPanelMap(p.k, p.k_end, p.hk, D, T::kN) : maps.q;
  maps.v = p.k_end > 0 ? Bf16TokenPanelMap(p.v, p.k_end, p.hk, D, T::kN) : maps.q;
  LaunchTiles<FlashForwardSm90Kernel<D>>(dim3((max_q + T::kM - 1) / T::kM, p.hq, rows), T::kThreads, T::kSmem, stream,
                                         p, maps);
}

}  // namespace

void LaunchForwardSm90(const Params& p, int64_t d, int64_t max_q, int64_t rows, cudaStream_t stream) {
  if (d == 64) Launch<64>(p, max_q, rows, stream);
  else Launch<128>(p, max_q, rows, stream);
}

}  // namespace loom::ops::cuda::flash
