// CUDA cross-entropy fused with the output projection (see
// ops/cross_entropy.h and the CPU reference ops/cpu/cross_entropy.cc).
// Rows go through in chunks; for a chunk hb = h[r0 : r0+B]:
//   logits [B, Vp] f32 = hb · Wᵀ                       (cuBLASLt, f32 out)
//   per row (one block): max and argmax over c < vocab, s = Σ exp(l − max)
//     (online, one pass), lse = max + log s, loss_r = lse − l[target]
//   dlogits = (exp(l − lse) − onehot(target)) / normalizer, 0 on columns
//     ≥ vocab and on ignored rows: over the logits (f32), or into a bf16
//     buffer when h and W are bf16 (Megatron and Liger do the same: the two
//     GEMMs below then read bf16 and accumulate in f32)
//   dh[r0 : r0+B] = dlogits · W   (written, h's dtype)
//   dW           += dlogitsᵀ · hb (f32)
// In bf16 the two gradient GEMMs take a group of up to 4 chunks' bf16
// dlogits at once (CrossEntropyGradRows): dW, 262 MB of f32 at Vp = 32,000
// and D = 2,048, is read and written once a group, not once a chunk.
// Per-row losses go to an [N] f32 buffer that one block sums in f64 in a
// fixed order at the end, with the counted rows and the bad targets; that
// one result is the only device-to-host copy.
//
// Chunk: about 256 MiB of f32 logits (2,048 rows at Vp = 32,000), plus a
// group's bf16 dlogits (4 chunks, 500 MiB) for bf16 inputs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <utility>

#include "ops/cross_entropy.h"
#include "ops/matmul.h"
#include "runtime/cuda_check.h"

namespace loom::ops::cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kSumThreads = 1024;

std::atomic<int64_t> g_chunk_rows_for_testing{0};

// A partial softmax of some columns: their max, Σ exp(l − max), and the
// lowest column holding the max.
struct Partial {
  float max;
  float sum;
  int64_t arg;
};

__device__ Partial Combine(const Partial& a, const Partial& b) {
  if (b.arg < 0) return a;  // no columns on that side
  if (a.arg < 0) return b;
  const float m = fmaxf(a.max, b.max);
  Partial r;
  r.max = m;
  r.sum = a.sum * expf(a.max - m) + b.sum * expf(b.max - m);
  r.arg = a.max > b.max ? a.arg : b.max > a.max ? b.arg : min(a.arg, b.arg);
  return r;
}

__device__ Partial ShuffleDown(const Partial& p, int offset) {
  Partial q;
  q.max = __shfl_down_sync(0xffffffffu, p.max, offset);
  q.sum = __shfl_down_sync(0xffffffffu, p.sum, offset);
  q.arg = __shfl_down_sync(0xffffffffu, p.arg, offset);
  return q;
}

template <typename G>
__device__ void Store(G* p, float v);
template <>
__device__ void Store<float>(float* p, float v) { *p = v; }
template <>
__device__ void Store<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// One block a row of logits [rows, vp]. dlogits go to `grad` (which may be
// `logits` itself: each thread reads its element before writing it); null
// grad: loss only.
template <typename G>
__global__ void __launch_bounds__(kRowThreads)
    SoftmaxRowsKernel(float* logits, G* grad, int64_t vp, int64_t vocab, const int32_t* target,
                      int32_t ignore_index, float scale, int32_t* predictions, float* row_loss) {
  const int64_t row = blockIdx.x;
  const float* l = logits + row * vp;
  const int32_t t = target[row];
  const bool counted = t != ignore_index && t >= 0 && t < vocab;  // bad targets are reported by SumLossKernel
  const float target_logit = counted ? l[t] : 0.0f;  // read before any thread overwrites the row
  Partial p{-INFINITY, 0.0f, -1};
  for (int64_t c = threadIdx.x; c < vocab; c += kRowThreads) {
    const float x = l[c];
    if (p.arg < 0 || x > p.max) {
      p.sum = p.arg < 0 ? 1.0f : p.sum * expf(p.max - x) + 1.0f;
      p.max = x;
      p.arg = c;
    } else {
      p.sum += expf(x - p.max);
    }
  }
  for (int o = 16; o > 0; o >>= 1) p = Combine(p, ShuffleDown(p, o));
  __shared__ Partial warps[kRowThreads / 32];
  __shared__ Partial total;
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = p;
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial t = warps[0];
    for (int i = 1; i < kRowThreads / 32; ++i) t = Combine(t, warps[i]);
    total = t;
  }
  __syncthreads();
  const float lse = total.max + logf(total.sum);
  if (threadIdx.x == 0) {
    if (predictions != nullptr) predictions[row] = static_cast<int32_t>(total.arg);
    row_loss[row] = counted ? (total.max - target_logit) + logf(total.sum) : 0.0f;
  }
  if (grad == nullptr) return;
  G* g = grad + row * vp;
  for (int64_t c = threadIdx.x; c < vp; c += kRowThreads) {
    float d = 0.0f;
    if (counted && c < vocab) d = expf(l[c] - lse) * scale - (c == t ? scale : 0.0f);
    Store(g + c, d);
  }
}

