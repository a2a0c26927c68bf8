#include "parallel/vocab_parallel_cross_entropy.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/matmul.h"

namespace loom {
namespace {

constexpr int64_t kBlockRows = 512;

template <typename T>
double Block(const Tensor& hb, const Tensor& w, int64_t v0, const int32_t* target, int64_t rows,
             const ops::CrossEntropyOptions& options, const TensorParallel& tp, Tensor& logits, bool backward,
             int32_t* predictions) {
  const int64_t vl = w.dim(0), vocab = options.vocab > 0 ? options.vocab : vl * tp.size;
  T* l = logits.data<T>();
  const T inf = std::numeric_limits<T>::infinity();
  // Row statistics for the three all-reduces: [max | sumexp | target logit]
  // as f64, plus the argmax candidates.
  Tensor max = Tensor::Empty({rows}, DType::kF64), sum = Tensor::Zeros({rows}, DType::kF64),
         zt = Tensor::Zeros({rows}, DType::kF64);
  Tensor best_index = Tensor::Empty({rows}, DType::kI64);
  for (int64_t r = 0; r < rows; ++r) {
    T* row = l + r * vl;
    double m = -inf;
    int64_t best = -1;
    for (int64_t c = 0; c < vl; ++c) {
      if (v0 + c >= vocab) row[c] = -inf;
      if (row[c] > m) {
        m = row[c];
        best = c;
      }
    }
    max.data<double>()[r] = m;
    best_index.data<int64_t>()[r] = best < 0 ? INT64_MAX : v0 + best;
  }
  Tensor local_max = max.Clone();
  tp.AllReduceMax(max);
  if (predictions != nullptr) {
    // Lowest global index among the ranks whose local maximum is the global one.
    Tensor neg = Tensor::Empty({rows}, DType::kI64);
    for (int64_t r = 0; r < rows; ++r)
      neg.data<int64_t>()[r] =
          local_max.data<double>()[r] == max.data<double>()[r] ? -best_index.data<int64_t>()[r] : -INT64_MAX;
    tp.AllReduceMax(neg);
    for (int64_t r = 0; r < rows; ++r) predictions[r] = static_cast<int32_t>(-neg.data<int64_t>()[r]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = l + r * vl;
    const double m = max.data<double>()[r];
    double s = 0;
    for (int64_t c = 0; c < vl; ++c) s += std::exp(static_cast<double>(row[c]) - m);
    sum.data<double>()[r] = s;
    const int64_t t = target[r] - v0;
    if (target[r] != options.ignore_index && t >= 0 && t < vl) zt.data<double>()[r] = row[t];
  }
  tp.AllReduce(sum);
  tp.AllReduce(zt);
  double loss = 0;
  const double scale = 1.0 / options.normalizer;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = l + r * vl;
    const bool ignored = target[r] == options.ignore_index;
    const double lse = max.data<double>()[r] + std::log(sum.data<double>()[r]);
    if (!ignored) loss += lse - zt.data<double>()[r];
    if (!backward) continue;
    for (int64_t c = 0; c < vl; ++c) row[c] = ignored ? T(0) : static_cast<T>(std::exp(row[c] - lse) * scale);
    const int64_t t = target[r] - v0;
    if (!ignored && t >= 0 && t < vl) row[t] -= static_cast<T>(scale);
  }
  return loss;
}

// CUDA tensors: the same block steps with the row statistics on the device
// (ops/cross_entropy.h, ops::cuda::VocabShard*) and the all-reduces on
// device tensors. h and W_local f32 or bf16; logits f32; for bf16 the
// dlogits are rounded to bf16 for the two gradient GEMMs, as in the
// single-rank ops::cuda::CrossEntropy. dW_local f32 (accumulated), dh in h's
// dtype (summed over the group in that dtype).
ops::CrossEntropyResult VocabParallelCrossEntropyCuda(const Tensor& h, const Tensor& w_local, int64_t first_row,
                                                      const Tensor& targets, const ops::CrossEntropyOptions& options,
                                                      const TensorParallel& tp, Tensor* dh, Tensor* dw_local,
                                                      Tensor* predictions) {
  const Device dev = h.device();
  const int64_t d = w_local.dim(1), n = h.numel() / d, vl = w_local.dim(0);
  const int64_t vocab = options.vocab > 0 ? options.vocab : vl * tp.size;
  LOOM_CHECK(w_local.device() == dev && targets.device() == dev &&
                 (h.dtype() == DType::kF32 || h.dtype() == DType::kBF16),
             "[cross_entropy] vocab-parallel on CUDA: h, W and targets on one GPU, h f32 or bf16");
  LOOM_CHECK(dw_local == nullptr || (dw_local->dtype() == DType::kF32 && dw_local->shape() == w_local.shape() &&
                                     dw_local->device() == dev),
             "[cross_entropy] vocab-parallel on CUDA: dW must be f32 like W ", ShapeString(w_local.shape()));
  const bool backward = dh != nullptr || dw_local != nullptr;
  const Tensor h2 = h.Reshape({n, d});
  Tensor dh2 = dh != nullptr ? dh->Reshape({n, d}) : Tensor();
  const int64_t block = std::min(kBlockRows, std::max<int64_t>(n, 1));
  Tensor logits = Tensor::Empty({block, vl}, DType::kF32, dev);
  Tensor grad_bf16 = backward && h.dtype() == DType::kBF16 ? Tensor::Empty({block, vl}, DType::kBF16, dev) : Tensor();
  Tensor stats_f64 = Tensor::Empty({4, block}, DType::kF64, dev);  // local max, max, sum, zt
  Tensor stats_i64 = Tensor::Empty({2, block}, DType::kI64, dev);  // best, −best candidates
  Tensor row_loss = Tensor::Empty({n}, DType::kF32, dev);
  for (int64_t r0 = 0; r0 < n; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, n - r0);
    const Tensor hb = h2.Slice(r0, rows), tb = targets.Reshape({n}).Slice(r0, rows);
    Tensor lb = logits.Slice(0, rows);
    ops::Matmul(hb, false, w_local, /*trans_b=*/true, lb);
    Tensor local_max = stats_f64.Slice(0, 1).Reshape({block}).Slice(0, rows);
    Tensor max = stats_f64.Slice(1, 1).Reshape({block}).Slice(0, rows);
    Tensor sum = stats_f64.Slice(2, 1).Reshape({block}).Slice(0, rows);
    Tensor zt = stats_f64.Slice(3, 1).Reshape({block}).Slice(0, rows);
    Tensor best = stats_i64.Slice(0, 1).Reshape({block}).Slice(0, rows);
    Tensor neg_best = stats_i64.Slice(1, 1).Reshape({block}).Slice(0, rows);
    ops::cuda::VocabShardRowMax(lb, first_row, vocab, local_max, best);
    max.CopyFrom(local_max);
    tp.AllReduceMax(max);
    ops::cuda::VocabShardSumExp(lb, first_row, vocab, max, local_max, best, tb, options.ignore_index, sum, zt,
                                neg_best);
    tp.AllReduce(sum);
    tp.AllReduce(zt);
    if (predictions != nullptr) tp.AllReduceMax(neg_best);
    Tensor pred = predictions != nullptr ? predictions->Reshape({n}).Slice(r0, rows) : Tensor();
    Tensor rl = row_loss.Slice(r0, rows);
    Tensor gb = !backward ? Tensor() : h.dtype() == DType::kBF16 ? grad_bf16.Slice(0, rows) : lb;
    ops::cuda::VocabShardSoftmaxGrad(lb, first_row, vocab, max, sum, zt, neg_best, tb, options.ignore_index,
                                     1.0 / options.normalizer, rl, predictions != nullptr ? &pred : nullptr, gb);
    if (dh != nullptr) {
      Tensor dhb = dh2.Slice(r0, rows);
      ops::Matmul(gb, false, w_local, false, dhb);
    }
    if (dw_local != nullptr) ops::Matmul(gb, /*trans_a=*/true, hb, false, *dw_local, 1.0, /*beta=*/1.0);
  }
  if (dh != nullptr) tp.AllReduce(dh2);
  return ops::cuda::SumRowLosses(row_loss, targets.Reshape({n}), vocab, options.ignore_index, options.normalizer);
}

}  // namespace

