// CUDA SwiGLU, f32 or bf16 (see ops/swiglu.h), computed in f32 with
// e = exp(−gate), s = σ(gate) = 1 / (1 + e), 1 − s = e · s:
//   h = c · gate · s · up,   dgate = c · dh · up · s · (1 + gate (1 − s)),   dup = c · dh · gate · s,
// c the row's scale (1 without one), dgate and dup packed into a [N, 2F] row,
// and with a scale the row's dc = Σ dh · gate · s · up.
//
// One kernel shape for all four: a block of 256 threads takes R whole rows
// (R·F/8 pieces of 8 columns, R = 512 / (F/8) clamped to [1, 8]: about two
// pieces a thread at F = 1408, as MapKernel's grid-stride walk does), so a
// thread has little serial work and many loads in flight. dc: each thread
// adds its pieces' parts into its own shared-memory slot of the row, and a
// warp sums a row's 256 slots in a fixed order (the same bits every run).
// A warp a row with 16-byte lanes measured 588 µs on an H200 for the MoE
// bench's scaled backward, 64% of the memory's bandwidth (docs/gpu.md).
#include "ops/cuda/elementwise.cuh"
#include "ops/swiglu.h"

namespace loom::ops::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRows = 8;  // rows a block, at most
constexpr int kPiecesPerBlock = 2 * kThreads;

struct RowShape {
  int64_t rows, f;
  int pieces_per_row;  // ⌈F / kVec⌉
  int rows_per_block;
};

RowShape ShapeOf(int64_t rows, int64_t f) {
  const int64_t vpr = (f + kVec - 1) / kVec;
  LOOM_CHECK(vpr * kMaxRows < (int64_t{1} << 31), "[swiglu] rows of ", f, " columns are too long");
  const int r = static_cast<int>(std::clamp<int64_t>(kPiecesPerBlock / vpr, 1, kMaxRows));
  return {rows, f, static_cast<int>(vpr), r};
}

unsigned Blocks(const RowShape& s) {
  const int64_t blocks = (s.rows + s.rows_per_block - 1) / s.rows_per_block;
  LOOM_CHECK(blocks < (int64_t{1} << 31), "[swiglu] ", s.rows, " rows exceed the grid");
  return static_cast<unsigned>(blocks);
}

__device__ __forceinline__ int RowsHere(const RowShape& sh, int64_t row0) {
  return sh.rows - row0 < sh.rows_per_block ? static_cast<int>(sh.rows - row0) : sh.rows_per_block;
}

// σ(g), g·σ(g) and 1 − σ(g) of one element, with one exp.
struct Silu {
  float s, gs, one_minus_s;
  __device__ explicit Silu(float g) {
    const float e = expf(-g);
    s = 1.0f / (1.0f + e);
    gs = g * s;
    one_minus_s = e * s;
  }
};

template <typename T, bool kScaled>
__global__ void __launch_bounds__(kThreads) ForwardKernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                           const float* __restrict__ scale, RowShape sh, bool vectorized,
                                                           T* __restrict__ h) {
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * sh.rows_per_block;
  const int n = RowsHere(sh, row0) * sh.pieces_per_row;
  for (int p = threadIdx.x; p < n; p += kThreads) {
    const int r = p / sh.pieces_per_row;
    const int64_t row = row0 + r, at = row * sh.f, col = static_cast<int64_t>(p - r * sh.pieces_per_row) * kVec;
    const float c = kScaled ? scale[row] : 1.0f;
    float g[kVec], u[kVec], out[kVec];
    LoadCols(gate + at, col, sh.f, vectorized, g);
    LoadCols(up + at, col, sh.f, vectorized, u);
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = c * (Silu(g[e]).gs * u[e]);
    StoreCols(h + at, col, sh.f, vectorized, out);
  }
}

template <typename T, bool kScaled>
__global__ void __launch_bounds__(kThreads)
    BackwardKernel(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dh,
                   const float* __restrict__ scale, RowShape sh, bool vectorized, T* __restrict__ dgu,
                   float* __restrict__ dscale) {
  __shared__ float part[kScaled ? kMaxRows : 1][kThreads];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * sh.rows_per_block;
  const int rows_here = RowsHere(sh, row0);
  if (kScaled)
    for (int r = 0; r < rows_here; ++r) part[r][threadIdx.x] = 0;
  const int n = rows_here * sh.pieces_per_row;
  for (int p = threadIdx.x; p < n; p += kThreads) {
    const int r = p / sh.pieces_per_row;
    const int64_t row = row0 + r, at = row * sh.f, col = static_cast<int64_t>(p - r * sh.pieces_per_row) * kVec;
    const float c = kScaled ? scale[row] : 1.0f;
    float g[kVec], u[kVec], d[kVec], og[kVec], ou[kVec], dc = 0;
    LoadCols(gate + at, col, sh.f, vectorized, g);
    LoadCols(up + at, col, sh.f, vectorized, u);
    LoadCols(dh + at, col, sh.f, vectorized, d);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const Silu a(g[e]);
      const float cd = c * d[e];
      if (kScaled) dc += d[e] * a.gs * u[e];
      og[e] = cd * u[e] * a.s * (1.0f + g[e] * a.one_minus_s);
      ou[e] = cd * a.gs;
    }
    StoreCols(dgu + 2 * at, col, sh.f, vectorized, og);
    StoreCols(dgu + 2 * at + sh.f, col, sh.f, vectorized, ou);
    if (kScaled) part[r][threadIdx.x] += dc;
  }
  if (!kScaled) return;
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows_here; r += kThreads / 32) {
    float sum = 0;
    for (int t = lane; t < kThreads; t += 32) sum += part[r][t];
    sum = WarpSum(sum);
    if (lane == 0) dscale[row0 + r] = sum;
  }
}