struct LossSum {
  double loss;
  long long counted;
  long long bad;
};

// One block: Σ row_loss in f64, counted and bad targets, in a fixed order.
__global__ void __launch_bounds__(kSumThreads)
    SumLossKernel(const float* row_loss, const int32_t* target, int64_t n, int64_t vocab, int32_t ignore_index,
                  LossSum* out) {
  double loss = 0;
  long long counted = 0, bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) {
    loss += row_loss[i];
    const int32_t t = target[i];
    if (t == ignore_index) continue;
    if (t >= 0 && t < vocab) ++counted; else ++bad;
  }
  __shared__ double s_loss[kSumThreads];
  __shared__ long long s_counted[kSumThreads], s_bad[kSumThreads];
  s_loss[threadIdx.x] = loss;
  s_counted[threadIdx.x] = counted;
  s_bad[threadIdx.x] = bad;
  __syncthreads();
  for (int half = kSumThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      s_loss[threadIdx.x] += s_loss[threadIdx.x + half];
      s_counted[threadIdx.x] += s_counted[threadIdx.x + half];
      s_bad[threadIdx.x] += s_bad[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = {s_loss[0], s_counted[0], s_bad[0]};
}


// ---- Vocab-parallel pieces (one block a row of a [rows, Vl] shard) ----

// Lowest-index max over a block; every thread gets it.
__device__ void BlockMaxArg(double& m, int64_t& arg) {
  __shared__ double s_max[kRowThreads];
  __shared__ int64_t s_arg[kRowThreads];
  __syncthreads();  // the arrays may still be read by a previous call
  s_max[threadIdx.x] = m;
  s_arg[threadIdx.x] = arg;
  __syncthreads();
  for (int half = kRowThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      const double om = s_max[threadIdx.x + half];
      const int64_t oa = s_arg[threadIdx.x + half];
      if (om > s_max[threadIdx.x] || (om == s_max[threadIdx.x] && oa < s_arg[threadIdx.x])) {
        s_max[threadIdx.x] = om;
        s_arg[threadIdx.x] = oa;
      }
    }
    __syncthreads();
  }
  m = s_max[0];
  arg = s_arg[0];
}

// Fixed-tree f64 sum over a block; every thread gets it.
__device__ double BlockSumF64(double x) {
  __shared__ double s[kRowThreads];
  __syncthreads();
  s[threadIdx.x] = x;
  __syncthreads();
  for (int half = kRowThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
    __syncthreads();
  }
  return s[0];
}

// Valid columns of the shard: c < valid, valid = clamp(vocab − v0, 0, Vl).
__global__ void __launch_bounds__(kRowThreads)
    ShardRowMaxKernel(const float* logits, int64_t vl, int64_t v0, int64_t valid, double* local_max,
                      int64_t* best) {
  const float* l = logits + blockIdx.x * vl;
  double m = -INFINITY;
  int64_t arg = INT64_MAX;
  for (int64_t c = threadIdx.x; c < valid; c += kRowThreads) {
    if (l[c] > m) {
      m = l[c];
      arg = v0 + c;
    }
  }
  BlockMaxArg(m, arg);
  if (threadIdx.x == 0) {
    local_max[blockIdx.x] = m;
    best[blockIdx.x] = arg;
  }
}