ops::CrossEntropyResult VocabParallelCrossEntropy(const Tensor& h, const Tensor& w_local, int64_t first_row,
                                                  const Tensor& targets, const ops::CrossEntropyOptions& options,
                                                  const TensorParallel& tp, Tensor* dh, Tensor* dw_local,
                                                  Tensor* predictions) {
  const int64_t d = w_local.dim(1), n = h.numel() / d, vl = w_local.dim(0);
  LOOM_CHECK(h.dtype() == w_local.dtype() && targets.numel() == n && targets.dtype() == DType::kI32,
             "[cross_entropy] vocab-parallel: h [N, ", d, "] like W and [N] i32 targets");
  LOOM_CHECK(options.normalizer > 0, "[cross_entropy] normalizer must be positive");
  if (!h.device().is_cpu()) {
    return VocabParallelCrossEntropyCuda(h, w_local, first_row, targets, options, tp, dh, dw_local, predictions);
  }
  const int32_t* target = targets.data<int32_t>();
  int64_t counted = 0;
  for (int64_t i = 0; i < n; ++i) counted += target[i] != options.ignore_index;
  const bool backward = dh != nullptr || dw_local != nullptr;
  const Tensor h2 = h.Reshape({n, d});
  Tensor dh2 = dh != nullptr ? dh->Reshape({n, d}) : Tensor();
  double loss = 0;
  LOOM_DISPATCH_FLOAT(h.dtype(), T, [&] {
    Tensor logits = Tensor::Empty({std::min(kBlockRows, std::max<int64_t>(n, 1)), vl}, h.dtype());
    for (int64_t r0 = 0; r0 < n; r0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, n - r0);
      const Tensor hb = h2.Slice(r0, rows);
      Tensor lb = logits.Slice(0, rows);
      ops::Matmul(hb, false, w_local, /*trans_b=*/true, lb);
      loss += Block<T>(hb, w_local, first_row, target + r0, rows, options, tp, lb, backward,
                       predictions != nullptr ? predictions->data<int32_t>() + r0 : nullptr);
      if (dh != nullptr) {
        Tensor dhb = dh2.Slice(r0, rows);
        ops::Matmul(lb, false, w_local, false, dhb);
      }
      if (dw_local != nullptr) ops::Matmul(lb, /*trans_a=*/true, hb, false, *dw_local, 1.0, /*beta=*/1.0);
    }
  });
  if (dh != nullptr) tp.AllReduce(dh2);
  return {loss / options.normalizer, counted};
}

}  // namespace loom
