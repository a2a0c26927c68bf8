// CUDA SwiGLU, f32 or bf16 (see ops/swiglu.h), computed in f32 with
// s = σ(gate):
//   h = gate · s · up,   dgate = dh · up · s · (1 + gate (1 − s)),   dup = dh · gate · s.
// Without a row scale: the element-wise MapKernel. With one (f32, a row's
// MoE gate c): the same grid-stride walk over pieces of 8 columns; h,
// dgate, dup times c (dgate, dup packed into a [N, 2F] row), and the row's
// dc = Σ dh · gate · s · up from per-piece parts that a second kernel adds
// in a fixed order (the same bits on every run).
#include "ops/cuda/elementwise.cuh"
#include "ops/swiglu.h"

namespace loom::ops::cuda {
namespace {

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

// Row-scaled kernels: grid-stride over the rows' pieces of kVec columns
// (vpr = ⌈F / kVec⌉ a row; 16-byte vectors when F is a multiple of kVec),
// as MapKernel walks its elements; piece v is row v / vpr.
template <typename T>
__global__ void ScaledForwardKernel(const T* __restrict__ gate, const T* __restrict__ up,
                                    const float* __restrict__ scale, int64_t pieces, int64_t vpr, int64_t f,
                                    bool vectorized, T* __restrict__ h) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < pieces;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = v / vpr, at = row * f, col = (v - row * vpr) * kVec;
    const float c = scale[row];
    float g[kVec], u[kVec], out[kVec];
    LoadCols(gate + at, col, f, vectorized, g);
    LoadCols(up + at, col, f, vectorized, u);
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = c * (g[e] * Sigmoid(g[e]) * u[e]);
    StoreCols(h + at, col, f, vectorized, out);
  }
}

// Also writes each piece's part of dc (Σ dh · gate · s · up over its
// columns) to partial[v]; RowSumKernel adds a row's parts in order.
template <typename T>
__global__ void ScaledBackwardKernel(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dh,
                                     const float* __restrict__ scale, int64_t pieces, int64_t vpr, int64_t f,
                                     bool vectorized, T* __restrict__ dgu, float* __restrict__ partial) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < pieces;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = v / vpr, at = row * f, col = (v - row * vpr) * kVec;
    const float c = scale[row];
    float g[kVec], u[kVec], d[kVec], og[kVec], ou[kVec];
    LoadCols(gate + at, col, f, vectorized, g);
    LoadCols(up + at, col, f, vectorized, u);
    LoadCols(dh + at, col, f, vectorized, d);
    float dc = 0;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float s = Sigmoid(g[e]), gs = g[e] * s, cd = c * d[e];
      dc += d[e] * gs * u[e];
      og[e] = cd * u[e] * s * (1.0f + g[e] * Sigmoid(-g[e]));
      ou[e] = cd * gs;
    }
    StoreCols(dgu + 2 * at, col, f, vectorized, og);
    StoreCols(dgu + 2 * at + f, col, f, vectorized, ou);
    partial[v] = dc;
  }
}

// One warp a row: out[row] = Σ_j partial[row · vpr + j], lane-strided then
// a shuffle tree (a fixed order).
__global__ void RowSumKernel(const float* __restrict__ partial, int64_t rows, int64_t vpr, float* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float sum = 0;
  for (int64_t j = lane; j < vpr; j += 32) sum += partial[row * vpr + j];
  sum = WarpSum(sum);
  if (lane == 0) out[row] = sum;
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
  const int64_t vpr = (f + kVec - 1) / kVec;
  LOOM_CUDA_CHECK(cudaSetDevice(gate.device().index));
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    ScaledForwardKernel<T><<<GridFor(rows * vpr), 256, 0, Native(stream)>>>(
        static_cast<const T*>(gate.raw()), static_cast<const T*>(up.raw()), scale->data<float>(), rows * vpr, vpr, f,
        vec, static_cast<T*>(h.raw()));
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
  const int64_t vpr = (f + kVec - 1) / kVec;
  Tensor partial = Tensor::Empty({rows * vpr}, DType::kF32, gate.device());  // stream-ordered scratch
  LOOM_CUDA_CHECK(cudaSetDevice(gate.device().index));
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    ScaledBackwardKernel<T><<<GridFor(rows * vpr), 256, 0, Native(stream)>>>(
        static_cast<const T*>(gate.raw()), static_cast<const T*>(up.raw()), static_cast<const T*>(dh.raw()),
        scale.data<float>(), rows * vpr, vpr, f, vec, static_cast<T*>(dgu.raw()), partial.data<float>());
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
  RowSumKernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, Native(stream)>>>(partial.data<float>(), rows, vpr,
                                                                                 dscale.data<float>());
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