__global__ void __launch_bounds__(kRowThreads)
    ShardSumExpKernel(const float* logits, int64_t vl, int64_t v0, int64_t valid, const double* max,
                      const double* local_max, const int64_t* best, const int32_t* target, int32_t ignore_index,
                      double* sum, double* zt, int64_t* neg_best) {
  const int64_t row = blockIdx.x;
  const float* l = logits + row * vl;
  const double m = max[row];
  double acc = 0;
  for (int64_t c = threadIdx.x; c < valid; c += kRowThreads) acc += exp(static_cast<double>(l[c]) - m);
  const double total = BlockSumF64(acc);
  if (threadIdx.x == 0) {
    sum[row] = total;
    const int64_t t = static_cast<int64_t>(target[row]) - v0;
    zt[row] = target[row] != ignore_index && t >= 0 && t < valid ? l[t] : 0.0;
    neg_best[row] = local_max[row] == m ? -best[row] : -INT64_MAX;
  }
}

template <typename G>
__global__ void __launch_bounds__(kRowThreads)
    ShardSoftmaxGradKernel(const float* logits, G* grad, int64_t vl, int64_t v0, int64_t valid, int64_t vocab,
                           const double* max, const double* sum, const double* zt, const int64_t* neg_best,
                           const int32_t* target, int32_t ignore_index, double scale, float* row_loss,
                           int32_t* predictions) {
  const int64_t row = blockIdx.x;
  const float* l = logits + row * vl;
  const int32_t t = target[row];
  const bool counted = t != ignore_index && t >= 0 && t < vocab;
  const double lse = max[row] + log(sum[row]);
  if (threadIdx.x == 0) {
    row_loss[row] = counted ? static_cast<float>(lse - zt[row]) : 0.0f;
    if (predictions != nullptr) predictions[row] = static_cast<int32_t>(-neg_best[row]);
  }
  if (grad == nullptr) return;
  G* g = grad + row * vl;
  const int64_t local_t = static_cast<int64_t>(t) - v0;
  for (int64_t c = threadIdx.x; c < vl; c += kRowThreads) {
    float d = 0.0f;
    if (counted && c < valid) {
      d = static_cast<float>(exp(static_cast<double>(l[c]) - lse) * scale - (c == local_t ? scale : 0.0));
    }
    Store(g + c, d);
  }
}

int64_t ChunkRows(int64_t n, int64_t padded_vocab) {
  const int64_t forced = g_chunk_rows_for_testing.load();
  return forced > 0 ? std::min(forced, n) : CrossEntropyChunkRows(n, padded_vocab);
}

}  // namespace

void SetCrossEntropyChunkRowsForTesting(int64_t rows) { g_chunk_rows_for_testing.store(rows); }

