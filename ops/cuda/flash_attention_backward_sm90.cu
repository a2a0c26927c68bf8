// Loom's flash attention backward KV pass on Hopper warpgroup MMA (wgmma),
// D = 128 (FA3's backward, Shah et al. 2024, without its producer warp): the
// same math and schedule as FlashBackwardKernel (ops/cuda/
// flash_attention_backward.cu), with every product a wgmma reading its tiles
// straight from shared memory instead of ldmatrix fragments:
//   one block = 128 keys of one KV head, two warpgroups of 64 keys each;
//   dK, dV [64 keys x 128] f32 stay in a warpgroup's registers (64 + 64 a
//   thread) while the block walks every query tile (64 queries) of every
//   query head of the GQA group; per query tile:
//     Sᵀ = K_w Qᵀ, dPᵀ = V_w dOᵀ        m64n64k16, A and B from shared memory
//     Pᵀ = 2^(Sᵀ·c − lse·log2 e), dSᵀ = Pᵀ ⊙ (dPᵀ − Δ) (sigmoid as there)
//     dV += Pᵀ dO, dK += dSᵀ Q          m64n128k16, A = Pᵀ / dSᵀ in registers
//     dQ[:, 64w..64w+63] += dS K        m64n64k16, dSᵀ through shared memory,
//                                        added to the f32 dQ with atomics
//   (dQ is skipped in deterministic mode, as there).
// Shared memory: tiles of 128-byte rows (64 bf16) in "panels" with the
// 128-byte swizzle: row r at r·128, its 16-byte chunk c at c ^ (r mod 8),
// each panel 1024-byte aligned; a 128-wide row is two panels.
//   K, V [128][128]: 2 panels of 16 KB each; Q, dO [2 buffers][64][128]: 2
//   panels of 8 KB a buffer; dSᵀ [128 keys][64 queries]: 1 panel of 16 KB;
//   lse2, Δ [2][64] f32. 145 KB, one block an SM.
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

#include "ops/cuda/flash_common.cuh"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda::flash {
namespace {

// ---------------------------------------------------------------- wgmma PTX

__device__ __forceinline__ uint64_t Desc128B(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void WgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgWait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy writes (cp.async, st.shared) before async-proxy reads (wgmma).
__device__ __forceinline__ void FenceProxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// After a wait: the accumulators changed here as far as the compiler knows.
template <int N>
__device__ __forceinline__ void Touch(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Keeps register A operands alive (unchanged) until after the wait.
template <int N>
__device__ __forceinline__ void Touch(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a[i][r])::"memory");
}

#define LOOM_W4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define LOOM_W16(d, i) LOOM_W4(d, i), LOOM_W4(d, i + 4), LOOM_W4(d, i + 8), LOOM_W4(d, i + 12)
#define LOOM_W32(d, i) LOOM_W16(d, i), LOOM_W16(d, i + 16)
#define LOOM_R32                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define LOOM_R64                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d[64x64] (+)= A[64x16] · B[16x64], both from shared memory; kTrans: A and
// B MN-major (imm-trans-a = imm-trans-b = 1), else both K-major.
template <bool kTrans>
__device__ __forceinline__ void WgmmaM64N64SS(float (&d)[32], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LOOM_R32 ", %32, %33, p, 1, 1, %35, %35;\n}\n"
      : LOOM_W32(d, 0)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)), "n"(kTrans ? 1 : 0));
}

