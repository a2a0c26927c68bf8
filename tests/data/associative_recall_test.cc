#include "data/associative_recall.h"

#include <gtest/gtest.h>

#include <map>

#include "runtime/config.h"

namespace loom {
namespace {

config::Config RecallConfig() {
  return *LoadConfig("", {"data.recall.pairs=6", "data.recall.queries=4", "data.recall.key_vocab=20",
                          "data.recall.value_vocab=30", "train.seq_len=40", "model.vocab=64"});
}

TEST(AssociativeRecall, SamplesAreAPureFunctionOfSeedAndIndex) {
  AssociativeRecall data(RecallConfig());
  Batch whole = data.MakeBatch(AssociativeRecall::Split::kTrain, 10, 4);
  Batch one = data.MakeBatch(AssociativeRecall::Split::kTrain, 12, 1);
  for (int i = 0; i < 40; ++i) EXPECT_EQ(one.tokens.data<int32_t>()[i], whole.tokens.data<int32_t>()[80 + i]);
  Batch eval = data.MakeBatch(AssociativeRecall::Split::kEval, 12, 1);
  int same = 0;
  for (int i = 0; i < 40; ++i) same += eval.tokens.data<int32_t>()[i] == one.tokens.data<int32_t>()[i];
  EXPECT_LT(same, 40) << "held-out samples must differ from training samples";
}

TEST(AssociativeRecall, EveryQueryAsksAKeyOfTheContextForItsValue) {
  AssociativeRecall data(RecallConfig());
  Batch b = data.MakeBatch(AssociativeRecall::Split::kTrain, 0, 8);
  EXPECT_DOUBLE_EQ(data.chance(), 1.0 / 30);
  for (int r = 0; r < 8; ++r) {
    const int32_t* tok = b.tokens.data<int32_t>() + r * 40;
    const int32_t* tgt = b.targets.data<int32_t>() + r * 40;
    std::map<int32_t, int32_t> pairs;
    for (int i = 0; i < 6; ++i) {
      EXPECT_GE(tok[2 * i], 1);
      EXPECT_LE(tok[2 * i], 20);
      EXPECT_GE(tok[2 * i + 1], 21);
      EXPECT_LE(tok[2 * i + 1], 50);
      EXPECT_TRUE(pairs.emplace(tok[2 * i], tok[2 * i + 1]).second) << "keys are distinct";
    }
    int answers = 0;
    for (int i = 0; i < 40; ++i) {
      if (tgt[i] == -100) continue;
      ++answers;
      ASSERT_TRUE(pairs.count(tok[i])) << "query key " << tok[i] << " not in the context";
      EXPECT_EQ(tgt[i], pairs[tok[i]]);
      EXPECT_GE(i, 12) << "queries come after the context";
    }
    EXPECT_EQ(answers, 4);
  }
}

TEST(AssociativeRecall, CountCorrectSkipsIgnoredTargets) {
  Tensor pred = Tensor::FromVector<int32_t>({1, 2, 3, 4}, {4});
  Tensor tgt = Tensor::FromVector<int32_t>({1, -100, 9, 4}, {4});
  const Accuracy a = CountCorrect(pred, tgt);
  EXPECT_EQ(a.total, 3);
  EXPECT_EQ(a.correct, 2);
}

}  // namespace
}  // namespace loom
