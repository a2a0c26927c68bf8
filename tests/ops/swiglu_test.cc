#include "ops/swiglu.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

TEST(Swiglu, ForwardIsSiluOfGateTimesUp) {
  Tensor gate = RandomTensor({5, 8}, DType::kF64, 1, -4, 4), up = RandomTensor({5, 8}, DType::kF64, 2);
  Tensor h = Tensor::Empty(gate.shape(), DType::kF64), expected = Tensor::Empty(gate.shape(), DType::kF64);
  for (int64_t i = 0; i < h.numel(); ++i) {
    expected.data<double>()[i] = gate.Get(i) / (1 + std::exp(-gate.Get(i))) * up.Get(i);
  }
  ops::SwigluForward(gate, up, h);
  EXPECT_TRUE(AllClose(h, expected, 1e-14, 1e-15));
}

TEST(Swiglu, GradientsMatchFiniteDifferences) {
  Tensor gate = RandomTensor({6, 5}, DType::kF64, 1, -4, 4), up = RandomTensor({6, 5}, DType::kF64, 2);
  Tensor r = RandomTensor({6, 5}, DType::kF64, 3);
  Tensor h = Tensor::Empty(gate.shape(), DType::kF64);
  auto loss = [&] {
    ops::SwigluForward(gate, up, h);
    return testing::Dot(h, r);
  };
  Tensor dgate = Tensor::Empty(gate.shape(), DType::kF64), dup = Tensor::Empty(up.shape(), DType::kF64);
  ops::SwigluBackward(gate, up, r, dgate, dup);
  testing::ExpectGradientsMatch(loss, {{"gate", gate, dgate}, {"up", up, dup}});
}

}  // namespace
}  // namespace loom
