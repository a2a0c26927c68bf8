// Incremental decoding (model/decode.h) against the full-sequence forward:
// the logits of every position must agree, whether the sequence is fed one
// token at a time or as a prompt chunk followed by single tokens; and the
// sampler's nucleus and frequencies.
#include "model/decode.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "ops/linear.h"
#include "ops/rmsnorm.h"
#include "runtime/config.h"
#include "tests/testing.h"

namespace loom {
namespace {

config::Config DecodeConfig(std::vector<std::string> extra) {
  return testing::ConfigFromSets({"model.pattern=SL",   "model.layers=3",         "model.hidden=16",
                                   "model.heads=4",      "model.kv_heads=2",       "model.vocab=40",
                                   "model.ffn_hidden=24", "model.lightning_block=4", "train.seq_len=16",
                                   "train.dtype=f64",    "model.init_std=0.3",
                                   "data.recall.key_vocab=8", "data.recall.value_vocab=8",
                                   "data.recall.pairs=3", "data.recall.queries=3"},
                        extra);
}

std::vector<int32_t> RandomTokens(int64_t n, int vocab, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int32_t> t(n);
  for (auto& id : t) id = static_cast<int32_t>(gen() % vocab);
  return t;
}

// The full-sequence forward's logits [T, vocab]: Model::ChunkForward, then
// the final norm and the output matrix.
Tensor ForwardLogits(Model& model, const std::vector<int32_t>& tokens) {
  const ModelDims& d = model.dims();
  const int64_t t = static_cast<int64_t>(tokens.size());
  Batch b = Batch::Allocate(1, t, /*with_docs=*/false);
  for (int64_t i = 0; i < t; ++i) {
    b.tokens.data<int32_t>()[i] = tokens[i];
    b.targets.data<int32_t>()[i] = -100;
    b.positions.data<int32_t>()[i] = static_cast<int32_t>(i);
  }
  const Tensor out = model.ChunkForward(0, b, Tensor());
  const Tensor *norm = nullptr, *w_out = nullptr;
  for (const Param* p : model.params()) {
    if (p->name == "final_norm") norm = &p->value;
    if (p->name == (d.tie_embeddings ? "embed" : "lm_head")) w_out = &p->value;
  }
  Tensor h = d.Act({t, d.hidden}), rstd = d.Stat({t}), padded = d.Act({t, d.padded_vocab});
  ops::RmsNormForward(out, *norm, d.norm_eps, h, rstd);
  ops::LinearForward(h, *w_out, padded);
  model.ReleaseChunk(0);
  Tensor logits = Tensor::Empty({t, d.vocab}, d.act_dtype());
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < d.vocab; ++j) {
      const double x = padded.Get(i * d.padded_vocab + j);
      if (d.act_dtype() == DType::kF64) logits.data<double>()[i * d.vocab + j] = x;
      else logits.data<float>()[i * d.vocab + j] = static_cast<float>(x);
    }
  return logits;
}

// Feeds `tokens` as a first chunk of `prompt` tokens, then one at a time,
// and checks each position's logits against the full forward within tol.
void ExpectDecodeMatchesForward(const config::Config& c, int64_t prompt, double tol) {
  Model model(ModelDims::FromConfig(c));
  const ModelDims& d = model.dims();
  const std::vector<int32_t> tokens = RandomTokens(14, d.vocab, 7);
  const Tensor want = ForwardLogits(model, tokens);
  auto decoder = Decoder::Create(model);
  ASSERT_TRUE(decoder.ok()) << decoder.status();
  DecodeCache cache = decoder->NewCache(static_cast<int64_t>(tokens.size()));
  int64_t fed = 0;
  while (fed < static_cast<int64_t>(tokens.size())) {
    const int64_t n = fed == 0 ? prompt : 1;
    auto got = decoder->Extend(cache, std::vector<int32_t>(tokens.begin() + fed, tokens.begin() + fed + n));
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->shape(), (Shape{n, d.vocab}));
    for (int64_t i = 0; i < n; ++i) {
      double worst = 0;
      int64_t at = 0;
      for (int64_t j = 0; j < d.vocab; ++j) {
        const double diff = std::abs(got->Get(i * d.vocab + j) - want.Get((fed + i) * d.vocab + j));
        if (!(diff <= worst)) worst = diff, at = j;
      }
      EXPECT_LE(worst, tol) << "position " << fed + i << " (fed " << n << " at once), logit " << at << ": decode "
                            << got->Get(i * d.vocab + at) << " vs forward " << want.Get((fed + i) * d.vocab + at)
                            << ", |diff| " << worst << " > tol " << tol;
    }
    fed += n;
  }
  EXPECT_EQ(cache.length, static_cast<int64_t>(tokens.size()));
}

TEST(Decode, TokenByTokenMatchesForward_HybridGqaUntied) {
  ExpectDecodeMatchesForward(DecodeConfig({}), 1, 1e-10);
}

TEST(Decode, PrefillThenStepsMatchesForward_HybridGqaUntied) {
  // 6 prompt tokens: the lightning block algorithm (block 4) across a block
  // boundary, then single-token steps from its final state.
  ExpectDecodeMatchesForward(DecodeConfig({}), 6, 1e-10);
}

TEST(Decode, TokenByTokenMatchesForward_TiedLightningFirst) {
  ExpectDecodeMatchesForward(DecodeConfig({"model.tie_embeddings=true", "model.pattern=LLS", "model.layers=3"}), 1,
                             1e-10);
}

TEST(Decode, TokenByTokenMatchesForward_SigmoidNoGateNoNormNoSilu) {
  ExpectDecodeMatchesForward(DecodeConfig({"model.attention=sigmoid", "model.lightning_gate=false",
                                           "model.lightning_norm=false", "model.lightning_silu=false",
                                           "model.lightning_decay=false"}),
                             3, 1e-10);
}

