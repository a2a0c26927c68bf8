// CUDA token embedding (see ops/embedding.h). ids i32, table and out f32 or
// bf16 (one dtype); the gradient dtable is f32 and accumulated, dout f32 or
// bf16. A slice holds global rows [first, first + V): other ids give zero
// rows forward and no gradient. The whole-table ops are the slice at 0,
// except that an id outside [0, V) is a bug there (the kernel prints it and
// traps, as the CPU op fails its check).
//
// Forward: a row copy, one kVec vector a thread.
//
// Backward, deterministic (the same bits every run, no floating atomics):
//   1. key[i] = ids[i] − first, or V (outside the slice, sorted last);
//      token[i] = i.
//   2. A stable radix sort of (key, token): each row's tokens end up
//      together, in token order.
//   3. Chunks of 32 sorted positions, one warp a chunk and 256 columns: the
//      warp sums its tokens' dout rows in order, one piece per key. A piece
//      whose key lies wholly inside the chunk is added to dtable (no other
//      warp touches that row and column range). A key that crosses a chunk
//      boundary leaves its pieces in scratch: `head` of a chunk its key came
//      from the chunk before, `tail` of the chunk where it starts.
//   4. One warp per chunk with a tail walks the chain tail[c] + head[c+1] +
//      head[c+2] + ... in order and adds it to dtable.
// A frequent token (thousands of copies) is spread over many warps in
// step 3, so the time does not hang on one row.
#include <cub/device/device_radix_sort.cuh>

#include "ops/cuda/elementwise.cuh"
#include "ops/embedding.h"

namespace loom::ops::cuda {
namespace {

constexpr int kChunk = 32;          // sorted positions a warp of step 3 sums (one a lane)
constexpr int kSliceCols = 32 * kVec;  // columns a warp covers
constexpr int kWarps = 8;           // warps a block

template <typename T>
__global__ void GatherKernel(const int32_t* ids, int64_t n, int64_t d, const T* table, int64_t first, int64_t rows,
                             bool strict, bool vectorized, T* out) {
  const int64_t per_row = (d + kVec - 1) / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n * per_row; i += stride) {
    const int64_t t = i / per_row, col = (i % per_row) * kVec;
    const int64_t r = static_cast<int64_t>(ids[t]) - first;
    float v[kVec] = {};
    if (r >= 0 && r < rows) {
      LoadCols(table + r * d, col, d, vectorized, v);
    } else if (strict) {
      printf("[embedding] CUDA: id %d at position %lld is outside the table's [0, %lld)\n", ids[t],
             static_cast<long long>(t), static_cast<long long>(rows));
      __trap();
    }
    StoreCols(out + t * d, col, d, vectorized, v);
  }
}

__global__ void KeysKernel(const int32_t* ids, int64_t n, int64_t first, int64_t rows, bool strict, int32_t* keys,
                           int32_t* tokens) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t r = static_cast<int64_t>(ids[i]) - first;
  const bool inside = r >= 0 && r < rows;
  if (!inside && strict) {
    printf("[embedding] CUDA: id %d at position %lld is outside the table's [0, %lld)\n", ids[i],
           static_cast<long long>(i), static_cast<long long>(rows));
    __trap();
  }
  keys[i] = inside ? static_cast<int32_t>(r) : static_cast<int32_t>(rows);
  tokens[i] = static_cast<int32_t>(i);
}

__device__ __forceinline__ void AddCols(float* row, int64_t col, int64_t d, bool vectorized, const float (&v)[kVec]) {
  float cur[kVec];
  LoadCols(row, col, d, vectorized, cur);
#pragma unroll
  for (int e = 0; e < kVec; ++e) cur[e] += v[e];
  StoreCols(row, col, d, vectorized, cur);
}

