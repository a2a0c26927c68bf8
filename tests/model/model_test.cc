// Whole-model checks on a tiny hybrid model in f64.
#include "model/model.h"

#include <gtest/gtest.h>

#include "data/associative_recall.h"
#include "runtime/config.h"
#include "tests/model/model_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

config::Config TinyConfig() {
  auto c = LoadConfig("", {"model.pattern=LS", "model.layers=3", "model.hidden=16", "model.heads=4",
                           "model.kv_heads=2", "model.vocab=40", "model.lightning_block=4", "train.seq_len=14",
                           "train.dtype=f64", "data.recall.pairs=3", "data.recall.queries=3",
                           "data.recall.key_vocab=8", "data.recall.value_vocab=8", "model.init_std=0.3"});
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

void CheckModelGradients(const config::Config& c) { model_testing::CheckModelGradients(c, 60); }

TEST(Model, GradientsMatchFiniteDifferences_Hybrid) { CheckModelGradients(TinyConfig()); }

TEST(Model, GradientsMatchFiniteDifferences_TiedSigmoidNoDecay) {
  config::Config c = TinyConfig();
  for (const char* s : {"model.tie_embeddings=true", "model.attention=sigmoid", "model.lightning_decay=false",
                        "model.pattern=SL"})
    ASSERT_TRUE(ApplyOverride(c, s).ok());
  CheckModelGradients(c);
}

TEST(Model, RecomputationGivesIdenticalGradients) {
  config::Config plain = TinyConfig();
  config::Config recompute = TinyConfig();
  ASSERT_TRUE(ApplyOverride(recompute, "model.recompute=all").ok());
  Model a(ModelDims::FromConfig(plain)), b(ModelDims::FromConfig(recompute));
  Batch batch = model_testing::DenseBatch(plain, 2);
  a.ZeroGrad();
  b.ZeroGrad();
  const double la = a.ForwardBackward(batch, 10).loss, lb = b.ForwardBackward(batch, 10).loss;
  EXPECT_EQ(la, lb);
  for (size_t i = 0; i < a.params().size(); ++i)
    EXPECT_TRUE(testing::AllClose(b.params()[i]->grad, a.params()[i]->grad, 0, 0)) << a.params()[i]->name;
}

TEST(Model, InitialLossIsNearUniform) {
  config::Config c = TinyConfig();
  ASSERT_TRUE(ApplyOverride(c, "model.init_std=0.02").ok());
  Model model(ModelDims::FromConfig(c));
  Batch batch = model_testing::DenseBatch(c, 2);
  const double loss = model.Evaluate(batch, 2.0 * (batch.seq_len - 1), nullptr).loss;
  EXPECT_NEAR(loss, std::log(40.0), 0.05);  // padded logits are masked: log(true vocab)
}

}  // namespace
}  // namespace loom