CrossEntropyResult CrossEntropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                                const CrossEntropyOptions& options, Tensor* dh, Tensor* dw, Tensor* predictions,
                                CudaStream stream) {
  const Device dev = h.device();
  LOOM_CHECK(!dev.is_cpu() && w.device() == dev && targets.device() == dev,
             "[cross_entropy] CUDA path takes h, W and targets on one GPU, got ", dev.ToString(), ", ",
             w.device().ToString(), ", ", targets.device().ToString());
  LOOM_CHECK(w.ndim() == 2, "[cross_entropy] W must be [Vp, D], got ", ShapeString(w.shape()));
  const int64_t padded_vocab = w.dim(0), d = w.dim(1);
  const DType dtype = h.dtype();
  LOOM_CHECK((dtype == DType::kF32 || dtype == DType::kBF16) && w.dtype() == dtype && h.ndim() >= 2 &&
                 h.dim(-1) == d,
             "[cross_entropy] h ", ShapeString(h.shape()), " ", DTypeName(dtype), " must be [N, ", d,
             "] and W ", DTypeName(w.dtype()), " of one dtype, f32 or bf16");
  const int64_t n = h.numel() / d;
  const int64_t vocab = options.vocab > 0 ? options.vocab : padded_vocab;
  LOOM_CHECK(vocab >= 1 && vocab <= padded_vocab, "[cross_entropy] vocab ", vocab, " must be in [1, ",
             padded_vocab, "] (rows of W)");
  LOOM_CHECK(options.normalizer > 0, "[cross_entropy] normalizer must be positive, got ", options.normalizer);
  LOOM_CHECK(targets.dtype() == DType::kI32 && targets.numel() == n, "[cross_entropy] targets ",
             ShapeString(targets.shape()), " ", DTypeName(targets.dtype()), " must be [", n, "] i32");
  if (dh != nullptr) {
    LOOM_CHECK(dh->device() == dev && dh->numel() == n * d && dh->dtype() == dtype, "[cross_entropy] dh ",
               ShapeString(dh->shape()), " ", DTypeName(dh->dtype()), " must match h ", ShapeString(h.shape()), " ",
               DTypeName(dtype), " on ", dev.ToString());
  }
  if (dw != nullptr) {
    LOOM_CHECK(dw->device() == dev && dw->shape() == w.shape() && dw->dtype() == DType::kF32,
               "[cross_entropy] dW ", ShapeString(dw->shape()), " ", DTypeName(dw->dtype()), " must be f32 ",
               ShapeString(w.shape()), " on ", dev.ToString());
  }
  if (predictions != nullptr) {
    LOOM_CHECK(predictions->device() == dev && predictions->dtype() == DType::kI32 && predictions->numel() == n,
               "[cross_entropy] predictions ", ShapeString(predictions->shape()), " must be [", n, "] i32 on ",
               dev.ToString());
  }
  if (n == 0) return {};
  LOOM_CUDA_CHECK(cudaSetDevice(dev.index));
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  const bool backward = dh != nullptr || dw != nullptr;
  const int64_t chunk = ChunkRows(n, padded_vocab);
  // A group of chunks shares the gradient GEMMs: bf16 gradients of up to
  // kCrossEntropyGradChunks chunks; in f32 the gradient is the chunk's own
  // logits, so a group is one chunk.
  const bool bf16_grad = backward && dtype == DType::kBF16;
  const int64_t group = bf16_grad ? CrossEntropyGradRows(n, chunk) : chunk;
  const Tensor h2 = h.Reshape({n, d});
  const Tensor dh2 = dh != nullptr ? dh->Reshape({n, d}) : Tensor();
  Tensor logits = Tensor::Empty({chunk, padded_vocab}, DType::kF32, dev);
  Tensor grad_bf16 = bf16_grad ? Tensor::Empty({group, padded_vocab}, DType::kBF16, dev) : Tensor();
  Tensor row_loss = Tensor::Empty({n}, DType::kF32, dev);
  const int32_t* target = targets.data<int32_t>();
  const float scale = static_cast<float>(1.0 / options.normalizer);

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const int64_t g0 = r0 / group * group;  // the group's first row
    const Tensor hb = h2.Slice(r0, rows);
    Tensor lb = logits.Slice(0, rows);
    Matmul(hb, false, w, /*trans_b=*/true, lb, 1.0, 0.0, stream);
    int32_t* pred = predictions != nullptr ? predictions->data<int32_t>() + r0 : nullptr;
    Tensor gb = !backward ? Tensor() : bf16_grad ? grad_bf16.Slice(r0 - g0, rows) : lb;
    if (!backward) {
      SoftmaxRowsKernel<float><<<rows, kRowThreads, 0, s>>>(lb.data<float>(), nullptr, padded_vocab, vocab,
                                                            target + r0, options.ignore_index, scale, pred,
                                                            row_loss.data<float>() + r0);
    } else if (dtype == DType::kBF16) {
      SoftmaxRowsKernel<__nv_bfloat16><<<rows, kRowThreads, 0, s>>>(
          lb.data<float>(), static_cast<__nv_bfloat16*>(gb.raw()), padded_vocab, vocab, target + r0,
          options.ignore_index, scale, pred, row_loss.data<float>() + r0);
    } else {
      SoftmaxRowsKernel<float><<<rows, kRowThreads, 0, s>>>(lb.data<float>(), lb.data<float>(), padded_vocab,
                                                            vocab, target + r0, options.ignore_index, scale, pred,
                                                            row_loss.data<float>() + r0);
    }
    LOOM_CUDA_CHECK(cudaGetLastError());
    const int64_t end = r0 + rows;
    if (!backward || (end < n && end % group != 0)) continue;  // the group's gradients are not all made yet
    const Tensor gg = bf16_grad ? grad_bf16.Slice(0, end - g0) : gb;
    if (dh != nullptr) {
      Tensor dhg = dh2.Slice(g0, end - g0);
      Matmul(gg, false, w, false, dhg, 1.0, 0.0, stream);
    }
    if (dw != nullptr) Matmul(gg, /*trans_a=*/true, h2.Slice(g0, end - g0), false, *dw, 1.0, /*beta=*/1.0, stream);
  }

  return SumRowLosses(row_loss, targets, vocab, options.ignore_index, options.normalizer, stream);
}

