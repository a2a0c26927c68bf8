// Hopper (sm_90a) pieces: mbarriers, named barriers, the async-proxy fence,
// TMA loads, setmaxnreg, wgmma (warpgroup MMA) with its shared-memory matrix
// descriptors. PTX ISA 8.x names in the comments; every wrapper is one
// instruction or one poll loop.
//
// Shared-memory operand layout used with these descriptors (the "128-byte
// swizzle" of the PTX ISA): a tile of R rows by 64 bf16 columns (128 bytes a
// row) is one panel; row r sits at r·128 bytes and its 16-byte chunk c at
// chunk c ^ (r mod 8). A panel starts 1024-byte aligned (the hardware
// applies the XOR to address bits 4-6 from bits 7-9). A wider row (D = 128)
// is two panels, R·128 bytes apart.
//   K-major operand (Q as A, K as B of Q·Kᵀ: the contraction dim runs along
//   the row): SBO = 1024 (8 rows to the next 8), LBO unused; the k-th
//   16-column step inside a panel starts 32·k bytes further.
//   MN-major operand (V as B of P·V, imm-trans-b = 1: N runs along the row):
//   SBO = 1024 (8 keys to the next 8), LBO = the panel stride (64 columns of
//   N to the next 64); the k-th 16-key step starts 16·128 bytes further.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/mma_sync.cuh"

// The build's device code has two targets (CMakeLists.txt): sm_90a, and
// sm_80 (with its PTX) for GPUs that are not Hopper. Nothing here exists on
// sm_80, so a kernel built on these pieces puts its body inside
//   #if LOOM_SM90A
// with a trap in the #else; the host launches it only where
// cuda::FlashAttentionRuns (ops/softmax_attention.h) says so.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOOM_SM90A 1
#else
#define LOOM_SM90A 0
#endif

namespace loom::ops::cuda::sm90 {

// ------------------------------------------------------------------ mbarrier

__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the mbarrier inits visible to the async proxy (TMA), before the
// block barrier that publishes them.
__device__ __forceinline__ void FenceBarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// Named barrier `id` (1-15; 0 is __syncthreads) over `threads` threads:
// sync waits for the count, arrive counts without waiting.
__device__ __forceinline__ void NamedBarSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's generic-proxy view of shared memory (what cp.async or
// st.shared wrote) before later async-proxy reads (wgmma operands).
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ------------------------------------------------------------------ TMA

// Arrives on `bar` and raises the bytes its current phase waits for by
// `bytes` (the TMA loads below count them down as they land).
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// The box of tensor map `map` (ops/cuda/tensor_map.h; a __grid_constant__
// kernel parameter) at coordinates (c0, c1, c2) into shared memory at dst,
// completing its bytes on mbarrier `bar`. One thread issues it.
__device__ __forceinline__ void TmaLoad3d(uint32_t dst, const void* map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// Adds the shared-memory box at src to tensor map `map`'s box at (c0, c1,
// c2) in global memory (f32 add, at L2; elements past the map's ends are
// dropped). One thread issues it; it completes in the bulk groups that
// thread commits: BulkWaitRead<N> until at most N groups may still read
// their source, BulkWait<N> until at most N have not finished.
__device__ __forceinline__ void TmaReduceAdd3d(const void* map, uint32_t src, int c0, int c1, int c2) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void BulkCommit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void BulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void BulkWait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// Register budget of the calling warpgroup (every thread of it executes the
// same one): a producer gives registers back, consumers take them. Needs a
// register cap at kernel entry (__launch_bounds__(threads, 1)).
template <int N>
__device__ __forceinline__ void SetMaxRegsInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void SetMaxRegsDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// kRows x D tile of token-major rows (stride `ld` elements) into 64-column
// panels with the 128-byte swizzle (above), by kThreads threads; rows ≥
// valid read as zeros. Consecutive threads read consecutive 16 bytes of a row.
template <int kRows, int D, int kThreads>
__device__ __forceinline__ void LoadPanels(uint32_t smem, const __nv_bfloat16* base, int64_t ld, int valid,
                                           int tid) {
  constexpr int kChunks = D / 8, kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0, "tile does not split evenly over the threads");
  const int c = tid % kChunks, r0 = tid / kChunks;
  const uint32_t panel = smem + (c / 8) * (kRows * 128);
  const __nv_bfloat16* src = base + r0 * ld + c * 8;
#pragma unroll 8
  for (int r = r0; r < kRows; r += kRowsPerPass) {
    const bool ok = r < valid;
    CpAsync16(panel + r * 128 + (((c & 7) ^ (r & 7)) << 4), ok ? src : base, ok);
    src += kRowsPerPass * ld;
  }
}

// ------------------------------------------------------------------ wgmma

// Matrix descriptor: start address, LBO, SBO (bytes, all >> 4), 128-byte
// swizzle (mode 1 in bits 62-63), base offset 0 (panels 1024-aligned).
__device__ __forceinline__ uint64_t Desc128B(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// After a wait, tells the compiler that the accumulators changed here (the
// wgmma asm statements wrote them asynchronously), so no read moves above it.
template <int N>
__device__ __forceinline__ void FenceRegs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The same for register A fragments that must stay unchanged until a wait.
template <int N>
__device__ __forceinline__ void FenceRegs(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a[i][r])::"memory");
}