// d[64x128] += A[64x16] · B[16x128]; A in registers (mma.m16n8k16's A
// fragment per warp), B MN-major in shared memory.
__device__ __forceinline__ void WgmmaM64N128RS(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n .reg .pred p;\n setp.eq.u32 p, 1, 1;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " LOOM_R64
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : LOOM_W32(d, 0), LOOM_W32(d, 32)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

#undef LOOM_R64
#undef LOOM_R32
#undef LOOM_W32
#undef LOOM_W16
#undef LOOM_W4

// kRows x 128 tile of token-major rows (stride `ld`) into two swizzled
// panels by 256 threads; rows ≥ valid read as zeros.
template <int kRows>
__device__ __forceinline__ void LoadPanels(uint32_t smem, const __nv_bfloat16* base, int64_t ld, int valid,
                                           int tid) {
  constexpr int kRowsPerPass = 256 / 16;
  const int c = tid % 16, r0 = tid / 16;
  const uint32_t panel = smem + (c / 8) * (kRows * 128);
  const __nv_bfloat16* src = base + r0 * ld + c * 8;
#pragma unroll
  for (int r = r0; r < kRows; r += kRowsPerPass) {
    const bool ok = r < valid;
    CpAsync16(panel + r * 128 + (((c & 7) ^ (r & 7)) << 4), ok ? src : base, ok);
    src += kRowsPerPass * ld;
  }
}

struct Sm90BwdTile {
  static constexpr int kM = 64, kN = 128, kD = 128, kThreads = 256;
  static constexpr int kKV = kN * kD * 2, kQ = kM * kD * 2, kDs = kN * kM * 2;
  // K | V | Q [2] | dO [2] | dSᵀ | stats; +1024 to align the base.
  static constexpr int kStats = 2 * kKV + 4 * kQ + kDs;
  static constexpr int kSmem = kStats + 4 * kM * 4 + 1024;
};

__global__ void __launch_bounds__(Sm90BwdTile::kThreads, 1) FlashBackwardSm90Kernel(const Params p) {
  using T = Sm90BwdTile;
  constexpr int kM = T::kM, kN = T::kN, D = T::kD;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw), sk = (raw + 1023) & ~1023u;
  const uint32_t sv = sk + T::kKV, sq0 = sv + T::kKV, sdo0 = sq0 + 2 * T::kQ, sds = sdo0 + 2 * T::kQ;
  float* stats = reinterpret_cast<float*>(smem_raw + (sk - raw) + T::kStats);  // [2][lse2 kM, Δ kM]

  const int kvh = blockIdx.y, row = blockIdx.z;
  const int j0 = blockIdx.x * kN;
  const int q0 = p.cu_q[row], nq = p.cu_q[row + 1] - q0;
  const int k0 = p.cu_k[row], nk = p.cu_k[row + 1] - k0;
  if (j0 >= nk) return;
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const MaskArgs mask{p.causal, p.shift, p.doc_q ? p.doc_q + q0 : nullptr, p.doc_k ? p.doc_k + k0 : nullptr, nq, nk};

  int it_begin = 0;
  if (p.causal) it_begin = max(0, j0 + p.shift) / kM;
  const int it_end = (nq + kM - 1) / kM;
  const int n_it = max(0, it_end - it_begin);
  const int steps = n_it * static_cast<int>(p.group);

  const int64_t ldq = p.hq * D, ldk = p.hk * D;
  // MoH: a step whose (query head, query tile) is skipped loads and computes
  // nothing (every thread decides alike, so the barriers still pair up).
  auto step_active = [&](int s) {
    const int i0 = (it_begin + s % n_it) * kM;
    return QueryTileActive(p, kvh * p.group + s / n_it, q0 + i0, min(kM, nq - i0));
  };
  auto issue = [&](int s, int buf) {
    const int h = kvh * p.group + s / n_it, i0 = (it_begin + s % n_it) * kM;
    const int64_t off = (q0 + i0) * ldq + h * D;
    LoadPanels<kM>(sq0 + buf * T::kQ, p.q + off, ldq, nq - i0, tid);
    LoadPanels<kM>(sdo0 + buf * T::kQ, p.d_o + off, ldq, nq - i0, tid);
    if (!p.sigmoid && tid < 2 * kM) {
      const int r = tid % kM;
      const bool ok = i0 + r < nq;
      const float* src = (tid < kM ? p.lse2 : p.delta) + h * p.tq + q0 + i0 + (ok ? r : 0);
      CpAsync4(SmemAddr(stats + buf * 2 * kM + tid), src, ok);
    }
  };

  LoadPanels<kN>(sk, p.k + (k0 + j0) * ldk + kvh * D, ldk, nk - j0, tid);
  LoadPanels<kN>(sv, p.v + (k0 + j0) * ldk + kvh * D, ldk, nk - j0, tid);
  if (steps > 0 && step_active(0)) issue(0, 0);
  CpAsyncCommit();

  float dk[64], dv[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) dk[i] = 0.f, dv[i] = 0.f;

  // This thread's keys (C rows of Sᵀ): kw + g and kw + g + 8.
  const int kw = wg * 64 + warp * 16;
  constexpr uint32_t kPanelKV = kN * 128, kPanelQ = kM * 128;
  for (int s = 0; s < steps; ++s) {
    const int buf = s & 1;
    const int h = kvh * p.group + s / n_it, i0 = (it_begin + s % n_it) * kM;
    CpAsyncWait<0>();
    FenceProxy();
    __syncthreads();  // step s landed and is visible to wgmma; buffer buf ^ 1 is free
    if (s + 1 < steps && step_active(s + 1)) issue(s + 1, buf ^ 1);
    CpAsyncCommit();
    if (!step_active(s)) continue;
    const uint32_t sq = sq0 + buf * T::kQ, sdo = sdo0 + buf * T::kQ;
    const float* lse2 = stats + buf * 2 * kM;
    const float* delta = lse2 + kM;

    // Sᵀ = K_w Qᵀ and dPᵀ = V_w dOᵀ: [64 keys x 64 queries] a warpgroup.
    float st[32], dpt[32];
    WgFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk / 4) * kPanelKV + wg * 64 * 128 + (kk % 4) * 32;
      const uint32_t qoff = (kk / 4) * kPanelQ + (kk % 4) * 32;
      WgmmaM64N64SS<false>(st, Desc128B(sk + koff, 16, 1024), Desc128B(sq + qoff, 16, 1024), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t koff = (kk / 4) * kPanelKV + wg * 64 * 128 + (kk % 4) * 32;
      const uint32_t qoff = (kk / 4) * kPanelQ + (kk % 4) * 32;
      WgmmaM64N64SS<false>(dpt, Desc128B(sv + koff, 16, 1024), Desc128B(sdo + qoff, 16, 1024), kk > 0);
    }
    WgCommit();
    WgWait0();
    Touch(st);
    Touch(dpt);

    // Pᵀ into st, dSᵀ into dpt. Element i of the C fragment: key
    // kw + g + 8·(i mod 4 / 2), query 8·(i / 4) + 2t + i mod 2.
    const bool need_mask = (p.causal && i0 - p.shift < j0 + kN - 1) || i0 + kM > nq || j0 + kN > nk ||
                           mask.qdoc != nullptr;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int il = 8 * (i / 4) + 2 * t + (i % 2);
      const bool visible = !need_mask || mask.Visible(i0 + il, j0 + kw + g + 8 * ((i % 4) / 2));
      float pe, ds;
      if (p.sigmoid) {
        pe = 1.f / (1.f + exp2f(-(st[i] * p.scale + p.bias) * kLog2e));
        ds = pe * (1.f - pe) * dpt[i];
      } else {
        pe = exp2f(fmaf(st[i], p.scale_log2, -lse2[il]));
        ds = pe * (dpt[i] - delta[il]);
      }
      st[i] = visible ? pe : 0.f;
      dpt[i] = visible ? ds : 0.f;
    }

    // dV += Pᵀ dO, dK += dSᵀ Q over the 64 queries (k steps of 16).
    uint32_t ap[4][4], ads[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = 8 * kk + 2 * r;  // (g, 2t) (g+8, 2t) (g, 2t+8) (g+8, 2t+8)
        ap[kk][r] = PackBf16(st[i], st[i + 1]);
        ads[kk][r] = PackBf16(dpt[i], dpt[i + 1]);
      }
    WgFence();
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) WgmmaM64N128RS(dv, ap[kk], Desc128B(sdo + kk * 16 * 128, kPanelQ, 1024));
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) WgmmaM64N128RS(dk, ads[kk], Desc128B(sq + kk * 16 * 128, kPanelQ, 1024));
    WgCommit();

    if (p.dq_acc) {
      // dSᵀ rows kw + g (+8), queries 8j + 2t: 4-byte stores into the
      // swizzled panel ((kw + g) mod 8 = g).
      const uint32_t r0 = sds + (kw + g) * 128 + 4 * t, r8 = r0 + 8 * 128;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t c = (j ^ g) * 16;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(r0 + c), "r"(ads[j / 2][(j % 2) * 2]));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(r8 + c), "r"(ads[j / 2][(j % 2) * 2 + 1]));
      }
      FenceProxy();
    }
    WgWait0();
    Touch(dv);
    Touch(dk);
    Touch(ap);
    Touch(ads);
    if (!p.dq_acc) continue;
    __syncthreads();  // dSᵀ complete

    // dQ[64 queries x 64 columns 64w..] += dS K: A = dS (MN-major: dSᵀ rows
    // are keys), B = K (MN-major), k steps of 16 keys.
    {
      float dq[32];
      WgFence();
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk)
        WgmmaM64N64SS<true>(dq, Desc128B(sds + kk * 16 * 128, kPanelKV, 1024),
                            Desc128B(sk + wg * kPanelKV + kk * 16 * 128, kPanelKV, 1024), kk > 0);
      WgCommit();
      WgWait0();
      Touch(dq);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + warp * 16 + g + 8 * r;
        if (i >= nq) continue;
        float* dst = p.dq_acc + ((q0 + i) * p.hq + h) * D + wg * 64 + 2 * t;