CrossEntropyResult SumRowLosses(const Tensor& row_loss, const Tensor& targets, int64_t vocab, int32_t ignore_index,
                                double normalizer, CudaStream stream) {
  const int64_t n = targets.numel();
  LOOM_CHECK(row_loss.dtype() == DType::kF32 && row_loss.numel() == n && targets.dtype() == DType::kI32 &&
                 row_loss.device() == targets.device() && !targets.device().is_cpu(),
             "[cross_entropy] row losses ", ShapeString(row_loss.shape()), " must be f32 [", n,
             "] beside the i32 targets on a GPU");
  if (n == 0) return {};
  LOOM_CUDA_CHECK(cudaSetDevice(targets.device().index));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  static_assert(sizeof(LossSum) % 4 == 0);
  Tensor sum = Tensor::Empty({static_cast<int64_t>(sizeof(LossSum) / 4)}, DType::kI32, targets.device());
  LossSum* device_sum = static_cast<LossSum*>(sum.raw());
  SumLossKernel<<<1, kSumThreads, 0, s>>>(row_loss.data<float>(), targets.data<int32_t>(), n, vocab, ignore_index,
                                          device_sum);
  LOOM_CUDA_CHECK(cudaGetLastError());
  LossSum host{};
  LOOM_CUDA_CHECK(cudaMemcpyAsync(&host, device_sum, sizeof(host), cudaMemcpyDeviceToHost, s));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(s));
  LOOM_CHECK(host.bad == 0, "[cross_entropy] ", host.bad, " targets are outside [0, ", vocab,
             ") and are not ignore_index ", ignore_index);
  return {host.loss / normalizer, static_cast<int64_t>(host.counted)};
}


namespace {
// Checks one block of shard logits and the [rows] statistics beside it.
void CheckShard(const Tensor& logits, std::initializer_list<std::pair<const Tensor*, DType>> stats) {
  LOOM_CHECK(!logits.device().is_cpu() && logits.dtype() == DType::kF32 && logits.ndim() == 2,
             "[cross_entropy] vocab shard logits must be f32 [rows, Vl] on a GPU, got ",
             ShapeString(logits.shape()), " ", DTypeName(logits.dtype()), " on ", logits.device().ToString());
  for (const auto& [t, dtype] : stats) {
    LOOM_CHECK(t->device() == logits.device() && t->dtype() == dtype && t->numel() == logits.dim(0),
               "[cross_entropy] a row statistic ", ShapeString(t->shape()), " ", DTypeName(t->dtype()),
               " must be [", logits.dim(0), "] ", DTypeName(dtype), " on ", logits.device().ToString());
  }
  LOOM_CUDA_CHECK(cudaSetDevice(logits.device().index));
}
int64_t ValidColumns(int64_t vocab, int64_t v0, int64_t vl) { return std::clamp<int64_t>(vocab - v0, 0, vl); }
}  // namespace

