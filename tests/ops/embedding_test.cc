#include "ops/embedding.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::RandomTensor;

TEST(Embedding, ForwardCopiesTheRowOfEachId) {
  Tensor table = RandomTensor({6, 3}, DType::kF32, 1);
  Tensor ids = Tensor::FromVector<int32_t>({5, 0, 5, 2}, {4});
  Tensor out = Tensor::Empty({4, 3}, DType::kF32);
  ops::EmbeddingForward(ids, table, out);
  for (int64_t n = 0; n < 4; ++n) {
    for (int64_t j = 0; j < 3; ++j) EXPECT_EQ(out.Get(n * 3 + j), table.Get(ids.Get(n) * 3 + j)) << n << "," << j;
  }
}

// Repeated ids (3 appears three times) must add their gradients; the
// starting dtable checks that the gradient accumulates.
TEST(Embedding, GradientsMatchFiniteDifferences) {
  const int64_t v = 7, d = 4;
  Tensor table = RandomTensor({v, d}, DType::kF64, 1);
  Tensor ids = Tensor::FromVector<int32_t>({3, 1, 3, 6, 0, 3}, {6});
  Tensor r = RandomTensor({6, d}, DType::kF64, 2);
  Tensor out = Tensor::Empty({6, d}, DType::kF64);
  auto loss = [&] {
    ops::EmbeddingForward(ids, table, out);
    return testing::Dot(out, r);
  };
  Tensor start = RandomTensor({v, d}, DType::kF64, 3);
  Tensor dtable = start.Clone();
  ops::EmbeddingBackward(ids, r, dtable);
  Tensor added = Tensor::Empty({v, d}, DType::kF64);
  for (int64_t i = 0; i < added.numel(); ++i) added.data<double>()[i] = dtable.Get(i) - start.Get(i);
  testing::ExpectGradientsMatch(loss, {{"table", table, added}});
  // Rows no id names (2, 4, 5) are untouched.
  for (int64_t row : {2, 4, 5}) {
    for (int64_t j = 0; j < d; ++j) EXPECT_EQ(dtable.Get(row * d + j), start.Get(row * d + j));
  }
}

// Large enough for the threaded path: every token lands in one of 16 rows.
TEST(Embedding, ThreadedBackwardSumsRepeatedIds) {
  const int64_t n = 2048, v = 16, d = 32;
  std::vector<int32_t> id(n);
  for (int64_t i = 0; i < n; ++i) id[i] = static_cast<int32_t>((i * 7) % v);
  Tensor ids = Tensor::FromVector(id, {n});
  Tensor dout = RandomTensor({n, d}, DType::kF64, 1);
  Tensor dtable = Tensor::Zeros({v, d}, DType::kF64), expected = Tensor::Zeros({v, d}, DType::kF64);
  ops::EmbeddingBackward(ids, dout, dtable);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) expected.data<double>()[id[i] * d + j] += dout.Get(i * d + j);
  }
  EXPECT_TRUE(testing::AllClose(dtable, expected, 1e-12, 1e-12));
}

TEST(EmbeddingDeathTest, OutOfRangeIdIsRejected) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Tensor table = RandomTensor({4, 2}, DType::kF32, 1);
  Tensor out = Tensor::Empty({2, 2}, DType::kF32);
  Tensor too_big = Tensor::FromVector<int32_t>({1, 4}, {2});
  Tensor negative = Tensor::FromVector<int32_t>({-1, 0}, {2});
  EXPECT_DEATH(ops::EmbeddingForward(too_big, table, out), "\\[embedding\\] id 4 at position 1");
  EXPECT_DEATH(ops::EmbeddingBackward(negative, out, table), "\\[embedding\\] id -1 at position 0");
}

}  // namespace
}  // namespace loom
