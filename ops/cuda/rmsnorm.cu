// CUDA RMSNorm, f32 (see ops/rmsnorm.h). One block of 256 threads a row:
//   forward   r = 1/sqrt(mean(x²) + eps),  y = x · r · w
//   backward  g = dy ⊙ w,  dx = r · (g − x · r² · (g·x) / D)
//             dw += Σ_rows dy ⊙ x · r, one thread a column walking the rows in
//             order, so the sum is the same on every run.
#include <cuda_runtime.h>

#include "ops/rmsnorm.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result.
__device__ float BlockSum(float v) {
  __shared__ float partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0;
  for (int i = 0; i < kThreads / 32; ++i) total += partial[i];
  return total;
}

__global__ void ForwardKernel(const float* x, const float* w, int64_t d, float eps, float* y, float* rstd) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * d;
  float ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) ss += xr[j] * xr[j];
  const float r = rsqrtf(BlockSum(ss) / d + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) y[row * d + j] = xr[j] * r * (w ? w[j] : 1.0f);
}

__global__ void BackwardKernel(const float* x, const float* w, const float* rstd, const float* dy, int64_t d,
                               float* dx) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * d;
  const float* dyr = dy + row * d;
  float gx = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) gx += dyr[j] * (w ? w[j] : 1.0f) * xr[j];
  const float r = rstd[row];
  const float c = r * r * BlockSum(gx) / d;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) dx[row * d + j] = r * (dyr[j] * (w ? w[j] : 1.0f) - xr[j] * c);
}

__global__ void WeightGradKernel(const float* x, const float* rstd, const float* dy, int64_t rows, int64_t d,
                                 float* dw) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  float s = 0;
  for (int64_t row = 0; row < rows; ++row) s += dy[row * d + j] * x[row * d + j] * rstd[row];
  dw[j] += s;
}

int64_t CheckArgs(const Tensor& x, const Tensor& w, const Tensor& rstd) {
  LOOM_CHECK(!x.device().is_cpu() && x.dtype() == DType::kF32, "[rmsnorm] CUDA path takes f32 CUDA tensors, got ",
             DTypeName(x.dtype()), " on ", x.device().ToString());
  const int64_t d = x.dim(-1);
  LOOM_CHECK(!w.defined() || (w.numel() == d && w.dtype() == DType::kF32 && w.device() == x.device()),
             "[rmsnorm] w ", ShapeString(w.shape()), " must be [", d, "] f32 on ", x.device().ToString());
  LOOM_CHECK(rstd.numel() == x.numel() / d && rstd.device() == x.device(), "[rmsnorm] rstd ",
             ShapeString(rstd.shape()), " must hold one value per row of x ", ShapeString(x.shape()));
  LOOM_CUDA_CHECK(cudaSetDevice(x.device().index));
  return d;
}

}  // namespace

void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  const int64_t d = CheckArgs(x, w, rstd);
  const int64_t rows = x.numel() / d;
  LOOM_CHECK(y.numel() == x.numel() && y.device() == x.device(), "[rmsnorm] y must match x");
  if (rows == 0) return;
  ForwardKernel<<<rows, kThreads>>>(x.data<float>(), w.defined() ? w.data<float>() : nullptr, d,
                                    static_cast<float>(eps), y.data<float>(), rstd.data<float>());
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                     Tensor& dw) {
  const int64_t d = CheckArgs(x, w, rstd);
  const int64_t rows = x.numel() / d;
  LOOM_CHECK(dy.numel() == x.numel() && dx.numel() == x.numel(), "[rmsnorm] dy and dx must match x");
  if (rows == 0) return;
  BackwardKernel<<<rows, kThreads>>>(x.data<float>(), w.defined() ? w.data<float>() : nullptr, rstd.data<float>(),
                                     dy.data<float>(), d, dx.data<float>());
  LOOM_CUDA_CHECK(cudaGetLastError());
  if (w.defined()) {
    LOOM_CHECK(dw.numel() == d && dw.device() == x.device(), "[rmsnorm] dw must be [", d, "] like w");
    WeightGradKernel<<<(d + 127) / 128, 128>>>(x.data<float>(), rstd.data<float>(), dy.data<float>(), rows, d,
                                               dw.data<float>());
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace loom::ops::cuda