// Rows of [N, F] operands (F the last dimension).
int64_t Rows(const Tensor& t) { return t.ndim() == 0 ? 1 : t.numel() / std::max<int64_t>(t.dim(-1), 1); }

void CheckScale(const Tensor& s, const Tensor& gate, const char* name) {
  LOOM_CHECK(!s.device().is_cpu() && s.device() == gate.device() && s.dtype() == DType::kF32 &&
                 s.numel() == Rows(gate),
             "[swiglu] CUDA ", name, " ", ShapeString(s.shape()), " ", DTypeName(s.dtype()), " on ",
             s.device().ToString(), " must hold one f32 per row of gate ", ShapeString(gate.shape()), " on ",
             gate.device().ToString());
}

}  // namespace

void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, const Tensor* scale, CudaStream stream) {
  NvtxRange range("SwigluForward");
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", h, gate, "h", "gate");
  if (scale != nullptr) CheckScale(*scale, gate, "scale");
  const int64_t rows = Rows(gate), f = rows > 0 ? gate.numel() / rows : 0;
  if (rows == 0 || f == 0) return;
  const RowShape sh = ShapeOf(rows, f);
  const bool vec = f % kVec == 0 && Aligned16(gate.raw()) && Aligned16(up.raw()) && Aligned16(h.raw());
  LOOM_CUDA_CHECK(cudaSetDevice(gate.device().index));
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    const T* g = static_cast<const T*>(gate.raw());
    const T* u = static_cast<const T*>(up.raw());
    if (scale != nullptr)
      ForwardKernel<T, true><<<Blocks(sh), kThreads, 0, Native(stream)>>>(g, u, scale->data<float>(), sh, vec,
                                                                         static_cast<T*>(h.raw()));
    else
      ForwardKernel<T, false><<<Blocks(sh), kThreads, 0, Native(stream)>>>(g, u, nullptr, sh, vec,
                                                                          static_cast<T*>(h.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgu, const Tensor* scale,
                    Tensor* dscale, CudaStream stream) {
  NvtxRange range("SwigluBackward");
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", dh, gate, "dh", "gate");
  LOOM_CHECK((scale == nullptr) == (dscale == nullptr), "[swiglu] a row scale and its gradient go together");
  if (scale != nullptr) {
    CheckScale(*scale, gate, "scale");
    CheckScale(*dscale, gate, "dscale");
  }
  const int64_t rows = Rows(gate), f = rows > 0 ? gate.numel() / rows : 0;
  LOOM_CHECK(!dgu.device().is_cpu() && dgu.device() == gate.device() && dgu.dtype() == gate.dtype() &&
                 dgu.ndim() == 2 && dgu.dim(0) == rows && dgu.dim(1) == 2 * f,
             "[swiglu] CUDA dgu ", ShapeString(dgu.shape()), " ", DTypeName(dgu.dtype()), " must be [", rows, ", ",
             2 * f, "] ", DTypeName(gate.dtype()), " on ", gate.device().ToString());
  if (rows == 0) return;
  if (f == 0) {
    if (dscale != nullptr) LOOM_CUDA_CHECK(cudaMemsetAsync(dscale->raw(), 0, rows * sizeof(float), Native(stream)));
    return;
  }
  const RowShape sh = ShapeOf(rows, f);
  const bool vec = f % kVec == 0 && Aligned16(gate.raw()) && Aligned16(up.raw()) && Aligned16(dh.raw()) &&
                   Aligned16(dgu.raw());
  LOOM_CUDA_CHECK(cudaSetDevice(gate.device().index));
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    const T* g = static_cast<const T*>(gate.raw());
    const T* u = static_cast<const T*>(up.raw());
    const T* d = static_cast<const T*>(dh.raw());
    T* out = static_cast<T*>(dgu.raw());
    if (scale != nullptr)
      BackwardKernel<T, true><<<Blocks(sh), kThreads, 0, Native(stream)>>>(g, u, d, scale->data<float>(), sh, vec,
                                                                          out, dscale->data<float>());
    else
      BackwardKernel<T, false><<<Blocks(sh), kThreads, 0, Native(stream)>>>(g, u, d, nullptr, sh, vec, out, nullptr);
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
