// MoE permutation (ops/moe_permute.h) on the CPU: the index on a hand-made
// case (expert-major rows, token order inside an expert, capacity cuts the
// tail), the gather and the combine as each other's adjoints, and the
// one-value-an-assignment moves through the [T·k, 1] view.
#include "ops/moe_permute.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom::ops {
namespace {

// Tokens 0..3, k = 2, E = 3: ids 0..7 route to experts 2 0 | 0 1 | 2 1 | 0 2.
Tensor HandExperts() { return Tensor::FromVector<int32_t>({2, 0, 0, 1, 2, 1, 0, 2}, {4, 2}); }

std::vector<int32_t> Values(const Tensor& t) { return {t.data<int32_t>(), t.data<int32_t>() + t.numel()}; }

TEST(MoePermute, IndexGroupsByExpertInTokenOrder) {
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {3, 2, 3}, p);
  // expert 0: ids 1 2 6 → rows 0 1 2; expert 1: ids 3 5 → 3 4; expert 2: ids 0 4 7 → 5 6 7.
  EXPECT_EQ(Values(p.rows), (std::vector<int32_t>{5, 0, 1, 3, 6, 4, 2, 7}));
  EXPECT_EQ(p.counts, (std::vector<int64_t>{3, 2, 3}));
  EXPECT_EQ(p.size(), 8);
}

TEST(MoePermute, CapacityDropsTheLaterTokens) {
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {2, 0, 1}, p);
  // expert 0 keeps ids 1 2 (drops 6), expert 1 nothing, expert 2 keeps id 0.
  EXPECT_EQ(Values(p.rows), (std::vector<int32_t>{2, 0, 1, -1, -1, -1, -1, -1}));
  EXPECT_EQ(p.size(), 3);
}

// xe[rows_tj] = x[t]; <Gather(x), u> = <x, Combine(u)>: each is the other's
// backward. With a dropped assignment (id 6, token 3).
TEST(MoePermute, GatherAndCombineAreAdjoint) {
  const int64_t t = 4, c = 3;
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {2, 2, 3}, p);
  const int64_t s = p.size();
  Tensor x = testing::RandomTensor({t, c}, DType::kF64, 5), u = testing::RandomTensor({s, c}, DType::kF64, 6);
  Tensor xe = Tensor::Empty({s, c}, DType::kF64), back = Tensor::Empty({t, c}, DType::kF64);
  xe.Fill(std::nan(""));
  MoeGather(x, p.rows, xe);
  for (int64_t a = 0; a < t * 2; ++a) {
    const int32_t r = p.rows.data<int32_t>()[a];
    if (r < 0) continue;
    for (int64_t i = 0; i < c; ++i) EXPECT_EQ(xe.data<double>()[r * c + i], x.data<double>()[a / 2 * c + i]);
  }
  MoeCombine(u, p.rows, nullptr, back);
  EXPECT_NEAR(testing::Dot(xe, u), testing::Dot(x, back), 1e-12);
  // The combine's sum in j order, plus the addend.
  Tensor add = testing::RandomTensor({t, c}, DType::kF64, 7), y = Tensor::Empty({t, c}, DType::kF64);
  MoeCombine(u, p.rows, &add, y);
  for (int64_t tok = 0; tok < t; ++tok)
    for (int64_t i = 0; i < c; ++i) {
      double expected = 0;
      for (int j = 0; j < 2; ++j)
        if (const int32_t r = p.rows.data<int32_t>()[tok * 2 + j]; r >= 0) expected += u.data<double>()[r * c + i];
      EXPECT_EQ(y.data<double>()[tok * c + i], expected + add.data<double>()[tok * c + i]);
    }
  // Plus the thin product a [T, n] · w [n, C], summed over n after the rest.
  const Tensor a = testing::RandomTensor({t, 2}, DType::kF64, 8), w = testing::RandomTensor({2, c}, DType::kF64, 9);
  Tensor yw = Tensor::Empty({t, c}, DType::kF64);
  MoeCombine(u, p.rows, &add, yw, &a, &w);
  for (int64_t tok = 0; tok < t; ++tok)
    for (int64_t i = 0; i < c; ++i) {
      const double thin = a.data<double>()[tok * 2] * w.data<double>()[i] +
                          a.data<double>()[tok * 2 + 1] * w.data<double>()[c + i];
      EXPECT_EQ(yw.data<double>()[tok * c + i], y.data<double>()[tok * c + i] + thin);
    }
}

// Viewed as [T·k, 1], the gather puts each kept assignment's value at its
// row and the combine brings row values back, 0 where dropped.
TEST(MoePermute, OneValueAnAssignmentMovesThroughTheFlatView) {
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {2, 2, 3}, p);  // id 6 dropped
  const Tensor by_id = Tensor::FromVector<double>({10, 11, 12, 13, 14, 15, 16, 17}, {8, 1});
  const Tensor flat_rows = p.rows.Reshape({8, 1});
  Tensor by_row = Tensor::Empty({p.size(), 1}, DType::kF64);
  MoeGather(by_id, flat_rows, by_row);
  for (int64_t a = 0; a < 8; ++a) {
    const int32_t r = p.rows.data<int32_t>()[a];
    if (r >= 0) {
      EXPECT_EQ(by_row.data<double>()[r], 10.0 + a);
    }
  }
  Tensor back = Tensor::Empty({8, 1}, DType::kF64);
  MoeCombine(by_row, flat_rows, nullptr, back);
  for (int64_t a = 0; a < 8; ++a) EXPECT_EQ(back.data<double>()[a], a == 6 ? 0.0 : 10.0 + a);
}

}  // namespace
}  // namespace loom::ops
