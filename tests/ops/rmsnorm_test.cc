#include "ops/rmsnorm.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

constexpr double kEps = 1e-5;

// y[n, j] = x[n, j] / sqrt(mean_j x² + eps) · w[j], rows of length d.
Tensor DirectRmsNorm(const Tensor& x, const Tensor& w, int64_t d) {
  Tensor y = Tensor::Empty(x.shape(), DType::kF64);
  for (int64_t n = 0; n < x.numel() / d; ++n) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += x.Get(n * d + j) * x.Get(n * d + j) / d;
    for (int64_t j = 0; j < d; ++j) {
      y.data<double>()[n * d + j] = x.Get(n * d + j) / std::sqrt(ms + kEps) * (w.defined() ? w.Get(j) : 1.0);
    }
  }
  return y;
}

TEST(RmsNorm, ForwardMatchesDirectComputation) {
  Tensor x = RandomTensor({6, 10}, DType::kF64, 1), w = RandomTensor({10}, DType::kF64, 2);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), rstd = Tensor::Empty({6}, DType::kF64);
  ops::RmsNormForward(x, w, kEps, y, rstd);
  EXPECT_TRUE(AllClose(y, DirectRmsNorm(x, w, 10), 1e-13, 1e-13));
  ops::RmsNormForward(x, Tensor(), kEps, y, rstd);
  EXPECT_TRUE(AllClose(y, DirectRmsNorm(x, Tensor(), 10), 1e-13, 1e-13));
}

// x [N, H·Dh] viewed as [N·H, Dh] normalises each head on its own, with the
// one weight [Dh] shared by the heads.
TEST(RmsNorm, PerHeadViewNormalizesEachHeadSeparately) {
  const int64_t n = 3, heads = 4, dh = 5;
  Tensor x = RandomTensor({n, heads * dh}, DType::kF64, 1), w = RandomTensor({dh}, DType::kF64, 2);
  Tensor y = Tensor::Empty({n * heads, dh}, DType::kF64), rstd = Tensor::Empty({n * heads}, DType::kF64);
  ops::RmsNormForward(x.Reshape({n * heads, dh}), w, kEps, y, rstd);
  Tensor expected = Tensor::Empty({n, heads * dh}, DType::kF64);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      Tensor head = Tensor::Empty({1, dh}, DType::kF64);
      for (int64_t j = 0; j < dh; ++j) head.data<double>()[j] = x.Get(i * heads * dh + h * dh + j);
      Tensor yh = DirectRmsNorm(head, w, dh);
      for (int64_t j = 0; j < dh; ++j) expected.data<double>()[i * heads * dh + h * dh + j] = yh.Get(j);
    }
  }
  EXPECT_TRUE(AllClose(y, expected, 1e-13, 1e-13));
}

TEST(RmsNorm, GradientsMatchFiniteDifferences) {
  const int64_t n = 5, d = 8;
  Tensor x = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({d}, DType::kF64, 2, 0.5, 1.5);
  Tensor r = RandomTensor({n, d}, DType::kF64, 3);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), rstd = Tensor::Empty({n}, DType::kF64);
  auto loss = [&] {
    ops::RmsNormForward(x, w, kEps, y, rstd);
    return testing::Dot(y, r);
  };
  loss();
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64), dw = Tensor::Zeros({d}, DType::kF64);
  ops::RmsNormBackward(x, w, rstd, r, dx, dw);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}, {"w", w, dw}});
}

TEST(RmsNorm, GradientsWithoutWeightMatchFiniteDifferences) {
  const int64_t n = 4, d = 6;
  Tensor x = RandomTensor({n, d}, DType::kF64, 1), r = RandomTensor({n, d}, DType::kF64, 2);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), rstd = Tensor::Empty({n}, DType::kF64);
  auto loss = [&] {
    ops::RmsNormForward(x, Tensor(), kEps, y, rstd);
    return testing::Dot(y, r);
  };
  loss();
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64), no_dw;
  ops::RmsNormBackward(x, Tensor(), rstd, r, dx, no_dw);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}});
}