// Step 3. Warp (chunk c = blockIdx.x · kWarps + warp, slice blockIdx.y).
template <typename T>
__global__ void ChunkSumKernel(const int32_t* keys, const int32_t* tokens, int64_t n, int64_t d, int32_t sentinel,
                               const T* dout, bool vectorized, float* dtable, float* head, float* tail) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t p0 = c * kChunk;
  if (p0 >= n) return;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kSliceCols + lane * kVec;
  const bool has_cols = col < d;
  const int len = n - p0 < kChunk ? static_cast<int>(n - p0) : kChunk;
  const int32_t my_key = lane < len ? keys[p0 + lane] : -1;
  const int32_t my_token = lane < len ? tokens[p0 + lane] : 0;
  const int32_t key_before = c > 0 ? keys[p0 - 1] : -1;
  const int32_t key_after = p0 + kChunk < n ? keys[p0 + kChunk] : -1;

  float acc[kVec] = {};
  int32_t cur = __shfl_sync(0xffffffffu, my_key, 0);
  bool first_piece = true;
  // Where the piece of `key` that ends here goes (see the file comment).
  auto flush = [&](int32_t key, bool open_end) {
    if (key == sentinel || !has_cols) return;
    const bool open_start = first_piece && key == key_before;
    if (open_start) {
      StoreCols(head + c * d, col, d, vectorized, acc);
    } else if (open_end) {
      StoreCols(tail + c * d, col, d, vectorized, acc);
    } else {
      AddCols(dtable + static_cast<int64_t>(key) * d, col, d, vectorized, acc);
    }
  };
  constexpr int kInFlight = 4;  // rows loaded before they are summed
  for (int j0 = 0; j0 < len; j0 += kInFlight) {
    float row[kInFlight][kVec];
    int32_t key[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      key[u] = __shfl_sync(0xffffffffu, my_key, (j0 + u) % 32);
      const int32_t token = __shfl_sync(0xffffffffu, my_token, (j0 + u) % 32);
      if (j0 + u < len && has_cols && key[u] != sentinel) {
        LoadCols(dout + static_cast<int64_t>(token) * d, col, d, vectorized, row[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) row[u][e] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (j0 + u >= len) break;
      if (key[u] != cur) {
        flush(cur, /*open_end=*/false);
        first_piece = false;
        cur = key[u];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += row[u][e];
    }
  }
  flush(cur, /*open_end=*/cur == key_after);
}

// Step 4. Warp (chunk c, slice blockIdx.y): if a key starts in chunk c and
// runs past its end, sum tail[c], head[c+1], ... in order into dtable.
__global__ void ChainSumKernel(const int32_t* keys, int64_t n, int64_t d, int32_t sentinel, const float* head,
                               const float* tail, bool vectorized, float* dtable) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t p0 = c * kChunk;
  if (p0 + kChunk >= n) return;  // the last chunk has nothing after it
  const int32_t last = keys[p0 + kChunk - 1];
  if (last == sentinel || keys[p0 + kChunk] != last) return;  // no piece open at the end
  if (keys[p0] == last && c > 0 && keys[p0 - 1] == last) return;  // the key started before: a head, not a tail
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kSliceCols + lane * kVec;
  if (col >= d) return;
  // The key's run ends before `lo`: the first sorted position past it
  // (binary search, so the loads of the sum below do not wait on a walk).
  int64_t lo = p0 + kChunk, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] == last) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t c_end = (lo - 1) / kChunk;  // the chunk holding the run's last token
  float sum[kVec];
  LoadCols(tail + c * d, col, d, vectorized, sum);
#pragma unroll 8
  for (int64_t c2 = c + 1; c2 <= c_end; ++c2) {
    float part[kVec];
    LoadCols(head + c2 * d, col, d, vectorized, part);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum[e] += part[e];
  }
  AddCols(dtable + static_cast<int64_t>(last) * d, col, d, vectorized, sum);
}

void CheckIds(const Tensor& ids, const Tensor& rows_of, const char* rows_name) {
  LOOM_CHECK(ids.defined() && !ids.device().is_cpu() && ids.dtype() == DType::kI32, "[embedding] CUDA: ids must be "
             "i32 on a GPU, got ", DTypeName(ids.dtype()), " on ", ids.device().ToString());
  LOOM_CHECK(rows_of.defined() && rows_of.device() == ids.device() && rows_of.ndim() == 2, "[embedding] CUDA: ",
             rows_name, " must be [V, D] on ", ids.device().ToString(), ", got ", ShapeString(rows_of.shape()), " on ",
             rows_of.device().ToString());
  LOOM_CHECK(ids.numel() < (int64_t{1} << 31) && rows_of.dim(0) < (int64_t{1} << 31) - 1,
             "[embedding] CUDA: ", ids.numel(), " ids or ", rows_of.dim(0), " rows do not fit the i32 sort keys");
  LOOM_CUDA_CHECK(cudaSetDevice(ids.device().index));
}

