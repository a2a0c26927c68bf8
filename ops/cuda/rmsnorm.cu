// CUDA RMSNorm (see ops/rmsnorm.h): x, y, dy, dx f32 or bf16 (one dtype);
// w, dw and rstd f32 (the master weight, its gradient, the statistic).
// All math in f32.
//   forward   r = 1/sqrt(mean(x²) + eps),  y = x · r · w
//   backward  g = dy ⊙ w,  dx = r · (g − x · r² · (g·x) / D) (+ add)   (written)
//             dw += Σ_rows dy ⊙ x · r                       (accumulated)
//
// One warp a row; lane l owns the columns 256·k + 8·l + [0, 8) of every row
// (16-byte vectors when D is a multiple of 8 and the rows are aligned). The
// first 8 of those groups (D <= 2048) stay in registers between the row sum
// and the write, so such rows are read from memory once; wider rows read
// the rest twice.
//
// dw is deterministic: each backward block walks a fixed range of rows, its
// warps sum their rows' dy ⊙ x · r into a warp-private f32 row of shared
// memory (a lane only touches its own columns), the block adds its warps'
// rows in warp order into partial[block] (stream-ordered scratch), and a
// second kernel adds partial[0..B) in order to dw. The block count depends
// on the shape only, so every run sums in the same order.
#include "ops/cuda/elementwise.cuh"
#include "ops/rmsnorm.h"

namespace loom::ops::cuda {
namespace {

constexpr int kSliceCols = 32 * kVec;  // columns a warp covers per step
constexpr int kRowWarps = 8;           // warps (rows) a forward block
constexpr int64_t kMaxSmemBytes = 192 << 10;
constexpr int kCached = 8;  // column groups a lane holds in registers: rows up to D = 2048 are read once

template <typename T>
__global__ void ForwardKernel(const T* x, const float* w, int64_t rows, int64_t d, float eps, bool vectorized, T* y,
                              float* rstd) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * d;
  // The first kCached column groups are loaded once, all at the start.
  RawVec<T> xc[kCached];
#pragma unroll
  for (int g = 0; g < kCached; ++g)
    if (g * kSliceCols + lane * kVec < d) LoadRaw(xr, g * kSliceCols + lane * kVec, d, vectorized, xc[g]);
  float ss = 0;
  auto sum_squares = [&](const float (&v)[kVec]) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) ss += v[e] * v[e];
  };
#pragma unroll
  for (int g = 0; g < kCached; ++g) {
    if (g * kSliceCols + lane * kVec >= d) break;
    float v[kVec];
    Unpack(xc[g], v);
    sum_squares(v);
  }
  for (int64_t col = kCached * kSliceCols + lane * kVec; col < d; col += kSliceCols) {
    float v[kVec];
    LoadCols(xr, col, d, vectorized, v);
    sum_squares(v);
  }
  const float r = rsqrtf(WarpSum(ss) / static_cast<float>(d) + eps);
  if (lane == 0) rstd[row] = r;
  auto write = [&](int64_t col, float (&v)[kVec]) {
    float wv[kVec];
    if (w != nullptr) {
      LoadCols(w, col, d, vectorized, wv);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) wv[e] = 1.0f;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = v[e] * r * wv[e];
    StoreCols(y + row * d, col, d, vectorized, v);
  };
#pragma unroll
  for (int g = 0; g < kCached; ++g) {
    const int64_t col = g * kSliceCols + lane * kVec;
    if (col >= d) break;
    float v[kVec];
    Unpack(xc[g], v);
    write(col, v);
  }
  for (int64_t col = kCached * kSliceCols + lane * kVec; col < d; col += kSliceCols) {
    float v[kVec];
    LoadCols(xr, col, d, vectorized, v);
    write(col, v);
  }
}

// Block b walks rows [b·rows_per_block, (b+1)·rows_per_block), warp w every
// warps-th of them. With dw wanted (partial != nullptr) shared memory holds
// one f32 row of `stride` (D rounded up to 256) per warp.
template <typename T>
__global__ void BackwardKernel(const T* x, const float* w, const float* rstd, const T* dy, const T* add, int64_t rows,
                               int64_t d, int64_t stride, int64_t rows_per_block, bool vectorized, T* dx,
                               float* partial) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* mine = smem + warp * stride;
  if (partial != nullptr) {
    for (int64_t col = lane * kVec; col < d; col += kSliceCols) {
      reinterpret_cast<float4*>(mine + col)[0] = make_float4(0, 0, 0, 0);
      reinterpret_cast<float4*>(mine + col)[1] = make_float4(0, 0, 0, 0);
    }
  }
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row1 = row0 + rows_per_block < rows ? row0 + rows_per_block : rows;
  for (int64_t row = row0 + warp; row < row1; row += warps) {
    const T* xr = x + row * d;
    const T* dyr = dy + row * d;
    RawVec<T> xc[kCached], dyc[kCached];
#pragma unroll
    for (int g = 0; g < kCached; ++g) {
      const int64_t col = g * kSliceCols + lane * kVec;
      if (col < d) {
        LoadRaw(xr, col, d, vectorized, xc[g]);
        LoadRaw(dyr, col, d, vectorized, dyc[g]);
      }
    }
    float gx = 0;
    auto dot = [&](int64_t col, const float (&xv)[kVec], const float (&dyv)[kVec]) {
      float wv[kVec];
      if (w != nullptr) {
        LoadCols(w, col, d, vectorized, wv);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) wv[e] = 1.0f;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) gx += dyv[e] * wv[e] * xv[e];
    };
