#include "ops/rope.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

constexpr double kTheta = 10000;

Tensor Positions(int64_t offset, int64_t count) {
  std::vector<int32_t> p(count);
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<int32_t>(offset + i);
  return Tensor::FromVector(p, {count});
}

// rope.txt: x [5, 8] is one head at positions offset + 0..4.
TEST(Rope, MatchesGoldenVectorsAndBackwardInvertsThem) {
  const testing::GoldenCase golden = testing::ReadGolden("rope.txt");
  for (const std::string name : {"pos0", "pos7"}) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(golden.params.count(name + ".offset"));
    const int64_t offset = static_cast<int64_t>(golden.params.at(name + ".offset"));
    const Tensor& gx = golden.t(name + ".x");
    const Tensor& gy = golden.t(name + ".y");
    ASSERT_EQ(gx.shape(), (Shape{5, 8}));
    const Tensor x = gx.Reshape({5, 1, 8});
    const Tensor pos = Positions(offset, 5);
    Tensor y = Tensor::Empty({5, 1, 8}, DType::kF64);
    ops::RopeForward(x, pos, kTheta, y);
    EXPECT_TRUE(AllClose(y, gy, 1e-12, 1e-15));
    // Backward applies Rᵀ = R⁻¹: it takes the golden y back to x.
    Tensor back = Tensor::Empty({5, 1, 8}, DType::kF64);
    ops::RopeBackward(gy.Reshape({5, 1, 8}), pos, kTheta, back);
    EXPECT_TRUE(AllClose(back, gx, 1e-12, 1e-15));
  }
}

TEST(Rope, InPlaceMatchesOutOfPlace) {
  const Tensor x = RandomTensor({6, 3, 8}, DType::kF32, 1);
  const Tensor pos = Positions(11, 6);
  Tensor y = Tensor::Empty(x.shape(), DType::kF32);
  ops::RopeForward(x, pos, kTheta, y);
  Tensor inplace = x.Clone();
  ops::RopeForward(inplace, pos, kTheta, inplace);
  for (int64_t i = 0; i < y.numel(); ++i) ASSERT_EQ(inplace.Get(i), y.Get(i)) << "element " << i;
  ops::RopeBackward(inplace, pos, kTheta, inplace);
  EXPECT_TRUE(AllClose(inplace, x, 1e-6, 1e-6));
}

TEST(Rope, GradientsMatchFiniteDifferences) {
  const int64_t t = 5, heads = 3, d = 6;
  Tensor x = RandomTensor({t, heads, d}, DType::kF64, 1), r = RandomTensor({t, heads, d}, DType::kF64, 2);
  // Positions need not be sorted or contiguous (packed documents restart them).
  const Tensor pos = Tensor::FromVector<int32_t>({3, 4, 0, 1, 900}, {t});
  Tensor y = Tensor::Empty(x.shape(), DType::kF64);
  auto loss = [&] {
    ops::RopeForward(x, pos, kTheta, y);
    return testing::Dot(y, r);
  };
  Tensor dx = Tensor::Empty(x.shape(), DType::kF64);
  ops::RopeBackward(r, pos, kTheta, dx);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}});
}

}  // namespace
}  // namespace loom
