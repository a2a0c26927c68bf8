// The fused CUDA cross-entropy against the CPU reference on the same inputs:
// loss, counted tokens, predictions, dh (written) and dW (accumulated), with
// ignored targets, padded vocab rows and a row count that is not a multiple
// of the chunk.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "ops/cross_entropy.h"
#include "parallel/vocab_parallel_cross_entropy.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::AllClose;
using loom::testing::RandomTensor;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;
using loom::testing::CloseToScale;

// Targets in [0, vocab), every `ignore_every`-th one ignored (-100).
Tensor Targets(int64_t n, int64_t vocab, int ignore_every, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
  Tensor t = Tensor::Empty({n}, DType::kI32);
  for (int64_t i = 0; i < n; ++i) t.data<int32_t>()[i] = i % ignore_every == 3 ? -100 : dist(gen);
  return t;
}

struct Case {
  int64_t n, d, padded_vocab, vocab;
  int64_t chunk_rows;  // 0: the default
  bool backward;
};

// Random h, W in `dtype`; the CPU runs in f32 on the same (rounded) values.
void CheckCrossEntropy(const Case& c, DType dtype, double grad_rtol) {
  SCOPED_TRACE(internal::StreamCat(DTypeName(dtype), " N ", c.n, " D ", c.d, " Vp ", c.padded_vocab, " vocab ",
                                   c.vocab, " chunk ", c.chunk_rows, c.backward ? "" : " eval only"));
  const Tensor h = RandomTensor({c.n, c.d}, dtype, 31, -2, 2);
  const Tensor w = RandomTensor({c.padded_vocab, c.d}, dtype, 32, -0.5, 0.5);
  const Tensor targets = Targets(c.n, c.vocab, 7, 33);
  const Tensor dw0 = RandomTensor({c.padded_vocab, c.d}, DType::kF32, 34);
  ops::CrossEntropyOptions options;
  options.vocab = c.vocab;
  options.normalizer = 0.9 * c.n;

  const Tensor hf = h.To(DType::kF32), wf = w.To(DType::kF32);
  Tensor dh = Tensor::Empty({c.n, c.d}, DType::kF32), dw = dw0.Clone();
  Tensor pred = Tensor::Empty({c.n}, DType::kI32);
  const ops::CrossEntropyResult want = ops::CrossEntropy(hf, wf, targets, options, c.backward ? &dh : nullptr,
                                                         c.backward ? &dw : nullptr, &pred);

  ops::cuda::SetCrossEntropyChunkRowsForTesting(c.chunk_rows);
  Tensor gdh = PoisonedGpu({c.n, c.d}, dtype), gdw = ToGpu(dw0), gpred = PoisonedGpu({c.n}, DType::kI32);
  const ops::CrossEntropyResult got =
      ops::CrossEntropy(ToGpu(h), ToGpu(w), ToGpu(targets), options, c.backward ? &gdh : nullptr,
                        c.backward ? &gdw : nullptr, &gpred);
  ops::cuda::SetCrossEntropyChunkRowsForTesting(0);

  EXPECT_EQ(got.counted, want.counted);
  EXPECT_NEAR(got.loss, want.loss, 1e-5 * std::abs(want.loss)) << "loss (rtol 1e-5)";
  const Tensor gp = ToCpu(gpred);
  int64_t differ = 0, first = -1;
  for (int64_t i = 0; i < c.n; ++i) {
    if (gp.data<int32_t>()[i] != pred.data<int32_t>()[i]) {
      if (first < 0) first = i;
      ++differ;
    }
  }
  EXPECT_EQ(differ, 0) << "predictions differ in " << differ << " rows; first row " << first << ": "
                       << (first >= 0 ? gp.data<int32_t>()[first] : 0) << " vs expected "
                       << (first >= 0 ? pred.data<int32_t>()[first] : 0);
  if (c.backward) {
    EXPECT_TRUE(CloseToScale(gdh, dh, grad_rtol)) << "dh";
    EXPECT_TRUE(CloseToScale(gdw, dw, grad_rtol)) << "dW";
  } else {
    EXPECT_TRUE(AllClose(ToCpu(gdw), dw0, 0, 0)) << "eval only must leave dW alone";
  }
}

TEST(GpuCrossEntropy, MatchesCpuF32) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const Case& c : {Case{300, 96, 200, 190, 64, true},   // 4 full chunks and one of 44 rows, 10 padded columns
                        Case{300, 96, 200, 190, 0, true},    // one default chunk
                        Case{129, 33, 77, 77, 128, true},    // odd sizes, no padding, a 1-row last chunk
                        Case{300, 96, 200, 190, 100, false}}) {  // eval only
    CheckCrossEntropy(c, DType::kF32, 1e-5);
  }
}

// At the real vocab the default chunk is 2,048 rows: 2,100 rows make two.
TEST(GpuCrossEntropy, MatchesCpuF32AtVocab32000DefaultChunks) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckCrossEntropy(Case{2100, 64, 32000, 31990, 0, true}, DType::kF32, 1e-5);
}

// bf16 h and W: logits and the loss are f32 from exact products; dlogits are
// rounded to bf16 for the two gradient GEMMs, and dh is stored in bf16.
TEST(GpuCrossEntropy, MatchesCpuBf16) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const Case& c : {Case{300, 96, 200, 190, 64, true}, Case{136, 64, 128, 120, 0, true},
                        Case{300, 96, 200, 190, 100, false}}) {
    CheckCrossEntropy(c, DType::kBF16, 1e-2);
  }
}