#define LOOM_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define LOOM_F16(d, i) LOOM_F4(d, i), LOOM_F4(d, i + 4), LOOM_F4(d, i + 8), LOOM_F4(d, i + 12)
#define LOOM_F32(d, i) LOOM_F16(d, i), LOOM_F16(d, i + 16)
#define LOOM_F64(d, i) LOOM_F32(d, i), LOOM_F32(d, i + 32)

// Accumulator fragment of m64nN (f32), per warp w of the warpgroup (rows
// 16w..16w+15), lane = 4g + t: d[4j], d[4j+1] = row g, columns 8j + 2t,
// 8j + 2t + 1; d[4j+2], d[4j+3] = row g + 8, same columns.
// Register A fragment (m64k16 bf16, per warp as mma.m16n8k16's A):
// a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..).

// d[64x128] (+)= A[64x16] · B[16x128]; A and B K-major in shared memory.
__device__ __forceinline__ void WgmmaM64N128SS(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : LOOM_F64(d, 0)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}

// d[64x128] += A[64x16] · B[16x128]; A in registers, B MN-major in shared
// memory (imm-trans-b = 1).
__device__ __forceinline__ void WgmmaM64N128RS(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : LOOM_F64(d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// d[64x64] (+)= A[64x16] · B[16x64], both in shared memory; kTrans: both
// MN-major (imm-trans-a = imm-trans-b = 1), else both K-major.
template <bool kTrans>
__device__ __forceinline__ void WgmmaM64N64SS(float (&d)[32], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, %35, %35;\n}\n"
      : LOOM_F32(d, 0)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)), "n"(kTrans ? 1 : 0));
}

// d[64x32] (+)= A[64x16] · B[16x32], both in shared memory, as
// WgmmaM64N64SS. With 128-byte-swizzled MN-major panels a 32-column B may
// start 64 bytes into a panel's rows (the swizzle XOR applies to the
// absolute address, as for the 32-byte k steps of K-major operands).
template <bool kTrans>
__device__ __forceinline__ void WgmmaM64N32SS(float (&d)[16], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, %19, %19;\n}\n"
      : LOOM_F16(d, 0)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)), "n"(kTrans ? 1 : 0));
}

// d[64x64] += A[64x16] · B[16x64]; as WgmmaM64N128RS with N = 64.
__device__ __forceinline__ void WgmmaM64N64RS(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : LOOM_F32(d, 0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

#undef LOOM_F64
#undef LOOM_F32
#undef LOOM_F16
#undef LOOM_F4

}  // namespace loom::ops::cuda::sm90
