// CUDA MoE permutation (math in ops/moe_permute.h).
//
// Index: a stable counting sort of the assignment ids by expert in three
// kernels. The ids are cut into chunks of kChunk; one warp a chunk walks it
// in order, 32 ids at a time, and __match_any_sync finds the lanes of the
// same expert, so an id's rank among its expert's ids of the chunk is its
// rank in its match group plus the group's earlier tiles:
//   count   counts[b, e] = ids of expert e in chunk b
//   scan    before[b, e] = Σ_{b' < b} counts[b', e];  start[e] = Σ_{e' < e} kept[e']
//   place   pos = before[b, e] + rank;  row = start[e] + pos if pos < kept[e], else −1
// Gather, combine and its backward: one block a row (of xe, of y, of a
// token), threads across the columns in 16-byte vectors; the gate dot is a
// warp-shuffle tree and then the warps in order, so every result is the
// same on every run.
#include <cuda_runtime.h>

#include "ops/cuda/elementwise.cuh"
#include "ops/moe_permute.h"

namespace loom::ops::cuda {
namespace {

constexpr int kChunk = 256;  // ids a warp walks
constexpr unsigned kFull = 0xffffffffu;

__global__ void CountKernel(const int32_t* __restrict__ experts, int64_t n, int e_count, int32_t* __restrict__ counts) {
  extern __shared__ int32_t seen[];  // [E]
  const int lane = threadIdx.x;
  for (int e = lane; e < e_count; e += 32) seen[e] = 0;
  __syncwarp();
  const int64_t begin = blockIdx.x * int64_t{kChunk}, end = min(begin + kChunk, n);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t id = base + lane;
    const int e = id < end ? experts[id] : -1;
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0 && lane == __ffs(peers) - 1) seen[e] += __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < e_count; e += 32) counts[blockIdx.x * int64_t{e_count} + e] = seen[e];
}

// One warp an expert (block e): counts [B, E] → before [B, E] (in place),
// 32 chunks at a time with a shuffle scan; start[e] = Σ_{e' < e} kept[e'].
__global__ void ScanKernel(int32_t* __restrict__ counts, int64_t blocks, int e_count, const int32_t* __restrict__ kept,
                           int32_t* __restrict__ start) {
  const int e = blockIdx.x, lane = threadIdx.x;
  int32_t running = 0;
  for (int64_t base = 0; base < blocks; base += 32) {
    const int64_t b = base + lane;
    const int32_t c = b < blocks ? counts[b * e_count + e] : 0;
    int32_t inclusive = c;
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t up = __shfl_up_sync(kFull, inclusive, o);
      if (lane >= o) inclusive += up;
    }
    if (b < blocks) counts[b * e_count + e] = running + inclusive - c;
    running += __shfl_sync(kFull, inclusive, 31);
  }
  if (lane == 0) {
    int32_t at = 0;
    for (int j = 0; j < e; ++j) at += kept[j];
    start[e] = at;
  }
}

__global__ void PlaceKernel(const int32_t* __restrict__ experts, int64_t n, int e_count,
                            const int32_t* __restrict__ before, const int32_t* __restrict__ kept,
                            const int32_t* __restrict__ start, int32_t* __restrict__ rows, int32_t* __restrict__ ids) {
  extern __shared__ int32_t seen[];  // [E] this chunk's ids so far
  const int lane = threadIdx.x;
  for (int e = lane; e < e_count; e += 32) seen[e] = before[blockIdx.x * int64_t{e_count} + e];
  __syncwarp();
  const int64_t begin = blockIdx.x * int64_t{kChunk}, end = min(begin + kChunk, n);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t id = base + lane;
    const int e = id < end ? experts[id] : -1;
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0) {
      const int32_t pos = seen[e] + __popc(peers & ((1u << lane) - 1));
      const int32_t row = pos < kept[e] ? start[e] + pos : -1;
      rows[id] = row;
      if (row >= 0) ids[row] = static_cast<int32_t>(id);
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) seen[e] += __popc(peers);
    __syncwarp();
  }
}