void VocabShardRowMax(const Tensor& logits, int64_t v0, int64_t vocab, Tensor& local_max, Tensor& best,
                      CudaStream stream) {
  CheckShard(logits, {{&local_max, DType::kF64}, {&best, DType::kI64}});
  const int64_t rows = logits.dim(0), vl = logits.dim(1);
  if (rows == 0) return;
  ShardRowMaxKernel<<<rows, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      logits.data<float>(), vl, v0, ValidColumns(vocab, v0, vl), local_max.data<double>(), best.data<int64_t>());
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void VocabShardSumExp(const Tensor& logits, int64_t v0, int64_t vocab, const Tensor& max, const Tensor& local_max,
                      const Tensor& best, const Tensor& targets, int32_t ignore_index, Tensor& sum, Tensor& zt,
                      Tensor& neg_best, CudaStream stream) {
  CheckShard(logits, {{&max, DType::kF64}, {&local_max, DType::kF64}, {&best, DType::kI64},
                      {&targets, DType::kI32}, {&sum, DType::kF64}, {&zt, DType::kF64}, {&neg_best, DType::kI64}});
  const int64_t rows = logits.dim(0), vl = logits.dim(1);
  if (rows == 0) return;
  ShardSumExpKernel<<<rows, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      logits.data<float>(), vl, v0, ValidColumns(vocab, v0, vl), max.data<double>(), local_max.data<double>(),
      best.data<int64_t>(), targets.data<int32_t>(), ignore_index, sum.data<double>(), zt.data<double>(),
      neg_best.data<int64_t>());
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void VocabShardSoftmaxGrad(const Tensor& logits, int64_t v0, int64_t vocab, const Tensor& max, const Tensor& sum,
                           const Tensor& zt, const Tensor& neg_best, const Tensor& targets, int32_t ignore_index,
                           double scale, Tensor& row_loss, Tensor* predictions, Tensor& grad, CudaStream stream) {
  CheckShard(logits, {{&max, DType::kF64}, {&sum, DType::kF64}, {&zt, DType::kF64}, {&neg_best, DType::kI64},
                      {&targets, DType::kI32}, {&row_loss, DType::kF32}});
  if (predictions != nullptr) CheckShard(logits, {{predictions, DType::kI32}});
  LOOM_CHECK(!grad.defined() || (grad.device() == logits.device() && grad.numel() == logits.numel() &&
                                 (grad.dtype() == DType::kF32 || grad.dtype() == DType::kBF16)),
             "[cross_entropy] shard dlogits ", ShapeString(grad.shape()), " must be f32 or bf16 like the logits ",
             ShapeString(logits.shape()));
  const int64_t rows = logits.dim(0), vl = logits.dim(1), valid = ValidColumns(vocab, v0, vl);
  if (rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t* pred = predictions != nullptr ? predictions->data<int32_t>() : nullptr;
  if (grad.defined() && grad.dtype() == DType::kBF16) {
    ShardSoftmaxGradKernel<__nv_bfloat16><<<rows, kRowThreads, 0, s>>>(
        logits.data<float>(), static_cast<__nv_bfloat16*>(grad.raw()), vl, v0, valid, vocab, max.data<double>(),
        sum.data<double>(), zt.data<double>(), neg_best.data<int64_t>(), targets.data<int32_t>(), ignore_index,
        scale, row_loss.data<float>(), pred);
  } else {
    ShardSoftmaxGradKernel<float><<<rows, kRowThreads, 0, s>>>(
        logits.data<float>(), grad.defined() ? grad.data<float>() : nullptr, vl, v0, valid, vocab,
        max.data<double>(), sum.data<double>(), zt.data<double>(), neg_best.data<int64_t>(),
        targets.data<int32_t>(), ignore_index, scale, row_loss.data<float>(), pred);
  }
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
