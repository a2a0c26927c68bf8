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

// Heads [h0, h0 + n) of every row of x [T, H, D] (f64), as [T, n, D].
Tensor Heads(const Tensor& x, int64_t h0, int64_t n) {
  const int64_t t_len = x.dim(0), d = x.dim(2);
  return testing::Columns(x.Reshape({t_len, x.dim(1) * d}), h0 * d, n * d).Reshape({t_len, n, d});
}

::testing::AssertionResult Equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return ::testing::AssertionFailure() << "shapes differ";
  for (int64_t i = 0; i < a.numel(); ++i)
    if (a.Get(i) != b.Get(i)) return ::testing::AssertionFailure() << "element " << i << ": " << a.Get(i) << " vs " << b.Get(i);
  return ::testing::AssertionSuccess();
}

// The packed q, k, v: RoPE of the first two parts and a copy of the third,
// exactly as RopeForward on each part; the backward packs RopeBackward's.
TEST(Rope, QkvIsRopeOfEachPartAndBackwardPacksThem) {
  const int64_t t = 7, hq = 4, hk = 2, d = 8;
  const Tensor qkv = RandomTensor({t, hq + 2 * hk, d}, DType::kF64, 3);
  const Tensor pos = Tensor::FromVector<int32_t>({5, 6, 7, 0, 1, 2, 40}, {t});
  const ops::RopeTable table = ops::RopeTable::Plain(kTheta, d);
  Tensor q = Tensor::Empty({t, hq, d}, DType::kF64), k = Tensor::Empty({t, hk, d}, DType::kF64),
         v = Tensor::Empty({t, hk, d}, DType::kF64);
  ops::RopeQkvForward(qkv, pos, table, q, k, v);
  Tensor want_q = Tensor::Empty(q.shape(), DType::kF64), want_k = Tensor::Empty(k.shape(), DType::kF64);
  ops::RopeForward(Heads(qkv, 0, hq), pos, table, want_q);
  ops::RopeForward(Heads(qkv, hq, hk), pos, table, want_k);
  EXPECT_TRUE(Equal(q, want_q));
  EXPECT_TRUE(Equal(k, want_k));
  EXPECT_TRUE(Equal(v, Heads(qkv, hq + hk, hk)));

  const Tensor dq = RandomTensor(q.shape(), DType::kF64, 4), dk = RandomTensor(k.shape(), DType::kF64, 5),
               dv = RandomTensor(v.shape(), DType::kF64, 6);
  Tensor dqkv = Tensor::Empty(qkv.shape(), DType::kF64);
  ops::RopeQkvBackward(dq, dk, dv, pos, table, dqkv);
  Tensor want_dq = Tensor::Empty(q.shape(), DType::kF64), want_dk = Tensor::Empty(k.shape(), DType::kF64);
  ops::RopeBackward(dq, pos, table, want_dq);
  ops::RopeBackward(dk, pos, table, want_dk);
  EXPECT_TRUE(Equal(Heads(dqkv, 0, hq), want_dq));
  EXPECT_TRUE(Equal(Heads(dqkv, hq, hk), want_dk));
  EXPECT_TRUE(Equal(Heads(dqkv, hq + hk, hk), dv));
}

TEST(Rope, QkvRejectsPartsThatDoNotFillTheRow) {
  const Tensor qkv = Tensor::Zeros({3, 7, 8}, DType::kF32), pos = Positions(0, 3);
  Tensor q = Tensor::Empty({3, 4, 8}, DType::kF32), k = Tensor::Empty({3, 2, 8}, DType::kF32),
         v = Tensor::Empty({3, 2, 8}, DType::kF32);
  EXPECT_DEATH(ops::RopeQkvForward(qkv, pos, ops::RopeTable::Plain(kTheta, 8), q, k, v),
               "\\[rope\\] the parts' 8 heads are not the packed row's 7");
}

}  // namespace
}  // namespace loom
