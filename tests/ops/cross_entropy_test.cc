#include "ops/cross_entropy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

constexpr int32_t kIgnore = -100;

// Targets in [0, vocab), every `ignore_every`-th one ignored.
Tensor Targets(int64_t n, int64_t vocab, int64_t ignore_every, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = i % ignore_every == 3 ? kIgnore : static_cast<int32_t>(gen() % vocab);
  return Tensor::FromVector(t, {n});
}

// The unfused form: the whole [N, vocab] logits, log-softmax, and the
// gradients from dlogits = (softmax − onehot) / normalizer.
struct Materialized {
  double loss = 0;
  int64_t counted = 0;
  std::vector<int32_t> argmax;
  Tensor dh, dw;
};

Materialized MaterializedCrossEntropy(const Tensor& h, const Tensor& w, const Tensor& targets, int64_t vocab,
                                      double normalizer) {
  const int64_t n = h.dim(0), d = h.dim(1);
  Materialized m;
  m.dh = Tensor::Zeros(h.shape(), DType::kF64);
  m.dw = Tensor::Zeros(w.shape(), DType::kF64);
  std::vector<double> logits(vocab);
  for (int64_t i = 0; i < n; ++i) {
    int32_t best = 0;
    for (int64_t c = 0; c < vocab; ++c) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += h.Get(i * d + k) * w.Get(c * d + k);
      logits[c] = s;
      if (s > logits[best]) best = static_cast<int32_t>(c);
    }
    m.argmax.push_back(best);
    const int32_t t = static_cast<int32_t>(targets.Get(i));
    if (t == kIgnore) continue;
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(logits[c] - logits[best]);
    const double lse = logits[best] + std::log(sum);
    m.loss += (lse - logits[t]) / normalizer;
    ++m.counted;
    for (int64_t c = 0; c < vocab; ++c) {
      const double g = (std::exp(logits[c] - lse) - (c == t ? 1.0 : 0.0)) / normalizer;
      for (int64_t k = 0; k < d; ++k) {
        m.dh.data<double>()[i * d + k] += g * w.Get(c * d + k);
        m.dw.data<double>()[c * d + k] += g * h.Get(i * d + k);
      }
    }
  }
  return m;
}

// N = 300 spans three row blocks, the last one partial; W has 5 padded rows;
// a block of logits is large enough for the threaded path.
TEST(CrossEntropy, MatchesMaterializedLogSoftmaxAcrossBlocks) {
  const int64_t n = 300, d = 8, vp = 264, vocab = 259;
  Tensor h = RandomTensor({n, d}, DType::kF64, 1, -2, 2), w = RandomTensor({vp, d}, DType::kF64, 2);
  Tensor targets = Targets(n, vocab, 7, 3);
  const double normalizer = 250.0;
  const Materialized want = MaterializedCrossEntropy(h, w, targets, vocab, normalizer);

  Tensor dh = Tensor::Empty(h.shape(), DType::kF64), dw = Tensor::Zeros(w.shape(), DType::kF64);
  Tensor predictions = Tensor::Empty({n}, DType::kI32);
  const ops::CrossEntropyResult got =
      ops::CrossEntropy(h, w, targets, {.vocab = vocab, .ignore_index = kIgnore, .normalizer = normalizer}, &dh,
                        &dw, &predictions);
  EXPECT_NEAR(got.loss, want.loss, 1e-12 * std::abs(want.loss));
  EXPECT_EQ(got.counted, want.counted);
  EXPECT_EQ(got.counted, n - n / 7 - (n % 7 > 3 ? 1 : 0));
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(predictions.data<int32_t>()[i], want.argmax[i]) << "row " << i;
  EXPECT_TRUE(AllClose(dh, want.dh, 1e-11, 1e-14));
  EXPECT_TRUE(AllClose(dw, want.dw, 1e-11, 1e-14));
}

TEST(CrossEntropy, ZeroVocabMeansEveryRowOfW) {
  const int64_t n = 40, d = 5, vp = 9;
  Tensor h = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({vp, d}, DType::kF64, 2);
  Tensor targets = Targets(n, vp, 5, 3);
  const Materialized want = MaterializedCrossEntropy(h, w, targets, vp, 1.0);
  const ops::CrossEntropyResult got = ops::CrossEntropy(h, w, targets, {.ignore_index = kIgnore}, nullptr, nullptr);
  EXPECT_NEAR(got.loss, want.loss, 1e-12 * std::abs(want.loss));
  EXPECT_EQ(got.counted, want.counted);
}

// The loss itself is the function: a padded vocab (16 rows of W, 13 real),
// ignored targets, a normalizer that is not the count, N past one block,
// and dW starting non-zero (it accumulates).
TEST(CrossEntropy, GradientsMatchFiniteDifferences) {
  const int64_t n = 150, d = 6, vp = 16, vocab = 13;
  Tensor h = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({vp, d}, DType::kF64, 2);
  Tensor targets = Targets(n, vocab, 6, 3);
  const ops::CrossEntropyOptions options{.vocab = vocab, .ignore_index = kIgnore, .normalizer = 97.5};
  auto loss = [&] { return ops::CrossEntropy(h, w, targets, options, nullptr, nullptr).loss; };
  Tensor dh = Tensor::Empty(h.shape(), DType::kF64);
  Tensor start = RandomTensor(w.shape(), DType::kF64, 4);
  Tensor dw = start.Clone();
  const ops::CrossEntropyResult r = ops::CrossEntropy(h, w, targets, options, &dh, &dw);
  EXPECT_NE(static_cast<double>(r.counted), options.normalizer);
  Tensor added = Tensor::Empty(w.shape(), DType::kF64);
  for (int64_t i = 0; i < added.numel(); ++i) added.data<double>()[i] = dw.Get(i) - start.Get(i);
  testing::ExpectGradientsMatch(loss, {{"h", h, dh}, {"w", w, added}});
}

