// AdamW and gradient norms on CUDA (see optim/adamw.h). The update is the
// CPU's (optim/adamw.cc) in the same f64 arithmetic, with explicit _rn
// intrinsics so that nvcc does not contract it into FMAs the CPU does not
// use; it is memory bound either way (28 bytes an element, 30 with the bf16
// copy).
//
// Multi-tensor AdamW: a table of AdamWTensor in device memory, each tensor
// cut into chunks of kChunk elements; first_chunk[i] is the index of tensor
// i's first chunk (a prefix sum). Blocks walk the chunks grid-stride and
// find their tensor by binary search over first_chunk; a thread updates 4
// consecutive elements from 16-byte loads (scalar loads left the scalar f64
// update at 1.7 TB/s on the H100).
//
// Σ g²: each tensor's grid-stride partials (f64) go to its slots of one
// partials buffer, one block then sums that buffer in index order; the grid
// depends only on the sizes, so the result has the same bits on every run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "optim/adamw.h"
#include "runtime/cuda_check.h"

namespace loom::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int kMaxGrid = 4096;
constexpr int kPartialBlocks = 1024;  // at most, per tensor of Σ g²

struct StepScalars {
  double lr, b1, b2, eps, bias1, bias2, grad_scale;
};

// m, v, p of one element, as AdamWKernel of optim/adamw.cc computes them.
__device__ __forceinline__ void UpdateElement(float& p, float g, float& m, float& v, double wd,
                                              const StepScalars& s) {
  const double gd = static_cast<float>(__dmul_rn(g, s.grad_scale));  // ScaleKernel's rounding
  m = static_cast<float>(__dadd_rn(__dmul_rn(s.b1, m), __dmul_rn(1 - s.b1, gd)));
  v = static_cast<float>(__dadd_rn(__dmul_rn(s.b2, v), __dmul_rn(__dmul_rn(1 - s.b2, gd), gd)));
  const double denom = __dadd_rn(__dsqrt_rn(__ddiv_rn(v, s.bias2)), s.eps);
  const double update = __dadd_rn(__ddiv_rn(__ddiv_rn(m, s.bias1), denom), __dmul_rn(wd, p));
  p = static_cast<float>(__dsub_rn(p, __dmul_rn(s.lr, update)));
}

__device__ bool Aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

__global__ void AdamWKernel(float* p, const float* g, float* m, float* v, int64_t n, double wd, StepScalars s) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    UpdateElement(p[i], g[i], m[i], v[i], wd, s);
  }
}

__global__ void MultiTensorAdamWKernel(const AdamWTensor* table, const int64_t* first_chunk, int count,
                                       int64_t chunks, StepScalars s) {
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    int lo = 0, hi = count - 1;  // the last tensor whose first chunk is ≤ c
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_chunk[mid] <= c) lo = mid; else hi = mid - 1;
    }
    const AdamWTensor t = table[lo];
    const int64_t begin = (c - first_chunk[lo]) * kChunk, end = min(begin + kChunk, t.n);
    auto* compute = reinterpret_cast<__nv_bfloat16*>(t.compute);
    // Four elements a thread with 16-byte loads where the arrays allow (a
    // chunk starts kChunk elements into its tensor, so only the bases count);
    // the rest one at a time.
    int64_t i = begin;
    if (Aligned(t.p, 16) && Aligned(t.g, 16) && Aligned(t.m, 16) && Aligned(t.v, 16) && Aligned(compute, 8)) {
      for (int64_t q = begin + 4 * threadIdx.x; q + 4 <= end; q += 4 * kThreads) {
        float4 p = *reinterpret_cast<const float4*>(t.p + q), m = *reinterpret_cast<const float4*>(t.m + q),
               v = *reinterpret_cast<const float4*>(t.v + q);
        const float4 g = *reinterpret_cast<const float4*>(t.g + q);
        UpdateElement(p.x, g.x, m.x, v.x, t.wd, s);
        UpdateElement(p.y, g.y, m.y, v.y, t.wd, s);
        UpdateElement(p.z, g.z, m.z, v.z, t.wd, s);
        UpdateElement(p.w, g.w, m.w, v.w, t.wd, s);
        *reinterpret_cast<float4*>(t.p + q) = p;
        *reinterpret_cast<float4*>(t.m + q) = m;
        *reinterpret_cast<float4*>(t.v + q) = v;
        if (compute != nullptr) {
          const __nv_bfloat162 pair[2] = {__floats2bfloat162_rn(p.x, p.y), __floats2bfloat162_rn(p.z, p.w)};
          *reinterpret_cast<uint2*>(compute + q) = *reinterpret_cast<const uint2*>(pair);
        }
      }
      i = begin + (end - begin) / 4 * 4;
    }
    for (i += threadIdx.x; i < end; i += kThreads) {
      UpdateElement(t.p[i], t.g[i], t.m[i], t.v[i], t.wd, s);
      if (compute != nullptr) compute[i] = __float2bfloat16_rn(t.p[i]);
    }
  }
}

