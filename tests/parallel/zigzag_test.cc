// Zig-zag chunking (parallel/zigzag.h): which global tokens each rank holds,
// the round trip through ZigzagUnshard, batches with documents, and the
// error for a sequence length that does not split into 2·cp chunks.
#include "parallel/zigzag.h"

#include <gtest/gtest.h>

#include <string>

#include "tests/testing.h"

namespace loom {
namespace {

// Global batch: token value = 1000·row + position, doc starts at 5 and 11
// (positions reset there), targets = token + 1.
Batch MakeGlobal(int64_t rows, int64_t n) {
  Batch b = Batch::Allocate(rows, n, /*with_docs=*/true);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t doc = 0, pos = 0;
    for (int64_t t = 0; t < n; ++t) {
      if (t == 5 || t == 11) doc++, pos = 0;
      const int64_t i = r * n + t;
      b.tokens.data<int32_t>()[i] = static_cast<int32_t>(1000 * r + t);
      b.targets.data<int32_t>()[i] = static_cast<int32_t>(1000 * r + t + 1);
      b.positions.data<int32_t>()[i] = pos++;
      b.token_rows.doc_ids.data<int32_t>()[i] = doc;
    }
  }
  return b;
}

TEST(Zigzag, RankHoldsChunksIAndMirror) {
  const int64_t rows = 2, n = 16;
  const Batch g = MakeGlobal(rows, n);
  for (int cp : {1, 2, 4, 8}) {
    const int64_t c = n / (2 * cp);
    for (int rank = 0; rank < cp; ++rank) {
      auto shard = ZigzagShardBatch(g, cp, rank);
      ASSERT_TRUE(shard.ok()) << shard.status();
      const Batch& b = shard->batch;
      EXPECT_EQ(b.rows, rows);
      EXPECT_EQ(b.seq_len, 2 * c);
      ASSERT_EQ(b.tokens.numel(), rows * 2 * c);
      for (int64_t r = 0; r < rows; ++r)
        for (int s = 0; s < 2; ++s)
          for (int64_t j = 0; j < c; ++j) {
            const int64_t u = s == 0 ? rank : 2 * cp - 1 - rank;
            const int64_t li = (r * 2 + s) * c + j, gi = r * n + u * c + j;
            EXPECT_EQ(b.tokens.data<int32_t>()[li], 1000 * r + u * c + j);
            EXPECT_EQ(b.targets.data<int32_t>()[li], g.targets.data<int32_t>()[gi]);
            EXPECT_EQ(b.positions.data<int32_t>()[li], g.positions.data<int32_t>()[gi]) << "positions stay global";
            EXPECT_EQ(b.token_rows.doc_ids.data<int32_t>()[li], g.token_rows.doc_ids.data<int32_t>()[gi]);
          }
      EXPECT_EQ(b.token_rows.rows(), rows);
      EXPECT_EQ(b.token_rows.end(rows - 1), rows * 2 * c);
      // Chunk flags: a chunk starts a document at global 0, 5 or 11.
      const CpChunks& ch = shard->chunks;
      for (int64_t r = 0; r < rows; ++r)
        for (int s = 0; s < 2; ++s) {
          const int64_t first = ch.global_chunk(s) * c;
          EXPECT_EQ(ch.starts_doc(r, s), first == 0 || first == 5 || first == 11) << "cp " << cp << " chunk " << first;
        }
    }
  }
}

TEST(Zigzag, UnshardInvertsSlice) {
  const int64_t rows = 3, n = 24;
  Tensor global = testing::RandomTensor({rows * n, 2, 3}, DType::kF64, 1);
  for (int cp : {1, 2, 3, 4, 6}) {
    std::vector<Tensor> parts;
    for (int r = 0; r < cp; ++r) parts.push_back(ZigzagSlice(global, rows, n, cp, r));
    EXPECT_TRUE(testing::AllClose(ZigzagUnshard(parts, rows, n), global, 0, 0)) << "cp " << cp;
  }
}

TEST(Zigzag, RefusesSeqLenNotDivisibleBy2Cp) {
  const absl::Status s = CheckZigzag(100, 8);
  ASSERT_FALSE(s.ok());
  const std::string m(s.message());
  EXPECT_NE(m.find("train.seq_len = 100"), std::string::npos) << m;
  EXPECT_NE(m.find("2·cp = 16"), std::string::npos) << m;
  EXPECT_NE(m.find("multiple of 16 (e.g. 96 or 112)"), std::string::npos) << m;
  const Batch g = MakeGlobal(1, 12);
  auto shard = ZigzagShardBatch(g, 4, 0);
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(std::string(shard.status().message()).find("multiple of 8"), std::string::npos) << shard.status();
  EXPECT_TRUE(CheckZigzag(96, 8).ok());
}

TEST(Zigzag, RefusesVarlenRows) {
  Batch g = MakeGlobal(2, 8);
  g.token_rows.cu_seqlens = Tensor::FromVector<int32_t>({0, 5, 16}, {3});
  auto shard = ZigzagShardBatch(g, 2, 0);
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(std::string(shard.status().message()).find("rows of train.seq_len = 8"), std::string::npos)
      << shard.status();
}

}  // namespace
}  // namespace loom