TEST(CrossEntropy, IgnoredTokensGetNoGradient) {
  const int64_t n = 20, d = 4, vp = 10;
  Tensor h = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({vp, d}, DType::kF64, 2);
  Tensor targets = Targets(n, vp, 4, 3);
  const ops::CrossEntropyOptions options{.ignore_index = kIgnore};
  Tensor dh = RandomTensor(h.shape(), DType::kF64, 5);  // stale contents: dh is written
  Tensor dw = Tensor::Zeros(w.shape(), DType::kF64);
  const double loss = ops::CrossEntropy(h, w, targets, options, &dh, &dw).loss;
  for (int64_t i = 0; i < n; ++i) {
    if (targets.data<int32_t>()[i] != kIgnore) continue;
    for (int64_t k = 0; k < d; ++k) EXPECT_EQ(dh.Get(i * d + k), 0.0) << "row " << i;
    // Changing an ignored row's hidden state leaves the loss as it was.
    h.data<double>()[i * d] += 3.0;
  }
  EXPECT_EQ(ops::CrossEntropy(h, w, targets, options, nullptr, nullptr).loss, loss);
}

// Padded rows of W made huge would win every softmax if they were not masked.
TEST(CrossEntropy, PaddedVocabIsMaskedOut) {
  const int64_t n = 30, d = 4, vp = 12, vocab = 9;
  Tensor h = RandomTensor({n, d}, DType::kF64, 1, 0.1, 1), w = RandomTensor({vp, d}, DType::kF64, 2);
  for (int64_t i = vocab * d; i < vp * d; ++i) w.data<double>()[i] = 100.0;
  Tensor targets = Targets(n, vocab, 5, 3);
  const ops::CrossEntropyOptions options{.vocab = vocab, .ignore_index = kIgnore, .normalizer = 2.0};
  Tensor dh = Tensor::Empty(h.shape(), DType::kF64), dw = Tensor::Zeros(w.shape(), DType::kF64);
  Tensor predictions = Tensor::Empty({n}, DType::kI32);
  const double loss = ops::CrossEntropy(h, w, targets, options, &dh, &dw, &predictions).loss;

  // The same as a W that never had the padded rows.
  const Tensor w_real = w.Slice(0, vocab).Clone();
  Tensor dh_real = Tensor::Empty(h.shape(), DType::kF64), dw_real = Tensor::Zeros(w_real.shape(), DType::kF64);
  const double loss_real = ops::CrossEntropy(h, w_real, targets, options, &dh_real, &dw_real).loss;
  EXPECT_NEAR(loss, loss_real, 1e-13 * std::abs(loss_real));
  EXPECT_TRUE(AllClose(dh, dh_real, 1e-13, 1e-15));
  EXPECT_TRUE(AllClose(dw.Slice(0, vocab), dw_real, 1e-13, 1e-15));
  for (int64_t i = vocab * d; i < vp * d; ++i) EXPECT_EQ(dw.Get(i), 0.0) << "padded dW element " << i;
  for (int64_t i = 0; i < n; ++i) EXPECT_LT(predictions.data<int32_t>()[i], vocab) << "row " << i;
}

TEST(CrossEntropy, F32MatchesF64) {
  const int64_t n = 200, d = 16, vp = 64, vocab = 50;
  Tensor h = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({vp, d}, DType::kF64, 2);
  Tensor targets = Targets(n, vocab, 9, 3);
  const ops::CrossEntropyOptions options{.vocab = vocab, .ignore_index = kIgnore, .normalizer = 180.0};
  double loss[2];
  Tensor dh[2], dw[2];
  for (int k = 0; k < 2; ++k) {
    const DType dt = k == 0 ? DType::kF64 : DType::kF32;
    dh[k] = Tensor::Empty(h.shape(), dt);
    dw[k] = Tensor::Zeros(w.shape(), dt);
    loss[k] = ops::CrossEntropy(h.To(dt), w.To(dt), targets, options, &dh[k], &dw[k]).loss;
  }
  EXPECT_NEAR(loss[1], loss[0], 1e-5 * loss[0]);
  EXPECT_TRUE(AllClose(dh[1], dh[0], 1e-4, 1e-7));
  EXPECT_TRUE(AllClose(dw[1], dw[0], 1e-4, 1e-7));
}

TEST(CrossEntropyDeathTest, TargetOutsideVocabIsRejected) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Tensor h = RandomTensor({3, 4}, DType::kF32, 1), w = RandomTensor({8, 4}, DType::kF32, 2);
  // 6 is a row of W but a padded one.
  Tensor targets = Tensor::FromVector<int32_t>({1, kIgnore, 6}, {3});
  EXPECT_DEATH(ops::CrossEntropy(h, w, targets, {.vocab = 6, .ignore_index = kIgnore}, nullptr, nullptr),
               "\\[cross_entropy\\] target 6 at row 2");
}

}  // namespace
}  // namespace loom