TEST(RmsNorm, WeightGradientAccumulates) {
  const int64_t n = 4, d = 6;
  Tensor x = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({d}, DType::kF64, 2);
  Tensor dy = RandomTensor({n, d}, DType::kF64, 3);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), rstd = Tensor::Empty({n}, DType::kF64);
  ops::RmsNormForward(x, w, kEps, y, rstd);
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64), once = Tensor::Zeros({d}, DType::kF64);
  ops::RmsNormBackward(x, w, rstd, dy, dx, once);
  Tensor start = RandomTensor({d}, DType::kF64, 4);
  Tensor dw = start.Clone();
  ops::RmsNormBackward(x, w, rstd, dy, dx, dw);
  ops::RmsNormBackward(x, w, rstd, dy, dx, dw);
  for (int64_t j = 0; j < d; ++j) EXPECT_NEAR(dw.Get(j), start.Get(j) + 2 * once.Get(j), 1e-12);
}

// dx = RMSNormᵀ(dy) + add, also with add being dx itself (the residual's
// gradient summed in place).
TEST(RmsNorm, BackwardAddsTheResidualGradient) {
  const int64_t n = 6, d = 10;
  Tensor x = RandomTensor({n, d}, DType::kF64, 1), w = RandomTensor({d}, DType::kF64, 2);
  Tensor dy = RandomTensor({n, d}, DType::kF64, 3), add = RandomTensor({n, d}, DType::kF64, 4);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), rstd = Tensor::Empty({n}, DType::kF64);
  ops::RmsNormForward(x, w, kEps, y, rstd);
  Tensor plain = Tensor::Empty(x.shape(), DType::kF64), dw_plain = Tensor::Zeros({d}, DType::kF64);
  ops::RmsNormBackward(x, w, rstd, dy, plain, dw_plain);
  Tensor summed = Tensor::Empty(x.shape(), DType::kF64), dw = Tensor::Zeros({d}, DType::kF64);
  ops::RmsNormBackward(x, w, rstd, dy, summed, dw, &add);
  Tensor in_place = add.Clone(), dw2 = Tensor::Zeros({d}, DType::kF64);
  ops::RmsNormBackward(x, w, rstd, dy, in_place, dw2, &in_place);
  for (int64_t i = 0; i < n * d; ++i) {
    EXPECT_EQ(summed.Get(i), plain.Get(i) + add.Get(i)) << i;
    EXPECT_EQ(in_place.Get(i), summed.Get(i)) << i;
  }
  EXPECT_TRUE(AllClose(dw, dw_plain, 0, 0));
}

// Large enough for the threaded path.
TEST(RmsNorm, F32MatchesF64) {
  Tensor x = RandomTensor({256, 160}, DType::kF64, 1), w = RandomTensor({160}, DType::kF64, 2);
  Tensor dy = RandomTensor({256, 160}, DType::kF64, 3);
  Tensor y[2], dx[2], dw[2];
  for (int k = 0; k < 2; ++k) {
    const DType dt = k == 0 ? DType::kF64 : DType::kF32;
    Tensor xk = x.To(dt), wk = w.To(dt), rstd = Tensor::Empty({256}, dt);
    y[k] = Tensor::Empty(x.shape(), dt);
    dx[k] = Tensor::Empty(x.shape(), dt);
    dw[k] = Tensor::Zeros({160}, dt);
    ops::RmsNormForward(xk, wk, kEps, y[k], rstd);
    ops::RmsNormBackward(xk, wk, rstd, dy.To(dt), dx[k], dw[k]);
  }
  EXPECT_TRUE(AllClose(y[1], y[0], 1e-5, 1e-5));
  EXPECT_TRUE(AllClose(dx[1], dx[0], 1e-4, 1e-5));
  EXPECT_TRUE(AllClose(dw[1], dw[0], 1e-4, 1e-5));
}

}  // namespace
}  // namespace loom
