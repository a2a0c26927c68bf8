// What the memory-bound CUDA ops share (ops/cuda/{add,silu,swiglu,
// sigmoid_gate,embedding,rmsnorm}.cu): the activation dtypes (f32, bf16)
// read into f32 registers eight at a time with 16-byte loads, the dtype
// dispatch, the launch checks, and MapKernel, the one element-wise kernel
// that SiLU and the sigmoid gate instantiate with their math (SwiGLU walks
// rows: its backward packs [dgate | dup] rows and may sum a row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdint>

#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops::cuda {

using nv_bf16 = __nv_bfloat16;

// Elements a thread moves per vector: 16 bytes of bf16, 32 of f32.
constexpr int kVec = 8;

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

inline cudaStream_t Native(CudaStream s) { return static_cast<cudaStream_t>(s); }

__device__ __forceinline__ float ToF32(float x) { return x; }
__device__ __forceinline__ float ToF32(nv_bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T FromF32(float x);
template <>
__device__ __forceinline__ float FromF32<float>(float x) { return x; }
template <>
__device__ __forceinline__ nv_bf16 FromF32<nv_bf16>(float x) { return __float2bfloat16_rn(x); }

// kVec elements at p (16-byte aligned) into f32 registers, and back.
template <typename T>
__device__ __forceinline__ void LoadVec(const T* p, float (&v)[kVec]) {
  constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
  for (int c = 0; c < kVec / kPerChunk; ++c) {
    const uint4 u = reinterpret_cast<const uint4*>(p)[c];
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) v[c * kPerChunk + k] = ToF32(e[k]);
  }
}
template <typename T>
__device__ __forceinline__ void StoreVec(T* p, const float (&v)[kVec]) {
  constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
  for (int c = 0; c < kVec / kPerChunk; ++c) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) e[k] = FromF32<T>(v[c * kPerChunk + k]);
    reinterpret_cast<uint4*>(p)[c] = u;
  }
}

// The kVec columns [col, col + kVec) of a row of d, in f32: a 16-byte vector
// when `vectorized` (d a multiple of kVec, the row 16-byte aligned), else
// element by element, columns past d read as 0 and are not written.
template <typename T>
__device__ __forceinline__ void LoadCols(const T* row, int64_t col, int64_t d, bool vectorized, float (&v)[kVec]) {
  if (vectorized) return LoadVec(row + col, v);
#pragma unroll
  for (int e = 0; e < kVec; ++e) v[e] = col + e < d ? ToF32(row[col + e]) : 0.0f;
}
template <typename T>
__device__ __forceinline__ void StoreCols(T* row, int64_t col, int64_t d, bool vectorized, const float (&v)[kVec]) {
  if (vectorized) return StoreVec(row + col, v);
#pragma unroll
  for (int e = 0; e < kVec; ++e)
    if (col + e < d) row[col + e] = FromF32<T>(v[e]);
}

// kVec elements kept as loaded (bf16 stays packed: half the registers of f32).
template <typename T>
struct RawVec {
  uint4 u[kVec * sizeof(T) / 16];
};
template <typename T>
__device__ __forceinline__ void LoadRaw(const T* row, int64_t col, int64_t d, bool vectorized, RawVec<T>& r) {
  if (vectorized) {
#pragma unroll
    for (int c = 0; c < kVec * static_cast<int>(sizeof(T)) / 16; ++c) r.u[c] = reinterpret_cast<const uint4*>(row + col)[c];
    return;
  }
  T* e = reinterpret_cast<T*>(r.u);
#pragma unroll
  for (int k = 0; k < kVec; ++k) e[k] = col + k < d ? row[col + k] : FromF32<T>(0.0f);
}
template <typename T>
__device__ __forceinline__ void Unpack(const RawVec<T>& r, float (&v)[kVec]) {
  const T* e = reinterpret_cast<const T*>(r.u);
#pragma unroll
  for (int k = 0; k < kVec; ++k) v[k] = ToF32(e[k]);
}

inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Runs the block with T bound to the device type of an activation dtype.
#define LOOM_DISPATCH_ACTIVATION(op, dtype, T, ...)                                                   \
  [&] {                                                                                              \
    switch (dtype) {                                                                                 \
      case ::loom::DType::kF32: { using T = float; return __VA_ARGS__(); }                           \
      case ::loom::DType::kBF16: { using T = ::loom::ops::cuda::nv_bf16; return __VA_ARGS__(); }     \
      default:                                                                                       \
        LOOM_CHECK(false, "[", op, "] CUDA: activations must be f32 or bf16, got ",                 \
                   ::loom::DTypeName(dtype));                                                        \
    }                                                                                                \
  }()

// t is a CUDA tensor of `like`'s size and dtype on `like`'s device.
inline void CheckLike(const char* op, const Tensor& t, const Tensor& like, const char* name, const char* like_name) {
  LOOM_CHECK(t.defined() && !t.device().is_cpu() && t.device() == like.device() && t.numel() == like.numel() &&
                 t.dtype() == like.dtype(),
             "[", op, "] CUDA: ", name, " ", t.defined() ? ShapeString(t.shape()) : std::string("undefined"), " ",
             DTypeName(t.dtype()), " on ", t.device().ToString(), " must match ", like_name, " ",
             ShapeString(like.shape()), " ", DTypeName(like.dtype()), " on ", like.device().ToString());
}

// Grid of a grid-stride loop over `work` items of 256 threads each: at most
// 2^16 blocks (enough to fill any GPU; the loop takes the rest).
inline unsigned GridFor(int64_t work, int threads = 256) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + threads - 1) / threads, 1, int64_t{1} << 16));
}

// out[k][i] = op(in[0][i], in[1][i], ...) for i < n, in f32. Each thread
// reads all inputs of an element before writing its outputs, so an output
// may be one of the inputs. Vectors of kVec when every pointer is 16-byte
// aligned (`vectorized`); the tail and unaligned views go element by element.
template <typename T, int kIn, int kOut>
struct MapOperands {
  const T* in[kIn];
  T* out[kOut];
};

template <typename T, int kIn, int kOut, typename Op>
__global__ void MapKernel(MapOperands<T, kIn, kOut> a, int64_t n, bool vectorized, Op op) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t vecs = vectorized ? n / kVec : 0;
  for (int64_t v = tid; v < vecs; v += stride) {
    float x[kIn][kVec], y[kOut][kVec];
#pragma unroll
    for (int k = 0; k < kIn; ++k) LoadVec(a.in[k] + v * kVec, x[k]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float xe[kIn], ye[kOut];
#pragma unroll
      for (int k = 0; k < kIn; ++k) xe[k] = x[k][e];
      op(xe, ye);
#pragma unroll
      for (int k = 0; k < kOut; ++k) y[k][e] = ye[k];
    }
#pragma unroll
    for (int k = 0; k < kOut; ++k) StoreVec(a.out[k] + v * kVec, y[k]);
  }
  for (int64_t i = vecs * kVec + tid; i < n; i += stride) {
    float xe[kIn], ye[kOut];
#pragma unroll
    for (int k = 0; k < kIn; ++k) xe[k] = ToF32(a.in[k][i]);
    op(xe, ye);
#pragma unroll
    for (int k = 0; k < kOut; ++k) a.out[k][i] = FromF32<T>(ye[k]);
  }
}

template <typename T, int kIn, int kOut, typename Op>
void LaunchMap(const char* name, const Tensor* const (&in)[kIn], Tensor* const (&out)[kOut], Op op,
               CudaStream stream) {
  NvtxRange range(name);
  MapOperands<T, kIn, kOut> a;
  bool vectorized = true;
  for (int k = 0; k < kIn; ++k) {
    a.in[k] = static_cast<const T*>(in[k]->raw());
    vectorized = vectorized && Aligned16(a.in[k]);
  }
  for (int k = 0; k < kOut; ++k) {
    a.out[k] = static_cast<T*>(out[k]->raw());
    vectorized = vectorized && Aligned16(a.out[k]);
  }
  const int64_t n = in[0]->numel();
  if (n == 0) return;
  LOOM_CUDA_CHECK(cudaSetDevice(in[0]->device().index));
  MapKernel<<<GridFor(vectorized ? (n + kVec - 1) / kVec : n), 256, 0, Native(stream)>>>(a, n, vectorized, op);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

// σ(x). Backward formulas take 1 − σ(x) as σ(−x): no cancellation where σ(x) → 1.
__device__ __forceinline__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

}  // namespace loom::ops::cuda