// Block-wide f64 sum in a fixed tree; thread 0 gets it.
__device__ double BlockSum(double x) {
  __shared__ double s[kThreads];
  s[threadIdx.x] = x;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
    __syncthreads();
  }
  return s[0];
}

// Four elements a thread per load where g is 16-byte aligned (scalar loads
// and 128 blocks a tensor ran at 1.05 TB/s on the H100).
__global__ void SumSquaresPartials(const float* g, int64_t n, double* partials) {
  double acc = 0;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (Aligned(g, 16)) {
    const int64_t n4 = n / 4;
    for (int64_t q = i; q < n4; q += stride) {
      const float4 x = reinterpret_cast<const float4*>(g)[q];
      acc += double(x.x) * x.x + double(x.y) * x.y + double(x.z) * x.z + double(x.w) * x.w;
    }
    i += 4 * n4;
  }
  for (; i < n; i += stride) {
    const double x = g[i];
    acc += x * x;
  }
  const double total = BlockSum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void SumPartials(const double* partials, int64_t count, double* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  const double total = BlockSum(acc);
  if (threadIdx.x == 0) *out = total;
}

__global__ void ScaleKernel(float* g, int64_t n, double f) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    g[i] = static_cast<float>(__dmul_rn(g[i], f));
  }
}

int GridFor(int64_t n, int64_t max_blocks) {
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, max_blocks));
}

// SumSquaresPartials' blocks for n elements (four a thread).
int PartialGrid(int64_t n) { return GridFor((n + 3) / 4, kPartialBlocks); }

StepScalars Scalars(double lr, int64_t step, const AdamWOptions& o, double grad_scale) {
  return {lr, o.beta1, o.beta2, o.eps, 1 - std::pow(o.beta1, step), 1 - std::pow(o.beta2, step), grad_scale};
}

void CheckF32(const Tensor& t, Device dev, const char* name) {
  LOOM_CHECK(t.device() == dev && t.dtype() == DType::kF32, "[adamw] ", name, " must be f32 on ", dev.ToString(),
             ", got ", DTypeName(t.dtype()), " on ", t.device().ToString());
}

}  // namespace

