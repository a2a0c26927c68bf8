#include "data/needle.h"

#include <gtest/gtest.h>

#include "runtime/config.h"

namespace loom {
namespace {

config::Config NeedleConfig(const std::string& needles = "3", const std::string& seq_len = "64") {
  auto c = LoadConfig("", {"data.task=needle", "data.needle.needles=" + needles, "data.needle.key_vocab=10",
                           "data.needle.value_vocab=12", "data.needle.filler_vocab=20", "train.seq_len=" + seq_len,
                           "model.vocab=64"});
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

TEST(Needle, SamplesAreAPureFunctionOfSeedSplitAndIndex) {
  Needle data(NeedleConfig());
  Batch whole = data.MakeBatch(Needle::Split::kTrain, 10, 4);
  Batch one = data.MakeBatch(Needle::Split::kTrain, 12, 1);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(one.tokens.data<int32_t>()[i], whole.tokens.data<int32_t>()[128 + i]) << "token " << i;
    EXPECT_EQ(one.targets.data<int32_t>()[i], whole.targets.data<int32_t>()[128 + i]) << "target " << i;
  }
  Batch eval = data.MakeBatch(Needle::Split::kEval, 12, 1);
  int same = 0;
  for (int i = 0; i < 64; ++i) same += eval.tokens.data<int32_t>()[i] == one.tokens.data<int32_t>()[i];
  EXPECT_LT(same, 64) << "held-out samples must differ from training samples";
}

// The question at the end asks a key that appears in exactly one needle
// (marker, key, value), and the only counted target is that value.
TEST(Needle, TheQuestionAsksTheValueOfOneNeedle) {
  Needle data(NeedleConfig());
  EXPECT_DOUBLE_EQ(data.chance(), 1.0 / 12);
  const int n = 64;
  Batch b = data.MakeBatch(Needle::Split::kTrain, 0, 16);
  for (int r = 0; r < 16; ++r) {
    const int32_t* tok = b.tokens.data<int32_t>() + r * n;
    const int32_t* tgt = b.targets.data<int32_t>() + r * n;
    const int32_t* pos = b.positions.data<int32_t>() + r * n;
    EXPECT_EQ(tok[n - 2], Needle::kQuery);
    const int32_t asked = tok[n - 1];
    EXPECT_GE(asked, 2);
    EXPECT_LT(asked, 12) << "the asked token is a key";
    int markers = 0, answers = 0, found = -1;
    for (int i = 0; i < n - 2; ++i) {
      EXPECT_EQ(pos[i], i);
      EXPECT_NE(tok[i], Needle::kQuery) << "no question inside the haystack";
      if (tok[i] != Needle::kMarker) {
        if (i == 0 || tok[i - 1] != Needle::kMarker) {  // not a needle's key
          if (i < 2 || tok[i - 2] != Needle::kMarker) {
            EXPECT_GE(tok[i], 2 + 10 + 12) << "row " << r << " position " << i << ": filler expected";
            EXPECT_LT(tok[i], 2 + 10 + 12 + 20);
          }
        }
        continue;
      }
      ++markers;
      ASSERT_LE(i + 2, n - 3) << "a needle runs into the question";
      EXPECT_GE(tok[i + 2], 12) << "a needle's value is a value token";
      EXPECT_LT(tok[i + 2], 24);
      if (tok[i + 1] == asked) {
        EXPECT_EQ(found, -1) << "the asked key is in two needles";
        found = i;
      }
    }
    EXPECT_EQ(markers, 3) << "row " << r;
    for (int i = 0; i < n; ++i) answers += tgt[i] != -100;
    EXPECT_EQ(answers, 1);
    ASSERT_GE(found, 0) << "row " << r << ": the asked key is in no needle";
    EXPECT_EQ(tgt[n - 1], tok[found + 2]) << "row " << r;
  }
}

// With data.needle.depth fixed, the asked needle starts at depth·(L − 5):
// depth 0 is the first token, depth 1 right before the question.
TEST(Needle, AFixedDepthPlacesTheAskedNeedle) {
  for (const double depth : {0.0, 0.25, 0.5, 1.0}) {
    config::NeedleConfig task = NeedleConfig("1", "101").data().needle();
    task.set_depth(depth);
    const Needle data(task, 101, 7);
    const int64_t at = Needle::NeedleStart(101, depth);
    EXPECT_EQ(at, static_cast<int64_t>(depth * 96 + 0.5));
    Batch b = data.MakeBatch(Needle::Split::kEval, 0, 4);
    for (int r = 0; r < 4; ++r) {
      const int32_t* tok = b.tokens.data<int32_t>() + r * 101;
      EXPECT_EQ(tok[at], Needle::kMarker) << "depth " << depth << " row " << r;
      EXPECT_EQ(tok[at + 1], tok[100]) << "depth " << depth << ": the asked key";
      EXPECT_EQ(b.targets.data<int32_t>()[r * 101 + 100], tok[at + 2]);
    }
  }
}

TEST(Needle, ConfigRejectsATooShortSequenceAndASmallVocab) {
  auto short_seq = LoadConfig("", {"data.task=needle", "data.needle.needles=4", "train.seq_len=20"});
  ASSERT_FALSE(short_seq.ok());
  EXPECT_NE(short_seq.status().message().find("train.seq_len"), std::string::npos) << short_seq.status();
  auto vocab = LoadConfig("", {"data.task=needle", "model.vocab=40"});
  ASSERT_FALSE(vocab.ok());
  EXPECT_NE(vocab.status().message().find("model.vocab"), std::string::npos) << vocab.status();
  auto depth = LoadConfig("", {"data.task=needle", "data.needle.depth=1.5"});
  ASSERT_FALSE(depth.ok());
  EXPECT_NE(depth.status().message().find("data.needle.depth"), std::string::npos) << depth.status();
}

}  // namespace
}  // namespace loom
