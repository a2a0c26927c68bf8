// CPU cross-entropy fused with the output projection (see ops/cross_entropy.h).
// Rows go through in blocks of kBlockRows, so only a [kBlockRows, Vp] logits
// buffer exists at a time. For a block hb = h[r0:r0+B]:
//   logits = hb · Wᵀ, columns ≥ vocab set to −inf
//   lse    = log Σ_c exp(logits_c)                  (max-shifted)
//   loss  += lse − logits[target]                   (non-ignored rows)
//   dlogits = (softmax − onehot(target)) / normalizer, 0 on ignored rows
//   dh[r0:r0+B] = dlogits · W,  dW += dlogitsᵀ · hb
// Padded columns get softmax exp(−inf) = 0, hence no gradient.
#include "ops/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/matmul.h"

namespace loom::ops {
namespace {

constexpr int64_t kBlockRows = 128;
constexpr int64_t kParallelMinElements = 1 << 15;

// One block of logits rows [rows, Vp]: masks the padded columns, writes the
// argmax of each row to `predictions` (if non-null), returns the summed loss
// of the non-ignored rows, and, when `backward`, replaces each row by its
// dlogits.
template <typename T>
double SoftmaxRows(T* logits, int64_t rows, int64_t padded_vocab, int64_t vocab, const int32_t* target,
                   int32_t ignore_index, double inv_normalizer, bool backward, int32_t* predictions) {
  const T scale = static_cast<T>(inv_normalizer);
  // Per-row losses summed in row order afterwards: an OpenMP reduction would
  // add the threads' partial sums in arrival order, and the loss of a resumed
  // run must match bit for bit.
  std::vector<double> row_loss(rows, 0.0);
#pragma omp parallel for if (rows * padded_vocab >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    T* row = logits + r * padded_vocab;
    for (int64_t c = vocab; c < padded_vocab; ++c) row[c] = -std::numeric_limits<T>::infinity();
    int64_t best = 0;
    for (int64_t c = 1; c < vocab; ++c) {
      if (row[c] > row[best]) best = c;
    }
    if (predictions != nullptr) predictions[r] = static_cast<int32_t>(best);
    const T max = row[best];
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(row[c] - max);
    const double log_sum = std::log(sum);
    const T lse = max + static_cast<T>(log_sum);
    const bool ignored = target[r] == ignore_index;
    if (!ignored) row_loss[r] = static_cast<double>(max - row[target[r]]) + log_sum;
    if (!backward) continue;
    if (ignored) {
      for (int64_t c = 0; c < padded_vocab; ++c) row[c] = 0;
    } else {
      for (int64_t c = 0; c < padded_vocab; ++c) row[c] = std::exp(row[c] - lse) * scale;
      row[target[r]] -= scale;
    }
  }
  double loss = 0;
  for (double l : row_loss) loss += l;
  return loss;
}

}  // namespace

CrossEntropyResult CrossEntropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                                const CrossEntropyOptions& options, Tensor* dh, Tensor* dw, Tensor* predictions) {
  if (!h.device().is_cpu()) return cuda::CrossEntropy(h, w, targets, options, dh, dw, predictions);
  LOOM_CHECK(h.device().is_cpu() && w.device().is_cpu() && targets.device().is_cpu(),
             "[cross_entropy] CPU tensors only");
  LOOM_CHECK(w.ndim() == 2, "[cross_entropy] W must be [Vp, D], got ", ShapeString(w.shape()));
  const int64_t padded_vocab = w.dim(0), d = w.dim(1);
  LOOM_CHECK(h.ndim() >= 2 && h.dim(-1) == d && h.dtype() == w.dtype(), "[cross_entropy] h ",
             ShapeString(h.shape()), " ", DTypeName(h.dtype()), " must be [N, ", d, "] ", DTypeName(w.dtype()),
             " like W");
  const int64_t n = h.numel() / d;
  const int64_t vocab = options.vocab > 0 ? options.vocab : padded_vocab;
  LOOM_CHECK(vocab >= 1 && vocab <= padded_vocab, "[cross_entropy] vocab ", vocab, " must be in [1, ",
             padded_vocab, "] (rows of W)");
  LOOM_CHECK(options.normalizer > 0, "[cross_entropy] normalizer must be positive, got ", options.normalizer);
  LOOM_CHECK(targets.dtype() == DType::kI32 && targets.numel() == n, "[cross_entropy] targets ",
             ShapeString(targets.shape()), " ", DTypeName(targets.dtype()), " must be [", n, "] i32");
  const int32_t* target = targets.data<int32_t>();
  int64_t counted = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (target[i] == options.ignore_index) continue;
    LOOM_CHECK(target[i] >= 0 && target[i] < vocab, "[cross_entropy] target ", target[i], " at row ", i,
               " is outside [0, ", vocab, ") and is not ignore_index ", options.ignore_index);
    ++counted;
  }
  if (dh != nullptr) {
    LOOM_CHECK(dh->device().is_cpu() && dh->numel() == n * d && dh->dtype() == h.dtype(), "[cross_entropy] dh ",
               ShapeString(dh->shape()), " must match h ", ShapeString(h.shape()));
  }
  if (dw != nullptr) {
    LOOM_CHECK(dw->device().is_cpu() && dw->shape() == w.shape() && dw->dtype() == w.dtype(), "[cross_entropy] dW ",
               ShapeString(dw->shape()), " must match W ", ShapeString(w.shape()));
  }
  if (predictions != nullptr) {
    LOOM_CHECK(predictions->device().is_cpu() && predictions->dtype() == DType::kI32 && predictions->numel() == n,
               "[cross_entropy] predictions ", ShapeString(predictions->shape()), " must be [", n, "] i32");
  }
  const bool backward = dh != nullptr || dw != nullptr;
  const Tensor h2 = h.Reshape({n, d});
  const Tensor dh2 = dh != nullptr ? dh->Reshape({n, d}) : Tensor();

  double loss_sum = 0;
  LOOM_DISPATCH_FLOAT(h.dtype(), T, [&] {
    Tensor logits = Tensor::Empty({std::min(kBlockRows, n), padded_vocab}, h.dtype());
    for (int64_t r0 = 0; r0 < n; r0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, n - r0);
      const Tensor hb = h2.Slice(r0, rows);
      Tensor lb = logits.Slice(0, rows);
      Matmul(hb, false, w, /*trans_b=*/true, lb);
      loss_sum += SoftmaxRows(lb.data<T>(), rows, padded_vocab, vocab, target + r0, options.ignore_index,
                              1.0 / options.normalizer, backward,
                              predictions != nullptr ? predictions->data<int32_t>() + r0 : nullptr);
      if (dh != nullptr) {
        Tensor dhb = dh2.Slice(r0, rows);
        Matmul(lb, false, w, false, dhb);
      }
      if (dw != nullptr) Matmul(lb, /*trans_a=*/true, hb, false, *dw, 1.0, /*beta=*/1.0);
    }
  });
  return {loss_sum / options.normalizer, counted};
}

}  // namespace loom::ops