#pragma unroll
    for (int g = 0; g < kCached; ++g) {
      const int64_t col = g * kSliceCols + lane * kVec;
      if (col >= d) break;
      float xv[kVec], dyv[kVec];
      Unpack(xc[g], xv);
      Unpack(dyc[g], dyv);
      dot(col, xv, dyv);
    }
    for (int64_t col = kCached * kSliceCols + lane * kVec; col < d; col += kSliceCols) {
      float xv[kVec], dyv[kVec];
      LoadCols(xr, col, d, vectorized, xv);
      LoadCols(dyr, col, d, vectorized, dyv);
      dot(col, xv, dyv);
    }
    const float r = rstd[row];
    const float c = r * r * WarpSum(gx) / static_cast<float>(d);
    auto write = [&](int64_t col, const float (&xv)[kVec], const float (&dyv)[kVec]) {
      float wv[kVec], out[kVec];
      if (w != nullptr) {
        LoadCols(w, col, d, vectorized, wv);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) wv[e] = 1.0f;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) out[e] = r * (dyv[e] * wv[e] - xv[e] * c);
      if (add != nullptr) {  // read before dx (which may be add) is written
        float av[kVec];
        LoadCols(add + row * d, col, d, vectorized, av);
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] += av[e];
      }
      if (partial != nullptr) {
        float4* m = reinterpret_cast<float4*>(mine + col);
        float4 a = m[0], b = m[1];
        a.x += dyv[0] * xv[0] * r, a.y += dyv[1] * xv[1] * r, a.z += dyv[2] * xv[2] * r, a.w += dyv[3] * xv[3] * r;
        b.x += dyv[4] * xv[4] * r, b.y += dyv[5] * xv[5] * r, b.z += dyv[6] * xv[6] * r, b.w += dyv[7] * xv[7] * r;
        m[0] = a, m[1] = b;
      }
      StoreCols(dx + row * d, col, d, vectorized, out);
    };
#pragma unroll
    for (int g = 0; g < kCached; ++g) {
      const int64_t col = g * kSliceCols + lane * kVec;
      if (col >= d) break;
      float xv[kVec], dyv[kVec];
      Unpack(xc[g], xv);
      Unpack(dyc[g], dyv);
      write(col, xv, dyv);
    }
    for (int64_t col = kCached * kSliceCols + lane * kVec; col < d; col += kSliceCols) {
      float xv[kVec], dyv[kVec];
      LoadCols(xr, col, d, vectorized, xv);
      LoadCols(dyr, col, d, vectorized, dyv);
      write(col, xv, dyv);
    }
  }
  if (partial == nullptr) return;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float s = 0;
    for (int k = 0; k < warps; ++k) s += smem[k * stride + j];
    partial[blockIdx.x * d + j] = s;
  }
}
static_assert(kVec == 8, "BackwardKernel's shared-memory update is written for 8 columns a lane");

// dw[j] += Σ_b partial[b][j], b in order: 8 groups of threads take every
// 8th block, then the groups are added in order.
__global__ void SumPartialsKernel(const float* partial, int64_t blocks, int64_t d, float* dw) {
  __shared__ float group[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0;
  if (col < d)
    for (int64_t b = threadIdx.y; b < blocks; b += 8) acc += partial[b * d + col];
  group[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || col >= d) return;
  float sum = 0;
  for (int k = 0; k < 8; ++k) sum += group[k][threadIdx.x];
  dw[col] += sum;
}

// Returns D after checking x, w and rstd.
int64_t CheckArgs(const Tensor& x, const Tensor& w, const Tensor& rstd) {
  LOOM_CHECK(x.defined() && !x.device().is_cpu() && (x.dtype() == DType::kF32 || x.dtype() == DType::kBF16),
             "[rmsnorm] CUDA: x must be f32 or bf16 on a GPU, got ", DTypeName(x.dtype()), " on ",
             x.device().ToString());
  LOOM_CHECK(x.ndim() >= 1 && x.dim(-1) > 0, "[rmsnorm] CUDA: x ", ShapeString(x.shape()),
             " needs a non-empty last dimension");
  const int64_t d = x.dim(-1);
  LOOM_CHECK(!w.defined() || (w.numel() == d && w.dtype() == DType::kF32 && w.device() == x.device()),
             "[rmsnorm] CUDA: w ", ShapeString(w.shape()), " ", DTypeName(w.dtype()), " must be [", d, "] f32 on ",
             x.device().ToString(), " (the master weight)");
  LOOM_CHECK(rstd.defined() && rstd.numel() == x.numel() / d && rstd.dtype() == DType::kF32 &&
                 rstd.device() == x.device(),
             "[rmsnorm] CUDA: rstd ", ShapeString(rstd.shape()), " ", DTypeName(rstd.dtype()),
             " must hold one f32 per row of x ", ShapeString(x.shape()));
  LOOM_CUDA_CHECK(cudaSetDevice(x.device().index));
  return d;
}

}  // namespace