void AdamWUpdate(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double wd, int64_t step,
                 const AdamWOptions& options, double grad_scale, CudaStream stream) {
  const Device dev = p.device();
  CheckF32(p, dev, "p");
  CheckF32(g, dev, "g");
  CheckF32(m, dev, "m");
  CheckF32(v, dev, "v");
  const int64_t n = p.numel();
  if (n == 0) return;
  LOOM_CUDA_CHECK(cudaSetDevice(dev.index));
  AdamWKernel<<<GridFor(n, kMaxGrid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), n, wd, Scalars(lr, step, options, grad_scale));
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MultiTensorAdamW(AdamWTable& table, const std::vector<AdamWTensor>& tensors, double lr, int64_t step,
                      const AdamWOptions& options, double grad_scale, CudaStream stream) {
  if (tensors.empty()) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The table lives on the device of the tensors it points to.
  cudaPointerAttributes where{};
  LOOM_CUDA_CHECK(cudaPointerGetAttributes(&where, tensors[0].p));
  const int device = where.device;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  if (tensors != table.host) {
    std::vector<int64_t> first_chunk(tensors.size() + 1, 0);
    for (size_t i = 0; i < tensors.size(); ++i) {
      first_chunk[i + 1] = first_chunk[i] + (tensors[i].n + kChunk - 1) / kChunk;
    }
    const size_t entry_bytes = tensors.size() * sizeof(AdamWTensor);
    const size_t bytes = entry_bytes + first_chunk.size() * sizeof(int64_t);
    static_assert(sizeof(AdamWTensor) % sizeof(int64_t) == 0);
    std::vector<char> staged(bytes);
    std::memcpy(staged.data(), tensors.data(), entry_bytes);
    std::memcpy(staged.data() + entry_bytes, first_chunk.data(), first_chunk.size() * sizeof(int64_t));
    // The pointers live on the current device: the table goes there too.
    table.device = Tensor::Empty({static_cast<int64_t>(bytes / 4)}, DType::kI32, Device::Cuda(device));
    LOOM_CUDA_CHECK(cudaMemcpyAsync(table.device.raw(), staged.data(), bytes, cudaMemcpyHostToDevice, s));
    LOOM_CUDA_CHECK(cudaStreamSynchronize(s));  // `staged` is pageable and about to go
    table.host = tensors;
    table.chunks = first_chunk.back();
  }
  if (table.chunks == 0) return;
  const auto* entries = static_cast<const AdamWTensor*>(table.device.raw());
  const auto* first_chunk = reinterpret_cast<const int64_t*>(entries + tensors.size());
  MultiTensorAdamWKernel<<<static_cast<int>(std::min<int64_t>(table.chunks, kMaxGrid)), kThreads, 0, s>>>(
      entries, first_chunk, static_cast<int>(tensors.size()), table.chunks, Scalars(lr, step, options, grad_scale));
  LOOM_CUDA_CHECK(cudaGetLastError());
}

double SumSquares(const std::vector<const Tensor*>& tensors, CudaStream stream) {
  if (tensors.empty()) return 0;
  const Device dev = tensors[0]->device();
  int64_t slots = 0;
  for (const Tensor* t : tensors) {
    CheckF32(*t, dev, "gradient");
    slots += PartialGrid(t->numel());
  }
  LOOM_CUDA_CHECK(cudaSetDevice(dev.index));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  Tensor partials = Tensor::Empty({slots + 1}, DType::kF64, dev);  // the last slot holds the total
  double* slot = partials.data<double>();
  for (const Tensor* t : tensors) {
    const int grid = PartialGrid(t->numel());
    if (t->numel() == 0) {
      LOOM_CUDA_CHECK(cudaMemsetAsync(slot, 0, sizeof(double), s));
    } else {
      SumSquaresPartials<<<grid, kThreads, 0, s>>>(t->data<float>(), t->numel(), slot);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
    slot += grid;
  }
  double* total = partials.data<double>() + slots;
  SumPartials<<<1, kThreads, 0, s>>>(partials.data<double>(), slots, total);
  LOOM_CUDA_CHECK(cudaGetLastError());
  double host = 0;
  LOOM_CUDA_CHECK(cudaMemcpyAsync(&host, total, sizeof(double), cudaMemcpyDeviceToHost, s));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(s));
  return host;
}

void ScaleInPlace(Tensor& g, double f, CudaStream stream) {
  CheckF32(g, g.device(), "g");
  if (g.numel() == 0) return;
  LOOM_CUDA_CHECK(cudaSetDevice(g.device().index));
  ScaleKernel<<<GridFor(g.numel(), kMaxGrid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      g.data<float>(), g.numel(), f);
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::cuda
