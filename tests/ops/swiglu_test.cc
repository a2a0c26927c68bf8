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
  Tensor dgu = Tensor::Empty({6, 10}, DType::kF64);
  ops::SwigluBackward(gate, up, r, dgu);
  const auto [dgate, dup] = testing::SplitRowHalves(dgu);
  testing::ExpectGradientsMatch(loss, {{"gate", gate, dgate}, {"up", up, dup}});
}

// h[n] = s_n · SiLU(gate[n]) ⊙ up[n]: the gradients of gate, up (packed as
// [dgate | dup] rows) and the row scale s (an MoE row's routing gate)
// against finite differences.
TEST(Swiglu, RowScaledGradientsMatchFiniteDifferences) {
  const int64_t n = 6, f = 5;
  Tensor gate = RandomTensor({n, f}, DType::kF64, 1, -4, 4), up = RandomTensor({n, f}, DType::kF64, 2);
  Tensor scale = RandomTensor({n, 1}, DType::kF64, 4), r = RandomTensor({n, f}, DType::kF64, 3);
  Tensor h = Tensor::Empty(gate.shape(), DType::kF64), plain = Tensor::Empty(gate.shape(), DType::kF64);
  ops::SwigluForward(gate, up, plain);
  ops::SwigluForward(gate, up, h, &scale);
  for (int64_t i = 0; i < h.numel(); ++i) EXPECT_DOUBLE_EQ(h.Get(i), scale.Get(i / f) * plain.Get(i));
  auto loss = [&] {
    ops::SwigluForward(gate, up, h, &scale);
    return testing::Dot(h, r);
  };
  Tensor dgu = Tensor::Empty({n, 2 * f}, DType::kF64), dscale = Tensor::Empty(scale.shape(), DType::kF64);
  ops::SwigluBackward(gate, up, r, dgu, &scale, &dscale);
  const auto [dgate, dup] = testing::SplitRowHalves(dgu);
  testing::ExpectGradientsMatch(loss, {{"gate", gate, dgate}, {"up", up, dup}, {"scale", scale, dscale}});
}

TEST(Swiglu, BadShapesAreRefused) {
  Tensor gate = RandomTensor({6, 5}, DType::kF64, 1), up = RandomTensor({6, 5}, DType::kF64, 2);
  Tensor h = Tensor::Empty(gate.shape(), DType::kF64), scale = RandomTensor({5}, DType::kF64, 3);
  EXPECT_DEATH(ops::SwigluForward(gate, up, h, &scale), "\\[swiglu\\] scale \\[5\\] f64 must hold one f64 per row");
  Tensor dgu = Tensor::Empty({6, 10}, DType::kF64), row_scale = RandomTensor({6}, DType::kF64, 4);
  EXPECT_DEATH(ops::SwigluBackward(gate, up, h, dgu, &row_scale), "a row scale and its gradient go together");
  Tensor unpacked = Tensor::Empty({6, 5}, DType::kF64);
  EXPECT_DEATH(ops::SwigluBackward(gate, up, h, unpacked), "dgu \\[6, 5\\] f64 must be \\[6, 10\\] f64");
}

}  // namespace
}  // namespace loom
