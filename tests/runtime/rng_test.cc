#include "runtime/rng.h"

#include <gtest/gtest.h>

#include <cmath>

namespace loom {
namespace {

// Known-answer test from the Random123 distribution (kat_vectors):
// philox4x32 10 rounds, counter 0, key 0.
TEST(Philox, MatchesKnownAnswer) {
  const auto r = Philox4x32(0, 0, 0);
  EXPECT_EQ(r[0], 0x6627e8d5u);
  EXPECT_EQ(r[1], 0xe169c58du);
  EXPECT_EQ(r[2], 0xbc57ac4cu);
  EXPECT_EQ(r[3], 0x9b00dbd8u);
}

TEST(Philox, SliceDrawsTheSameValuesAsTheWhole) {
  const uint64_t key = RngKey(7, "layers.0.wq");
  Tensor whole = Tensor::Empty({10, 8}, DType::kF32);
  FillNormal(whole, key, 0.02);
  Tensor part = Tensor::Empty({3, 8}, DType::kF32);
  FillNormal(part, key, 0.02, /*offset=*/4 * 8);
  for (int i = 0; i < 24; ++i) EXPECT_EQ(part.data<float>()[i], whole.data<float>()[32 + i]);
}

TEST(Philox, NormalDrawsHaveUnitMoments) {
  const uint64_t key = RngKey(1, "moments");
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = RngNormal(key, i);
    s += x;
    s2 += x * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
}

TEST(Philox, DifferentNamesGiveDifferentStreams) {
  EXPECT_NE(RngKey(1, "a"), RngKey(1, "b"));
  EXPECT_NE(RngKey(1, "a"), RngKey(2, "a"));
}

}  // namespace
}  // namespace loom
