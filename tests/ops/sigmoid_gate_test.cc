#include "ops/sigmoid_gate.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

TEST(SigmoidGate, ForwardIsXTimesSigmoidG) {
  Tensor x = RandomTensor({4, 9}, DType::kF64, 1), g = RandomTensor({4, 9}, DType::kF64, 2, -6, 6);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64), expected = Tensor::Empty(x.shape(), DType::kF64);
  for (int64_t i = 0; i < y.numel(); ++i) expected.data<double>()[i] = x.Get(i) / (1 + std::exp(-g.Get(i)));
  ops::SigmoidGateForward(x, g, y);
  EXPECT_TRUE(AllClose(y, expected, 1e-14, 1e-15));
}

TEST(SigmoidGate, GradientsMatchFiniteDifferences) {
  Tensor x = RandomTensor({5, 6}, DType::kF64, 1), g = RandomTensor({5, 6}, DType::kF64, 2, -5, 5);
  Tensor r = RandomTensor({5, 6}, DType::kF64, 3);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64);
  auto loss = [&] {
    ops::SigmoidGateForward(x, g, y);
    return testing::Dot(y, r);
  };
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64), dg = Tensor::Empty(g.shape(), DType::kF64);
  ops::SigmoidGateBackward(x, g, r, dx, dg);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}, {"g", g, dg}});
}

}  // namespace
}  // namespace loom