template <typename T>
__global__ void GatherKernel(const T* __restrict__ x, const int32_t* __restrict__ ids, int k, int64_t rows, int64_t c,
                             bool vectorized, T* __restrict__ xe) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* src = x + int64_t{ids[r] / k} * c;
    T* dst = xe + r * c;
    for (int64_t col = threadIdx.x * int64_t{kVec}; col < c; col += blockDim.x * int64_t{kVec}) {
      float v[kVec];
      LoadCols(src, col, c, vectorized, v);
      StoreCols(dst, col, c, vectorized, v);
    }
  }
}

template <typename T>
__global__ void CombineKernel(const T* __restrict__ ye, const int32_t* __restrict__ rows, const float* __restrict__ gates,
                              const T* __restrict__ add, int64_t tokens, int k, int64_t c, bool vectorized,
                              T* __restrict__ y) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t col = threadIdx.x * int64_t{kVec}; col < c; col += blockDim.x * int64_t{kVec}) {
      float acc[kVec] = {};
      for (int j = 0; j < k; ++j) {
        const int32_t r = rows[t * k + j];
        if (r < 0) continue;
        const float g = gates != nullptr ? gates[t * k + j] : 1.0f;
        float v[kVec];
        LoadCols(ye + int64_t{r} * c, col, c, vectorized, v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += g * v[i];
      }
      if (add != nullptr) {
        float v[kVec];
        LoadCols(add + t * c, col, c, vectorized, v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += v[i];
      }
      StoreCols(y + t * c, col, c, vectorized, acc);
    }
  }
}

template <typename T>
__global__ void CombineBackwardKernel(const T* __restrict__ dy, const T* __restrict__ ye, const int32_t* __restrict__ rows,
                                      const float* __restrict__ gates, int64_t tokens, int k, int64_t c, bool vectorized,
                                      T* __restrict__ dye, float* __restrict__ dgates) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int j = 0; j < k; ++j) {
      const int32_t r = rows[t * k + j];  // the same for the whole block
      if (r < 0) {
        if (threadIdx.x == 0) dgates[t * k + j] = 0.0f;
        continue;
      }
      const float g = gates[t * k + j];
      float dot = 0;
      for (int64_t col = threadIdx.x * int64_t{kVec}; col < c; col += blockDim.x * int64_t{kVec}) {
        float d[kVec], o[kVec], out[kVec];
        LoadCols(dy + t * c, col, c, vectorized, d);
        LoadCols(ye + int64_t{r} * c, col, c, vectorized, o);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          out[i] = g * d[i];
          dot += d[i] * o[i];
        }
        StoreCols(dye + int64_t{r} * c, col, c, vectorized, out);
      }
      dot = WarpSum(dot);
      if (lane == 0) warp_sums[warp] = dot;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0;
        for (int w = 0; w < warps; ++w) total += warp_sums[w];
        dgates[t * k + j] = total;
      }
      __syncthreads();
    }
  }
}

// Threads a row: enough 16-byte vectors for c columns, in whole warps, ≤ 256.
int RowThreads(int64_t c) {
  const int64_t vecs = (c + kVec - 1) / kVec;
  return static_cast<int>(std::clamp<int64_t>((vecs + 31) / 32 * 32, 32, 256));
}
unsigned RowBlocks(int64_t rows) { return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, int64_t{1} << 20)); }

