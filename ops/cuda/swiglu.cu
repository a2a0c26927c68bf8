// CUDA SwiGLU, f32 or bf16 (see ops/swiglu.h), computed in f32 with
// s = σ(gate):
//   h = gate · s · up,   dgate = dh · up · s · (1 + gate (1 − s)),   dup = dh · gate · s.
// Without a row scale: the element-wise MapKernel. With one (f32, a row's
// MoE gate c): one warp a row, 8 rows a block, lanes across the columns in
// 16-byte vectors; h, dgate, dup times c (dgate, dup packed into a [N, 2F]
// row), and the row's dc = Σ dh · gate · s · up summed by the warp in a
// fixed order (the same bits on every run). The backward runs at about
// 3/4 of MapKernel's bandwidth (docs/gpu.md).
#include "ops/cuda/elementwise.cuh"
#include "ops/swiglu.h"

namespace loom::ops::cuda {
namespace {

constexpr int kRowWarps = 8;
constexpr int kSliceCols = 32 * kVec;  // columns a warp covers per step

struct SwigluFwd {  // in: gate, up
  __device__ void operator()(const float (&in)[2], float (&out)[1]) const {
    out[0] = in[0] * Sigmoid(in[0]) * in[1];
  }
};
struct SwigluBwd {  // in: gate, up, dh; out: dgate, dup
  __device__ void operator()(const float (&in)[3], float (&out)[2]) const {
    const float g = in[0], u = in[1], d = in[2], s = Sigmoid(g), one_minus_s = Sigmoid(-g);
    out[0] = d * u * s * (1.0f + g * one_minus_s);
    out[1] = d * g * s;
  }
};

template <typename T>
__global__ void ScaledForwardKernel(const T* __restrict__ gate, const T* __restrict__ up,
                                    const float* __restrict__ scale, int64_t rows, int64_t f, bool vectorized,
                                    T* __restrict__ h) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const float c = scale[row];
  const int64_t at = row * f;
  for (int64_t col = lane * kVec; col < f; col += kSliceCols) {
    float g[kVec], u[kVec], out[kVec];
    LoadCols(gate + at, col, f, vectorized, g);
    LoadCols(up + at, col, f, vectorized, u);
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = c * (g[e] * Sigmoid(g[e]) * u[e]);
    StoreCols(h + at, col, f, vectorized, out);
  }
}

template <typename T>
__global__ void ScaledBackwardKernel(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dh,
                                     const float* __restrict__ scale, int64_t rows, int64_t f, bool vectorized,
                                     T* __restrict__ dgu, float* __restrict__ dscale) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const float c = scale[row];
  const int64_t at = row * f;
  float dc = 0;
  for (int64_t col = lane * kVec; col < f; col += kSliceCols) {
    float g[kVec], u[kVec], d[kVec], og[kVec], ou[kVec];
    LoadCols(gate + at, col, f, vectorized, g);
    LoadCols(up + at, col, f, vectorized, u);
    LoadCols(dh + at, col, f, vectorized, d);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float s = Sigmoid(g[e]), gs = g[e] * s, cd = c * d[e];
      dc += d[e] * gs * u[e];
      og[e] = cd * u[e] * s * (1.0f + g[e] * Sigmoid(-g[e]));
      ou[e] = cd * gs;
    }
    StoreCols(dgu + 2 * at, col, f, vectorized, og);
    StoreCols(dgu + 2 * at + f, col, f, vectorized, ou);
  }
  dc = WarpSum(dc);
  if (lane == 0) dscale[row] = dc;
}

unsigned RowGrid(int64_t rows) { return static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps); }

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
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", h, gate, "h", "gate");
  if (scale == nullptr) {
    LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T,
                             [&] { LaunchMap<T>("SwigluForward", {&gate, &up}, {&h}, SwigluFwd{}, stream); });
    return;
  }
  NvtxRange range("SwigluForward(scaled)");
  CheckScale(*scale, gate, "scale");
  const int64_t rows = Rows(gate), f = rows > 0 ? gate.numel() / rows : 0;
  if (rows == 0 || f == 0) return;
  const bool vec = f % kVec == 0 && Aligned16(gate.raw()) && Aligned16(up.raw()) && Aligned16(h.raw());
  LOOM_CUDA_CHECK(cudaSetDevice(gate.device().index));
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    ScaledForwardKernel<T><<<RowGrid(rows), 32 * kRowWarps, 0, Native(stream)>>>(
        static_cast<const T*>(gate.raw()), static_cast<const T*>(up.raw()), scale->data<float>(), rows, f, vec,
        static_cast<T*>(h.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
                    CudaStream stream) {
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", dh, gate, "dh", "gate");
  CheckLike("swiglu", dgate, gate, "dgate", "gate");
  CheckLike("swiglu", dup, gate, "dup", "gate");
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    LaunchMap<T>("SwigluBackward", {&gate, &up, &dh}, {&dgate, &dup}, SwigluBwd{}, stream);
  });
}

void SwigluScaledBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, const Tensor& scale, Tensor& dgu,
                          Tensor& dscale, CudaStream stream) {
  NvtxRange range("SwigluScaledBackward");
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", dh, gate, "dh", "gate");
  CheckScale(scale, gate, "scale");
  CheckScale(dscale, gate, "dscale");
  const int64_t rows = Rows(gate), f = rows > 0 ? gate.numel() / rows : 0;
  LOOM_CHECK(!dgu.device().is_cpu() && dgu.device() == gate.device() && dgu.dtype() == gate.dtype() &&
                 dgu.ndim() == 2 && dgu.dim(0) == rows && dgu.dim(1) == 2 * f,
             "[swiglu] CUDA dgu ", ShapeString(dgu.shape()), " ", DTypeName(dgu.dtype()), " must be [", rows, ", ",
             2 * f, "] ", DTypeName(gate.dtype()), " on ", gate.device().ToString());
  if (rows == 0) return;
  if (f == 0) {
    LOOM_CUDA_CHECK(cudaMemsetAsync(dscale.raw(), 0, rows * sizeof(float), Native(stream)));
    return;
  }
  const bool vec = f % kVec == 0 && Aligned16(gate.raw()) && Aligned16(up.raw()) && Aligned16(dh.raw()) &&
                   Aligned16(dgu.raw());
  LOOM_CUDA_CHECK(cudaSetDevice(gate.device().index));
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    ScaledBackwardKernel<T><<<RowGrid(rows), 32 * kRowWarps, 0, Native(stream)>>>(
        static_cast<const T*>(gate.raw()), static_cast<const T*>(up.raw()), static_cast<const T*>(dh.raw()),
        scale.data<float>(), rows, f, vec, static_cast<T*>(dgu.raw()), dscale.data<float>());
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
