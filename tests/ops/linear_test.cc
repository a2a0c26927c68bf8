#include "ops/linear.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

TEST(Linear, ForwardIsXTimesWTransposed) {
  const int64_t n = 5, in = 4, out = 3;
  Tensor x = RandomTensor({n, in}, DType::kF64, 1), w = RandomTensor({out, in}, DType::kF64, 2);
  Tensor y = Tensor::Empty({n, out}, DType::kF64), expected = Tensor::Empty({n, out}, DType::kF64);
  ops::LinearForward(x, w, y);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (int64_t k = 0; k < in; ++k) s += x.Get(i * in + k) * w.Get(o * in + k);
      expected.data<double>()[i * out + o] = s;
    }
  }
  EXPECT_TRUE(AllClose(y, expected, 1e-13, 1e-13));
}

// y = x·Wᵀ + residual, with the residual apart from y and as y itself.
TEST(Linear, ForwardAddsTheResidual) {
  const int64_t n = 6, in = 5, out = 4;
  Tensor x = RandomTensor({n, in}, DType::kF64, 1), w = RandomTensor({out, in}, DType::kF64, 2);
  Tensor r = RandomTensor({n, out}, DType::kF64, 3);
  Tensor plain = Tensor::Empty({n, out}, DType::kF64), y = Tensor::Empty({n, out}, DType::kF64);
  ops::LinearForward(x, w, plain);
  ops::LinearForward(x, w, y, &r);
  Tensor in_place = r.Clone();
  ops::LinearForward(x, w, in_place, &in_place);
  for (int64_t i = 0; i < n * out; ++i) {
    EXPECT_NEAR(y.Get(i), plain.Get(i) + r.Get(i), 1e-14) << i;
    EXPECT_EQ(in_place.Get(i), y.Get(i)) << i;
  }
}

TEST(Linear, GradientsMatchFiniteDifferences) {
  // x is [2, 3, in]: a batch of sequences, read as 6 rows.
  const int64_t in = 4, out = 5;
  Tensor x = RandomTensor({2, 3, in}, DType::kF64, 1), w = RandomTensor({out, in}, DType::kF64, 2);
  Tensor r = RandomTensor({2, 3, out}, DType::kF64, 3);
  Tensor y = Tensor::Empty({2, 3, out}, DType::kF64);
  auto loss = [&] {
    ops::LinearForward(x, w, y);
    return testing::Dot(y, r);
  };
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64), dw = Tensor::Zeros(w.shape(), DType::kF64);
  ops::LinearBackward(x, w, r, &dx, dw);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}, {"w", w, dw}});
}

TEST(Linear, WeightGradientAccumulatesAndInputGradientIsWritten) {
  Tensor x = RandomTensor({6, 4}, DType::kF64, 1), w = RandomTensor({3, 4}, DType::kF64, 2);
  Tensor dy = RandomTensor({6, 3}, DType::kF64, 3);
  Tensor dx_once = Tensor::Empty(x.shape(), DType::kF64), dw_once = Tensor::Zeros(w.shape(), DType::kF64);
  ops::LinearBackward(x, w, dy, &dx_once, dw_once);

  Tensor dx = RandomTensor(x.shape(), DType::kF64, 4);  // stale contents are overwritten
  Tensor dw_start = RandomTensor(w.shape(), DType::kF64, 5);
  Tensor dw = dw_start.Clone();
  ops::LinearBackward(x, w, dy, &dx, dw);
  ops::LinearBackward(x, w, dy, nullptr, dw);
  EXPECT_TRUE(AllClose(dx, dx_once, 1e-13, 1e-13));
  for (int64_t i = 0; i < dw.numel(); ++i) EXPECT_NEAR(dw.Get(i), dw_start.Get(i) + 2 * dw_once.Get(i), 1e-12);
}

// x feeding two projections: the second backward adds its dx to the first's.
TEST(Linear, AccumulateDxAddsToTheInputGradient) {
  Tensor x = RandomTensor({5, 4}, DType::kF64, 1);
  Tensor w1 = RandomTensor({3, 4}, DType::kF64, 2), w2 = RandomTensor({6, 4}, DType::kF64, 3);
  Tensor dy1 = RandomTensor({5, 3}, DType::kF64, 4), dy2 = RandomTensor({5, 6}, DType::kF64, 5);
  Tensor dx1 = Tensor::Empty(x.shape(), DType::kF64), dx2 = Tensor::Empty(x.shape(), DType::kF64);
  Tensor dw1 = Tensor::Zeros(w1.shape(), DType::kF64), dw2 = Tensor::Zeros(w2.shape(), DType::kF64);
  ops::LinearBackward(x, w1, dy1, &dx1, dw1);
  ops::LinearBackward(x, w2, dy2, &dx2, dw2);
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64);
  ops::LinearBackward(x, w1, dy1, &dx, dw1);
  ops::LinearBackward(x, w2, dy2, &dx, dw2, /*accumulate_dx=*/true);
  for (int64_t i = 0; i < dx.numel(); ++i) EXPECT_NEAR(dx.Get(i), dx1.Get(i) + dx2.Get(i), 1e-13) << i;
}

}  // namespace
}  // namespace loom