void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd, CudaStream stream) {
  NvtxRange range("RmsNormForward");
  const int64_t d = CheckArgs(x, w, rstd);
  CheckLike("rmsnorm", y, x, "y", "x");
  const int64_t rows = x.numel() / d;
  if (rows == 0) return;
  const float* wp = w.defined() ? w.data<float>() : nullptr;
  const bool vectorized = d % kVec == 0 && Aligned16(x.raw()) && Aligned16(y.raw()) && (!wp || Aligned16(wp));
  LOOM_DISPATCH_ACTIVATION("rmsnorm", x.dtype(), T, [&] {
    ForwardKernel<T><<<static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps), 32 * kRowWarps, 0,
                       Native(stream)>>>(static_cast<const T*>(x.raw()), wp, rows, d, static_cast<float>(eps),
                                         vectorized, static_cast<T*>(y.raw()), rstd.data<float>());
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx, Tensor& dw,
                     const Tensor* add, CudaStream stream) {
  NvtxRange range("RmsNormBackward");
  const int64_t d = CheckArgs(x, w, rstd);
  CheckLike("rmsnorm", dy, x, "dy", "x");
  CheckLike("rmsnorm", dx, x, "dx", "x");
  if (add != nullptr) CheckLike("rmsnorm", *add, x, "add", "x");
  if (w.defined()) {
    LOOM_CHECK(dw.defined() && dw.numel() == d && dw.dtype() == DType::kF32 && dw.device() == x.device(),
               "[rmsnorm] CUDA: dw ", ShapeString(dw.shape()), " ", DTypeName(dw.dtype()), " must be [", d,
               "] f32 on ", x.device().ToString(), " like w");
  }
  const int64_t rows = x.numel() / d;
  if (rows == 0) return;
  const cudaStream_t s = Native(stream);
  const float* wp = w.defined() ? w.data<float>() : nullptr;
  const bool vectorized = d % kVec == 0 && Aligned16(x.raw()) && Aligned16(dy.raw()) && Aligned16(dx.raw()) &&
                          (!wp || Aligned16(wp)) && (add == nullptr || Aligned16(add->raw()));
  // Shape-only launch plan (the order of the dw sums follows it).
  const int64_t stride = (d + kSliceCols - 1) / kSliceCols * kSliceCols;
  const int64_t row_bytes = stride * static_cast<int64_t>(sizeof(float));
  const int warps = w.defined() ? static_cast<int>(std::min<int64_t>(8, kMaxSmemBytes / row_bytes)) : 8;
  LOOM_CHECK(warps >= 1, "[rmsnorm] CUDA: D = ", d, " is too wide for the dw partial sums in shared memory");
  const int64_t max_blocks = std::clamp<int64_t>((int64_t{1} << 19) / stride, 64, 2048);
  const int64_t blocks = std::min<int64_t>((rows + warps - 1) / warps, max_blocks);
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  const size_t smem = w.defined() ? static_cast<size_t>(warps * row_bytes) : 0;
  float* partial = nullptr;
  if (w.defined()) {
    partial = static_cast<float*>(CudaAllocAsync(blocks * d * sizeof(float), s));
  }
  LOOM_DISPATCH_ACTIVATION("rmsnorm", x.dtype(), T, [&] {
    if (smem > (48 << 10)) {
      LOOM_CUDA_CHECK(cudaFuncSetAttribute(BackwardKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
    }
    BackwardKernel<T><<<static_cast<unsigned>(blocks), 32 * warps, smem, s>>>(
        static_cast<const T*>(x.raw()), wp, rstd.data<float>(), static_cast<const T*>(dy.raw()),
        add != nullptr ? static_cast<const T*>(add->raw()) : nullptr, rows, d, stride,
        rows_per_block, vectorized, static_cast<T*>(dx.raw()), partial);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
  if (w.defined()) {
    SumPartialsKernel<<<static_cast<unsigned>((d + 31) / 32), dim3(32, 8), 0, s>>>(partial, blocks, d,
                                                                                  dw.data<float>());
    LOOM_CUDA_CHECK(cudaGetLastError());
    LOOM_CUDA_CHECK(cudaFreeAsync(partial, s));
  }
}

}  // namespace loom::ops::cuda