#pragma unroll
        for (int j = 0; j < 8; ++j) AtomicAdd2(dst + 8 * j, dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
      }
    }
    // The next step's barrier orders these reads of dSᵀ before the next writes.
  }
  CpAsyncWait<0>();

  // dK ·= scale; this thread's keys kw + g (+8), columns 8j + 2t.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + kw + g + 8 * r;
    if (j >= nk) continue;
    __nv_bfloat16* dkr = p.dk + (k0 + j) * ldk + kvh * D + 2 * t;
    __nv_bfloat16* dvr = p.dv + (k0 + j) * ldk + kvh * D + 2 * t;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      *reinterpret_cast<uint32_t*>(dkr + 8 * c) = PackBf16(dk[4 * c + 2 * r] * p.scale, dk[4 * c + 2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvr + 8 * c) = PackBf16(dv[4 * c + 2 * r], dv[4 * c + 2 * r + 1]);
    }
  }
}

}  // namespace

void LaunchBackwardSm90(const Params& p, int64_t max_k, int64_t rows, cudaStream_t stream) {
  using T = Sm90BwdTile;
  LaunchTiles<FlashBackwardSm90Kernel>(dim3((max_k + T::kN - 1) / T::kN, p.hk, rows), T::kThreads, T::kSmem, stream, p);
}

}  // namespace loom::ops::cuda::flash
