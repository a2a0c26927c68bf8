// MoE permutation (ops/moe_permute.h) on the CPU: the index on a hand-made
// case (expert-major rows, token order inside an expert, capacity cuts the
// tail), the combine's backward against finite differences in f64, and the
// gather as the adjoint of the ungated combine.
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
  EXPECT_EQ(Values(p.ids), (std::vector<int32_t>{1, 2, 6, 3, 5, 0, 4, 7}));
  EXPECT_EQ(Values(p.rows), (std::vector<int32_t>{5, 0, 1, 3, 6, 4, 2, 7}));
  EXPECT_EQ(p.counts, (std::vector<int64_t>{3, 2, 3}));
}

TEST(MoePermute, CapacityDropsTheLaterTokens) {
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {2, 0, 1}, p);
  // expert 0 keeps ids 1 2 (drops 6), expert 1 nothing, expert 2 keeps id 0.
  EXPECT_EQ(Values(p.ids), (std::vector<int32_t>{1, 2, 0}));
  EXPECT_EQ(Values(p.rows), (std::vector<int32_t>{2, 0, 1, -1, -1, -1, -1, -1}));
}

TEST(MoePermute, CombineBackwardMatchesFiniteDifferences) {
  const int64_t t = 4, c = 5;
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {2, 2, 3}, p);  // id 6 (token 3) dropped
  const int64_t s = p.ids.numel();
  Tensor ye = testing::RandomTensor({s, c}, DType::kF64, 1), gates = testing::RandomTensor({t, 2}, DType::kF64, 2);
  Tensor add = testing::RandomTensor({t, c}, DType::kF64, 3), w = testing::RandomTensor({t, c}, DType::kF64, 4);
  auto loss = [&] {
    Tensor y = Tensor::Empty({t, c}, DType::kF64);
    MoeCombine(ye, p.rows, &gates, &add, y);
    return testing::Dot(w, y);
  };
  Tensor dye = Tensor::Empty({s, c}, DType::kF64), dgates = Tensor::Empty({t, 2}, DType::kF64);
  dgates.Fill(std::nan(""));
  MoeCombineBackward(w, ye, p.rows, gates, dye, dgates);
  EXPECT_EQ(dgates.data<double>()[6], 0.0);  // the dropped assignment
  testing::ExpectGradientsMatch(loss, {{"ye", ye, dye}, {"gates", gates, dgates}, {"add", add, w}}, 1e-9);
}

// <Gather(x), u> = <x, Combine(u, rows, no gates)>: the gather's backward is the ungated combine.
TEST(MoePermute, GatherIsTheAdjointOfTheUngatedCombine) {
  const int64_t t = 4, c = 3;
  MoePermutation p;
  MoePermuteIndex(HandExperts(), {3, 1, 2}, p);
  const int64_t s = p.ids.numel();
  Tensor x = testing::RandomTensor({t, c}, DType::kF64, 5), u = testing::RandomTensor({s, c}, DType::kF64, 6);
  Tensor xe = Tensor::Empty({s, c}, DType::kF64), back = Tensor::Empty({t, c}, DType::kF64);
  MoeGather(x, p.ids, 2, xe);
  for (int64_t r = 0; r < s; ++r)
    for (int64_t i = 0; i < c; ++i) EXPECT_EQ(xe.data<double>()[r * c + i], x.data<double>()[p.ids.data<int32_t>()[r] / 2 * c + i]);
  MoeCombine(u, p.rows, nullptr, nullptr, back);
  EXPECT_NEAR(testing::Dot(xe, u), testing::Dot(x, back), 1e-12);
}

}  // namespace
}  // namespace loom::ops
