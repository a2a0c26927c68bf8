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
// Gather and combine: one group of lanes a token (it reads x[t] once and
// writes its k rows; or sums its k rows, the addend and the thin product,
// whose [n, C] w stays in the caches), the lanes across the columns in
// 16-byte vectors; rows narrower than a block share it (the [T·k, 1] gate
// moves: 256 tokens a block).
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
                            const int32_t* __restrict__ start, int32_t* __restrict__ rows) {
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
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) seen[e] += __popc(peers);
    __syncwarp();
  }
}

// Lanes a token: a power of two ≥ the row's vectors, at most a block; the
// block holds kBlock / lanes tokens.
constexpr int kBlock = 256;
struct RowLayout {
  int lanes, tokens_per_block;
};
RowLayout LayoutFor(int64_t c) {
  const int64_t vecs = (c + kVec - 1) / kVec;
  int lanes = 1;
  while (lanes < vecs && lanes < kBlock) lanes *= 2;
  return {lanes, kBlock / lanes};
}
unsigned TokenBlocks(int64_t tokens, RowLayout l) {
  return static_cast<unsigned>(std::clamp<int64_t>((tokens + l.tokens_per_block - 1) / l.tokens_per_block, 1,
                                                   int64_t{1} << 20));
}

template <typename T>
__global__ void GatherKernel(const T* __restrict__ x, const int32_t* __restrict__ rows, int64_t tokens, int k,
                             int64_t c, int lanes, bool vectorized, T* __restrict__ xe) {
  const int lane = threadIdx.x % lanes, per_block = blockDim.x / lanes;
  for (int64_t t = int64_t{blockIdx.x} * per_block + threadIdx.x / lanes; t < tokens;
       t += int64_t{gridDim.x} * per_block) {
    for (int64_t col = lane * int64_t{kVec}; col < c; col += lanes * int64_t{kVec}) {
      float v[kVec];
      LoadCols(x + t * c, col, c, vectorized, v);
      for (int j = 0; j < k; ++j) {
        const int32_t r = rows[t * k + j];
        if (r >= 0) StoreCols(xe + int64_t{r} * c, col, c, vectorized, v);
      }
    }
  }
}

