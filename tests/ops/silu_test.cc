#include "ops/silu.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

TEST(Silu, ForwardIsXTimesSigmoidX) {
  Tensor x = RandomTensor({7, 5}, DType::kF64, 1, -6, 6);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), expected = Tensor::Empty(x.shape(), DType::kF64);
  for (int64_t i = 0; i < x.numel(); ++i) expected.data<double>()[i] = x.Get(i) / (1 + std::exp(-x.Get(i)));
  ops::SiluForward(x, y);
  EXPECT_TRUE(AllClose(y, expected, 1e-14, 1e-15));
  Tensor inplace = x.Clone();
  ops::SiluForward(inplace, inplace);
  EXPECT_TRUE(AllClose(inplace, expected, 1e-14, 1e-15));
}

TEST(Silu, SaturatesWithoutOverflow) {
  Tensor x = Tensor::FromVector<float>({-1000.f, -90.f, 90.f, 1000.f}, {4});
  Tensor y = Tensor::Empty({4}, DType::kF32), dx = Tensor::Empty({4}, DType::kF32);
  ops::SiluForward(x, y);
  ops::SiluBackward(x, Tensor::FromVector<float>({1, 1, 1, 1}, {4}), dx);
  EXPECT_TRUE(AllClose(y, Tensor::FromVector<double>({0, 0, 90, 1000}, {4}), 1e-7, 1e-30));
  EXPECT_TRUE(AllClose(dx, Tensor::FromVector<double>({0, 0, 1, 1}, {4}), 1e-7, 1e-30));
}

TEST(Silu, GradientsMatchFiniteDifferences) {
  Tensor x = RandomTensor({6, 7}, DType::kF64, 1, -5, 5), r = RandomTensor({6, 7}, DType::kF64, 2);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64);
  auto loss = [&] {
    ops::SiluForward(x, y);
    return testing::Dot(y, r);
  };
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64);
  ops::SiluBackward(x, r, dx);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}});
}

}  // namespace
}  // namespace loom