// docs/gpu.md, Determinism: the same inputs give the same loss, dh and dW
// bits on every call.
TEST(GpuCrossEntropy, RepeatsItsBits) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t n = 1000, d = 128, v = 4000;
  const Tensor h = ToGpu(RandomTensor({n, d}, DType::kBF16, 61)), w = ToGpu(RandomTensor({v, d}, DType::kBF16, 62));
  const Tensor targets = ToGpu(Targets(n, v, 9, 63));
  ops::CrossEntropyOptions options;
  options.normalizer = n;
  Tensor first_dh, first_dw;
  double first_loss = 0;
  for (int run = 0; run < 3; ++run) {
    Tensor dh = Tensor::Empty({n, d}, DType::kBF16, Device::Cuda(0)), dw = Tensor::Zeros({v, d}, DType::kF32, Device::Cuda(0));
    const double loss = ops::CrossEntropy(h, w, targets, options, &dh, &dw).loss;
    if (run == 0) {
      first_loss = loss;
      first_dh = ToCpu(dh);
      first_dw = ToCpu(dw);
      continue;
    }
    EXPECT_EQ(std::memcmp(&loss, &first_loss, sizeof(double)), 0) << loss << " vs first run " << first_loss;
    EXPECT_EQ(std::memcmp(ToCpu(dh).raw(), first_dh.raw(), first_dh.nbytes()), 0) << "dh bits differ, run " << run;
    EXPECT_EQ(std::memcmp(ToCpu(dw).raw(), first_dw.raw(), first_dw.nbytes()), 0) << "dW bits differ, run " << run;
  }
}

TEST(GpuCrossEntropy, AllIgnoredRowsGiveZeroLossAndGradient) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t n = 40, d = 16, v = 24;
  const Tensor h = RandomTensor({n, d}, DType::kF32, 41), w = RandomTensor({v, d}, DType::kF32, 42);
  Tensor targets = Tensor::Empty({n}, DType::kI32);
  targets.Fill(-100);
  Tensor gdh = PoisonedGpu({n, d}, DType::kF32), gdw = Tensor::Zeros({v, d}, DType::kF32, Device::Cuda(0));
  const ops::CrossEntropyResult r = ops::CrossEntropy(ToGpu(h), ToGpu(w), ToGpu(targets), {}, &gdh, &gdw);
  EXPECT_EQ(r.counted, 0);
  EXPECT_EQ(r.loss, 0.0);
  EXPECT_TRUE(AllClose(ToCpu(gdh), Tensor::Zeros({n, d}, DType::kF32), 0, 0));
  EXPECT_TRUE(AllClose(ToCpu(gdw), Tensor::Zeros({v, d}, DType::kF32), 0, 0));
}

// The vocab-parallel op on one GPU (a TP group of one, so no communication):
// its device row statistics against the CPU version of the same op, for a
// shard that starts at row 0 and one that starts mid-vocabulary (targets
// below it belong to "other ranks": no target logit here, as on the CPU).
TEST(GpuVocabParallelCrossEntropy, ShardMatchesCpuOnOneRank) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Shard { int64_t n, d, rows, first_row, vocab; DType dtype; };
  for (const Shard& c : {Shard{300, 96, 200, 0, 190, DType::kF32}, Shard{700, 40, 100, 50, 120, DType::kF32},
                         Shard{520, 64, 128, 0, 120, DType::kBF16}}) {
    SCOPED_TRACE(internal::StreamCat(DTypeName(c.dtype), " N ", c.n, " shard rows ", c.rows, " from ", c.first_row,
                                     " vocab ", c.vocab));
    const Tensor h = RandomTensor({c.n, c.d}, c.dtype, 51, -2, 2);
    const Tensor w = RandomTensor({c.rows, c.d}, c.dtype, 52, -0.5, 0.5);
    const Tensor targets = Targets(c.n, c.vocab, 5, 53);
    const Tensor dw0 = RandomTensor({c.rows, c.d}, DType::kF32, 54);
    ops::CrossEntropyOptions options;
    options.vocab = c.vocab;
    options.normalizer = 123.0;
    const TensorParallel tp;  // one rank
    Tensor dh = Tensor::Empty({c.n, c.d}, DType::kF32), dw = dw0.Clone(), pred = Tensor::Empty({c.n}, DType::kI32);
    const ops::CrossEntropyResult want = VocabParallelCrossEntropy(h.To(DType::kF32), w.To(DType::kF32), c.first_row,
                                                                   targets, options, tp, &dh, &dw, &pred);
    Tensor gdh = PoisonedGpu({c.n, c.d}, c.dtype), gdw = ToGpu(dw0), gpred = PoisonedGpu({c.n}, DType::kI32);
    const ops::CrossEntropyResult got = VocabParallelCrossEntropy(ToGpu(h), ToGpu(w), c.first_row, ToGpu(targets),
                                                                  options, tp, &gdh, &gdw, &gpred);
    EXPECT_EQ(got.counted, want.counted);
    EXPECT_NEAR(got.loss, want.loss, 1e-5 * std::abs(want.loss)) << "loss (rtol 1e-5)";
    EXPECT_TRUE(AllClose(ToCpu(gpred), pred, 0, 0)) << "predictions";
    const double rtol = c.dtype == DType::kF32 ? 1e-5 : 1e-2;
    EXPECT_TRUE(CloseToScale(gdh, dh, rtol)) << "dh";
    EXPECT_TRUE(CloseToScale(gdw, dw, rtol)) << "dW";
  }
}

}  // namespace
}  // namespace loom