template <typename T>
__global__ void CombineKernel(const T* __restrict__ ye, const int32_t* __restrict__ rows, const T* __restrict__ add,
                              const T* __restrict__ a, const T* __restrict__ w, int n, int64_t tokens, int k,
                              int64_t c, int lanes, bool vectorized, T* __restrict__ y) {
  const int lane = threadIdx.x % lanes, per_block = blockDim.x / lanes;
  for (int64_t t = int64_t{blockIdx.x} * per_block + threadIdx.x / lanes; t < tokens;
       t += int64_t{gridDim.x} * per_block) {
    for (int64_t col = lane * int64_t{kVec}; col < c; col += lanes * int64_t{kVec}) {
      float acc[kVec] = {};
      for (int j = 0; j < k; ++j) {
        const int32_t r = rows[t * k + j];
        if (r < 0) continue;
        float v[kVec];
        LoadCols(ye + int64_t{r} * c, col, c, vectorized, v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += v[i];
      }
      if (add != nullptr) {
        float v[kVec];
        LoadCols(add + t * c, col, c, vectorized, v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += v[i];
      }
      if (a != nullptr) {
        float thin[kVec] = {};
        for (int e = 0; e < n; ++e) {
          const float ae = ToF32(a[t * n + e]);
          float v[kVec];
          LoadCols(w + int64_t{e} * c, col, c, vectorized, v);
#pragma unroll
          for (int i = 0; i < kVec; ++i) thin[i] += ae * v[i];
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += thin[i];
      }
      StoreCols(y + t * c, col, c, vectorized, acc);
    }
  }
}

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
}  // namespace

void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out, CudaStream stream) {
  NvtxRange range("MoePermuteIndex");
  LOOM_CHECK(experts.ndim() == 2 && experts.dtype() == DType::kI32 && !experts.device().is_cpu(),
             "[moe_permute] CUDA experts must be [T, k] i32 on a GPU, got ", ShapeString(experts.shape()), " ",
             DTypeName(experts.dtype()), " on ", experts.device().ToString());
  const Device dev = experts.device();
  const int e_count = static_cast<int>(kept.size());
  const int64_t n = experts.numel();
  std::vector<int32_t> kept32(kept.begin(), kept.end());
  LOOM_CHECK(n < (int64_t{1} << 31) && e_count > 0, "[moe_permute] ", n, " assignments over ", e_count, " experts");
  out.counts = kept;
  out.rows = Tensor::Empty(experts.shape(), DType::kI32, dev);
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
                                                                 start.data<int32_t>(), out.rows.data<int32_t>());
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MoeGather(const Tensor& x, const Tensor& rows, Tensor& xe, CudaStream stream) {
  NvtxRange range("MoeGather");
  LOOM_CHECK(x.ndim() == 2 && rows.ndim() == 2 && rows.dim(0) == x.dim(0), "[moe_permute] x ",
             ShapeString(x.shape()), " and rows ", ShapeString(rows.shape()), " must be [T, C] and [T, k]");
  const int64_t c = x.dim(1), tokens = x.dim(0);
  CheckRows2d(x, x, c, "x");
  CheckRows2d(xe, x, c, "xe");
  CheckIndex(rows, x, "rows");
  if (tokens == 0 || xe.dim(0) == 0) return;
  const bool vec = c % kVec == 0 && Aligned16(x.raw()) && Aligned16(xe.raw());
  const RowLayout l = LayoutFor(c);
  LOOM_DISPATCH_ACTIVATION("moe_permute", x.dtype(), T, [&] {
    GatherKernel<T><<<TokenBlocks(tokens, l), kBlock, 0, Native(stream)>>>(
        static_cast<const T*>(x.raw()), rows.data<int32_t>(), tokens, static_cast<int>(rows.dim(1)), c, l.lanes, vec,
        static_cast<T*>(xe.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* add, Tensor& y, const Tensor* a,
                const Tensor* w, CudaStream stream) {
  NvtxRange range("MoeCombine");
  LOOM_CHECK(y.ndim() == 2 && rows.ndim() == 2 && rows.dim(0) == y.dim(0), "[moe_permute] y ",
             ShapeString(y.shape()), " and rows ", ShapeString(rows.shape()), " must be [T, C] and [T, k]");
  const int64_t c = y.dim(1), tokens = y.dim(0);
  CheckRows2d(y, y, c, "y");
  CheckRows2d(ye, y, c, "ye");
  CheckIndex(rows, y, "rows");
  if (add != nullptr) {
    CheckRows2d(*add, y, c, "add");
    LOOM_CHECK(add->dim(0) == tokens, "[moe_permute] add ", ShapeString(add->shape()), " must match y");
  }
  LOOM_CHECK((a == nullptr) == (w == nullptr), "[moe_permute] combine: a and w go together");
  if (a != nullptr) {
    CheckRows2d(*w, y, c, "w");
    LOOM_CHECK(a->ndim() == 2 && a->dim(0) == tokens && a->dim(1) == w->dim(0) && a->dtype() == y.dtype() &&
                   a->device() == y.device(),
               "[moe_permute] combine: a ", ShapeString(a->shape()), " ", DTypeName(a->dtype()), " must be [",
               tokens, ", ", w->dim(0), "] ", DTypeName(y.dtype()), " for w ", ShapeString(w->shape()));
  }
  if (tokens == 0) return;
  const bool vec = c % kVec == 0 && Aligned16(ye.raw()) && Aligned16(y.raw()) &&
                   (add == nullptr || Aligned16(add->raw())) && (w == nullptr || Aligned16(w->raw()));
  const RowLayout l = LayoutFor(c);
  LOOM_DISPATCH_ACTIVATION("moe_permute", y.dtype(), T, [&] {
    CombineKernel<T><<<TokenBlocks(tokens, l), kBlock, 0, Native(stream)>>>(
        static_cast<const T*>(ye.raw()), rows.data<int32_t>(), add != nullptr ? static_cast<const T*>(add->raw()) : nullptr,
        a != nullptr ? static_cast<const T*>(a->raw()) : nullptr, w != nullptr ? static_cast<const T*>(w->raw()) : nullptr,
        a != nullptr ? static_cast<int>(a->dim(1)) : 0, tokens, static_cast<int>(rows.dim(1)), c, l.lanes, vec,
        static_cast<T*>(y.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