void CheckIndex(const Tensor& t, const Tensor& like, const char* name) {
  LOOM_CHECK(t.dtype() == DType::kI32 && t.device() == like.device(), "[moe_permute] ", name,
             " must be i32 on ", like.device().ToString(), ", got ", DTypeName(t.dtype()), " on ",
             t.device().ToString());
}
void CheckRows2d(const Tensor& t, const Tensor& like, int64_t c, const char* name) {
  LOOM_CHECK(t.ndim() == 2 && t.dim(1) == c && t.dtype() == like.dtype() && t.device() == like.device() &&
                 (t.dtype() == DType::kF32 || t.dtype() == DType::kBF16),
             "[moe_permute] CUDA ", name, " ", ShapeString(t.shape()), " ", DTypeName(t.dtype()), " on ",
             t.device().ToString(), " must be [*, ", c, "] f32 or bf16 beside ", DTypeName(like.dtype()), " on ",
             like.device().ToString());
}
void CheckGates(const Tensor& g, const Tensor& rows, const char* name) {
  LOOM_CHECK(g.numel() == rows.numel() && g.dtype() == DType::kF32 && g.device() == rows.device(), "[moe_permute] ",
             name, " must be [T, k] f32 like rows ", ShapeString(rows.shape()), ", got ", ShapeString(g.shape()), " ",
             DTypeName(g.dtype()));
}

}  // namespace