void Forward(const Tensor& ids, const Tensor& table, int64_t first, bool strict, Tensor& out, CudaStream stream) {
  NvtxRange range("EmbeddingForward");
  CheckIds(ids, table, "table");
  const int64_t n = ids.numel(), d = table.dim(1);
  LOOM_CHECK(out.device() == ids.device() && out.dtype() == table.dtype() && out.numel() == n * d,
             "[embedding] CUDA: out ", ShapeString(out.shape()), " ", DTypeName(out.dtype()), " must hold [", n, ", ",
             d, "] ", DTypeName(table.dtype()), " on ", ids.device().ToString());
  if (n == 0 || d == 0) return;
  LOOM_DISPATCH_ACTIVATION("embedding", table.dtype(), T, [&] {
    const T* tp = static_cast<const T*>(table.raw());
    T* op = static_cast<T*>(out.raw());
    const bool vectorized = d % kVec == 0 && Aligned16(tp) && Aligned16(op);
    GatherKernel<<<GridFor(n * ((d + kVec - 1) / kVec)), 256, 0, Native(stream)>>>(
        ids.data<int32_t>(), n, d, tp, first, table.dim(0), strict, vectorized, op);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
}

void Backward(const Tensor& ids, const Tensor& dout, int64_t first, bool strict, Tensor& dtable, CudaStream stream) {
  NvtxRange range("EmbeddingBackward");
  CheckIds(ids, dtable, "dtable");
  const int64_t n = ids.numel(), d = dtable.dim(1), rows = dtable.dim(0);
  LOOM_CHECK(dtable.dtype() == DType::kF32, "[embedding] CUDA: dtable must be f32 (gradients accumulate in f32), got ",
             DTypeName(dtable.dtype()));
  LOOM_CHECK(dout.device() == ids.device() && dout.numel() == n * d, "[embedding] CUDA: dout ",
             ShapeString(dout.shape()), " must hold [", n, ", ", d, "] on ", ids.device().ToString());
  if (n == 0 || d == 0) return;
  const cudaStream_t s = Native(stream);
  int end_bit = 1;
  while ((int64_t{1} << end_bit) <= rows) ++end_bit;  // keys run to `rows` (the sentinel)

  const int64_t chunks = (n + kChunk - 1) / kChunk;
  size_t sort_bytes = 0;
  LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, end_bit, s));
  // One allocation: 4 i32 arrays of n, 2 f32 [chunks, d] scratch, the sort's temporary storage.
  const size_t ints = 4 * static_cast<size_t>(n) * sizeof(int32_t);
  const size_t pieces = 2 * static_cast<size_t>(chunks) * static_cast<size_t>(d) * sizeof(float);
  char* scratch = static_cast<char*>(CudaAllocAsync(ints + pieces + sort_bytes + 256, s));
  int32_t* keys_in = reinterpret_cast<int32_t*>(scratch);
  int32_t* tokens_in = keys_in + n;
  int32_t* keys = tokens_in + n;
  int32_t* tokens = keys + n;
  float* head = reinterpret_cast<float*>(scratch + ints);
  float* tail = head + chunks * d;
  void* sort_tmp = scratch + ((ints + pieces + 255) / 256) * 256;

  KeysKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(ids.data<int32_t>(), n, first, rows, strict,
                                                                     keys_in, tokens_in);
  LOOM_CUDA_CHECK(cudaGetLastError());
  LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys, tokens_in, tokens,
                                                  static_cast<int>(n), 0, end_bit, s));
  float* dt = dtable.data<float>();
  const dim3 grid(static_cast<unsigned>((chunks + kWarps - 1) / kWarps),
                  static_cast<unsigned>((d + kSliceCols - 1) / kSliceCols));
  LOOM_CHECK(grid.y < 65536, "[embedding] CUDA: ", d, " columns is too many");
  const auto sentinel = static_cast<int32_t>(rows);
  const bool vectorized = d % kVec == 0 && Aligned16(dt) && Aligned16(dout.raw());
  LOOM_DISPATCH_ACTIVATION("embedding", dout.dtype(), T, [&] {
    ChunkSumKernel<T><<<grid, 32 * kWarps, 0, s>>>(keys, tokens, n, d, sentinel, static_cast<const T*>(dout.raw()),
                                                   vectorized, dt, head, tail);
    LOOM_CUDA_CHECK(cudaGetLastError());
  });
  ChainSumKernel<<<grid, 32 * kWarps, 0, s>>>(keys, n, d, sentinel, head, tail, vectorized, dt);
  LOOM_CUDA_CHECK(cudaGetLastError());
  LOOM_CUDA_CHECK(cudaFreeAsync(scratch, s));
}

}  // namespace

void EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out, CudaStream stream) {
  Forward(ids, table, 0, /*strict=*/true, out, stream);
}
void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable, CudaStream stream) {
  Backward(ids, dout, 0, /*strict=*/true, dtable, stream);
}
void EmbeddingForwardSlice(const Tensor& ids, const Tensor& table, int64_t first_row, Tensor& out,
                           CudaStream stream) {
  Forward(ids, table, first_row, /*strict=*/false, out, stream);
}
void EmbeddingBackwardSlice(const Tensor& ids, const Tensor& dout, int64_t first_row, Tensor& dtable,
                            CudaStream stream) {
  Backward(ids, dout, first_row, /*strict=*/false, dtable, stream);
}

}  // namespace loom::ops::cuda