TEST(Decode, PrefillThenStepsMatchesForward_F32TiedGqa) {
  ExpectDecodeMatchesForward(DecodeConfig({"train.dtype=f32", "model.tie_embeddings=true", "model.init_std=0.1"}),
                             5, 1e-5);
}

// MoH (H softmax, R lightning heads: gates from each new token) with MoE
// MLPs (dropless, a shared expert): the layers' own router and MoE objects.
TEST(Decode, TokenByTokenAndPrefillMatchForward_MohAndMoe) {
  const config::Config c = DecodeConfig({"model.pattern=HRH", "model.moh.shared_heads=1", "model.moh.top_k=2",
                                         "model.moe.experts=4", "model.moe.top_k=2", "model.moe.moe_ffn=8",
                                         "model.moe.shared_experts=1"});
  ExpectDecodeMatchesForward(c, 1, 1e-10);
  ExpectDecodeMatchesForward(c, 6, 1e-10);
}

// The lightning heads' own norm epsilon (norm_eps when unset) reaches the
// training forward and the decoder alike, and is used at all.
TEST(Decode, LightningNormEpsReachesForwardAndDecode) {
  const config::Config plain = DecodeConfig({}), own = DecodeConfig({"model.lightning_norm_eps=1e-2"});
  EXPECT_EQ(ModelDims::FromConfig(plain).lightning_norm_eps, ModelDims::FromConfig(plain).norm_eps);
  EXPECT_EQ(ModelDims::FromConfig(own).lightning_norm_eps, static_cast<double>(1e-2f));
  ExpectDecodeMatchesForward(own, 6, 1e-10);
  Model a(ModelDims::FromConfig(plain)), b(ModelDims::FromConfig(own));
  const std::vector<int32_t> tokens = RandomTokens(8, a.dims().vocab, 5);
  const Tensor la = ForwardLogits(a, tokens), lb = ForwardLogits(b, tokens);
  double largest = 0;
  for (int64_t i = 0; i < la.numel(); ++i) largest = std::max(largest, std::abs(la.Get(i) - lb.Get(i)));
  EXPECT_GT(largest, 1e-6) << "model.lightning_norm_eps changed no logit";
}

TEST(Decode, LightningCacheStaysTheSameSize) {
  config::Config c = DecodeConfig({"model.pattern=L"});
  Model model(ModelDims::FromConfig(c));
  auto decoder = Decoder::Create(model);
  ASSERT_TRUE(decoder.ok()) << decoder.status();
  DecodeCache cache = decoder->NewCache(0);  // no softmax layer: no capacity needed
  const int64_t state_bytes = 3 * 4 * 4 * 4 * 8;  // layers · H · D · D · sizeof(f64)
  EXPECT_EQ(cache.bytes(), state_bytes);
  for (int32_t id : RandomTokens(40, 40, 3)) ASSERT_TRUE(decoder->Extend(cache, {id}).ok());
  EXPECT_EQ(cache.length, 40);
  EXPECT_EQ(cache.bytes(), state_bytes) << "the lightning cache grew with the sequence";
}

TEST(Decode, RefusesTokensBeyondCapacityOrVocabulary) {
  Model model(ModelDims::FromConfig(DecodeConfig({})));
  auto decoder = Decoder::Create(model);
  ASSERT_TRUE(decoder.ok()) << decoder.status();
  DecodeCache cache = decoder->NewCache(2);
  EXPECT_EQ(decoder->Extend(cache, {1, 2, 3}).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(decoder->Extend(cache, {40}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.length, 0);
}

// ---- SampleToken. A uniform grid of u makes the draw frequencies the exact
// quantiles: each id's share is its probability within 1/N.
TEST(SampleToken, GreedyAtTemperatureZeroAndTinyNucleus) {
  const Tensor logits = Tensor::FromVector<double>({0.5, 2.0, -1.0, 2.0, 1.9}, {5});
  EXPECT_EQ(SampleToken(logits, 0, 1, 0.99), 1);  // lowest id of the tied maximum
  for (double u : {0.0, 0.3, 0.999}) EXPECT_EQ(SampleToken(logits, 1.0, 1e-6, u), 1) << "u " << u;
}

TEST(SampleToken, FrequenciesFollowTemperatureSoftmaxInsideTheNucleus) {
  const std::vector<double> l = {1.0, 0.0, 2.0, -1.0};
  const Tensor logits = Tensor::FromVector<double>(l, {4});
  const double temperature = 0.7;
  std::vector<double> p(4);
  double sum = 0;
  for (int i = 0; i < 4; ++i) sum += p[i] = std::exp(l[i] / temperature);
  for (double& x : p) x /= sum;  // p ≈ {0.188, 0.045, 0.757, 0.011}
  for (double top_p : {1.0, 0.9}) {
    // top_p 0.9: ids 2 and 0 (0.757 + 0.188 ≥ 0.9), renormalised.
    const std::vector<bool> kept = top_p == 1.0 ? std::vector<bool>{1, 1, 1, 1} : std::vector<bool>{1, 0, 1, 0};
    double mass = 0;
    for (int i = 0; i < 4; ++i) mass += kept[i] ? p[i] : 0;
    const int n = 100000;
    std::vector<int> count(4);
    for (int i = 0; i < n; ++i) ++count[SampleToken(logits, temperature, top_p, (i + 0.5) / n)];
    for (int i = 0; i < 4; ++i) {
      const double want = kept[i] ? p[i] / mass : 0.0;
      EXPECT_NEAR(count[i] / double(n), want, 2.0 / n) << "id " << i << " at top_p " << top_p;
    }
  }
}

}  // namespace
}  // namespace loom