void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out, CudaStream stream) {
  NvtxRange range("MoePermuteIndex");
  LOOM_CHECK(experts.ndim() == 2 && experts.dtype() == DType::kI32 && !experts.device().is_cpu(),
             "[moe_permute] CUDA experts must be [T, k] i32 on a GPU, got ", ShapeString(experts.shape()), " ",
             DTypeName(experts.dtype()), " on ", experts.device().ToString());
  const Device dev = experts.device();
  const int e_count = static_cast<int>(kept.size());
  const int64_t n = experts.numel();
  std::vector<int32_t> kept32(e_count);
  int64_t total = 0;
  for (int e = 0; e < e_count; ++e) {
    kept32[e] = static_cast<int32_t>(kept[e]);
    total += kept[e];
  }
  LOOM_CHECK(n < (int64_t{1} << 31) && e_count > 0, "[moe_permute] ", n, " assignments over ", e_count, " experts");
  out.counts = kept;
  out.rows = Tensor::Empty(experts.shape(), DType::kI32, dev);
  out.ids = Tensor::Empty({total}, DType::kI32, dev);
  if (n == 0) return;
  const int64_t blocks = (n + kChunk - 1) / kChunk;
  const Tensor kept_dev = Tensor::FromVector<int32_t>(kept32, {e_count}).To(dev);
  Tensor before = Tensor::Empty({blocks, e_count}, DType::kI32, dev), start = Tensor::Empty({e_count}, DType::kI32, dev);
  cudaStream_t s = Native(stream);
  const size_t shared = sizeof(int32_t) * e_count;
  CountKernel<<<static_cast<unsigned>(blocks), 32, shared, s>>>(experts.data<int32_t>(), n, e_count,
                                                                 before.data<int32_t>());
  LOOM_CUDA_CHECK(cudaGetLastError());
  ScanKernel<<<static_cast<unsigned>(e_count), 32, 0, s>>>(before.data<int32_t>(), blocks, e_count, kept_dev.data<int32_t>(),
                                                   start.data<int32_t>());
  LOOM_CUDA_CHECK(cudaGetLastError());
  PlaceKernel<<<static_cast<unsigned>(blocks), 32, shared, s>>>(experts.data<int32_t>(), n, e_count,
                                                                 before.data<int32_t>(), kept_dev.data<int32_t>(),
                                                                 start.data<int32_t>(), out.rows.data<int32_t>(),
                                                                 out.ids.data<int32_t>());
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MoeGather(const Tensor& x, const Tensor& ids, int k, Tensor& xe, CudaStream stream) {
  NvtxRange range("MoeGather");
  LOOM_CHECK(x.ndim() == 2, "[moe_permute] x must be [T, C], got ", ShapeString(x.shape()));
  const int64_t c = x.dim(1), rows = ids.numel();
  CheckRows2d(x, x, c, "x");
  CheckRows2d(xe, x, c, "xe");
  CheckIndex(ids, x, "ids");
  LOOM_CHECK(xe.dim(0) == rows, "[moe_permute] xe ", ShapeString(xe.shape()), " for ", rows, " ids");
  if (rows == 0) return;
  const bool vec = c % kVec == 0 && Aligned16(x.raw()) && Aligned16(xe.raw());
  LOOM_DISPATCH_ACTIVATION("moe_permute", x.dtype(), T, [&] {
    GatherKernel<T><<<RowBlocks(rows), RowThreads(c), 0, Native(stream)>>>(
        static_cast<const T*>(x.raw()), ids.data<int32_t>(), k, rows, c, vec, static_cast<T*>(xe.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* gates, const Tensor* add, Tensor& y,
                CudaStream stream) {
  NvtxRange range("MoeCombine");
  LOOM_CHECK(y.ndim() == 2 && rows.ndim() == 2 && rows.dim(0) == y.dim(0), "[moe_permute] y ",
             ShapeString(y.shape()), " and rows ", ShapeString(rows.shape()), " must be [T, C] and [T, k]");
  const int64_t c = y.dim(1), tokens = y.dim(0);
  CheckRows2d(y, y, c, "y");
  CheckRows2d(ye, y, c, "ye");
  CheckIndex(rows, y, "rows");
  if (gates != nullptr) CheckGates(*gates, rows, "gates");
  if (add != nullptr) {
    CheckRows2d(*add, y, c, "add");
    LOOM_CHECK(add->dim(0) == tokens, "[moe_permute] add ", ShapeString(add->shape()), " must match y");
  }
  if (tokens == 0) return;
  const bool vec = c % kVec == 0 && Aligned16(ye.raw()) && Aligned16(y.raw()) && (add == nullptr || Aligned16(add->raw()));
  LOOM_DISPATCH_ACTIVATION("moe_permute", y.dtype(), T, [&] {
    CombineKernel<T><<<RowBlocks(tokens), RowThreads(c), 0, Native(stream)>>>(
        static_cast<const T*>(ye.raw()), rows.data<int32_t>(), gates != nullptr ? gates->data<float>() : nullptr,
        add != nullptr ? static_cast<const T*>(add->raw()) : nullptr, tokens, static_cast<int>(rows.dim(1)), c, vec,
        static_cast<T*>(y.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MoeCombineBackward(const Tensor& dy, const Tensor& ye, const Tensor& rows, const Tensor& gates, Tensor& dye,
                        Tensor& dgates, CudaStream stream) {
  NvtxRange range("MoeCombineBackward");
  LOOM_CHECK(dy.ndim() == 2 && rows.ndim() == 2 && rows.dim(0) == dy.dim(0), "[moe_permute] dy ",
             ShapeString(dy.shape()), " and rows ", ShapeString(rows.shape()), " must be [T, C] and [T, k]");
  const int64_t c = dy.dim(1), tokens = dy.dim(0);
  CheckRows2d(dy, dy, c, "dy");
  CheckRows2d(ye, dy, c, "ye");
  CheckRows2d(dye, dy, c, "dye");
  LOOM_CHECK(dye.dim(0) == ye.dim(0), "[moe_permute] dye ", ShapeString(dye.shape()), " must match ye ",
             ShapeString(ye.shape()));
  CheckIndex(rows, dy, "rows");
  CheckGates(gates, rows, "gates");
  CheckGates(dgates, rows, "dgates");
  if (tokens == 0) return;
  const bool vec = c % kVec == 0 && Aligned16(dy.raw()) && Aligned16(ye.raw()) && Aligned16(dye.raw());
  LOOM_DISPATCH_ACTIVATION("moe_permute", dy.dtype(), T, [&] {
    CombineBackwardKernel<T><<<RowBlocks(tokens), RowThreads(c), 0, Native(stream)>>>(
        static_cast<const T*>(dy.raw()), static_cast<const T*>(ye.raw()), rows.data<int32_t>(), gates.data<float>(),
        tokens, static_cast<int>(rows.dim(1)), c, vec, static_cast<T*>(dye.raw()), dgates.data<float>());
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
