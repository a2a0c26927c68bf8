// MoE MLP layer and a tiny model with MoE layers, in f64: finite-difference
// gradients (experts, shared experts, gates, router losses, capacity drops),
// determinism, load statistics, capacity drops, and top-k = E against an
// explicit dense mixture.
#include "model/moe.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "data/associative_recall.h"
#include "model/model.h"
#include "ops/linear.h"
#include "ops/swiglu.h"
#include "runtime/config.h"
#include "tests/model/model_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

config::Config MoeConfig(std::vector<std::string> extra = {}) {
  return testing::ConfigFromSets({"model.pattern=LS", "model.layers=2", "model.hidden=8", "model.heads=2",
                                   "model.kv_heads=2", "model.vocab=40", "model.lightning_block=4",
                                   "train.seq_len=14", "train.dtype=f64", "data.recall.pairs=3",
                                   "data.recall.queries=3", "data.recall.key_vocab=8", "data.recall.value_vocab=8",
                                   "model.init_std=0.4", "model.moe.experts=4", "model.moe.top_k=2",
                                   "model.moe.moe_ffn=6", "model.moe.aux_loss_coef=0.5", "model.moe.z_loss_coef=0.1"},
                        extra);
}

ModelDims Dims(std::vector<std::string> extra = {}) { return ModelDims::FromConfig(MoeConfig(std::move(extra))); }

// loss = Σ w ⊙ MoE(x) + scale · router_loss; every parameter and x checked.
void CheckLayerGradients(const ModelDims& dims, int64_t tokens, bool expect_drops, bool warm_bias = false) {
  MoeLayer layer(dims, "layers.0.moe.");
  const int64_t c = dims.hidden;
  Tensor x = testing::RandomTensor({tokens, c}, DType::kF64, 11);
  Tensor w = testing::RandomTensor({tokens, c}, DType::kF64, 12);
  const double scale = 0.8;
  Tensor y = Tensor::Empty({tokens, c}, DType::kF64), dx = Tensor::Empty({tokens, c}, DType::kF64);
  if (warm_bias) {  // one step of loads, so that the selection bias is non-zero
    layer.Forward(x, y);
    layer.Backward(x, w, dx, scale);
    layer.UpdateBias();
    ParamList params;
    layer.CollectParams(params);
    for (Param* p : params) p->grad.Zero();
  }
  auto loss = [&] {
    Tensor out = Tensor::Empty({tokens, c}, DType::kF64);
    layer.Forward(x, out);
    return testing::Dot(w, out) + scale * layer.router_loss();
  };
  layer.Forward(x, y);
  layer.Backward(x, w, dx, scale);
  if (expect_drops) {
    EXPECT_GT(layer.stats().dropped, 0);
  } else {
    EXPECT_EQ(layer.stats().dropped, 0);
  }
  std::vector<testing::GradInput> inputs = {{"x", x, dx}};
  ParamList params;
  layer.CollectParams(params);
  for (Param* p : params) inputs.push_back({p->name, p->value, p->grad});
  testing::ExpectGradientsMatch(loss, inputs, 1e-7);
}

TEST(MoeLayer, GradientsMatchFiniteDifferences_SoftmaxSharedExpert) {
  CheckLayerGradients(Dims({"model.moe.shared_experts=1"}), 9, false);
}

TEST(MoeLayer, GradientsMatchFiniteDifferences_SigmoidNormalizedBiasBalanced) {
  const ModelDims dims = Dims({"model.moe.router=sigmoid", "model.moe.normalize_top_k=true",
                               "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.05",
                               "model.moe.shared_experts=2"});
  CheckLayerGradients(dims, 10, false, /*warm_bias=*/true);
}

TEST(MoeLayer, GradientsMatchFiniteDifferences_CapacityDrops) {
  CheckLayerGradients(Dims({"model.moe.capacity_factor=0.6", "model.moe.shared_experts=1"}), 12, true);
}

// Router weights of zero: every score ties, so every token picks experts
// 0..k-1: loads [T, T, 0, 0], CV = 1; with capacity factor 1 each of the two
// experts keeps the first T/2 tokens and drops the rest.
TEST(MoeLayer, LoadStatisticsAndCapacityDropsByTokenOrder) {
  const int64_t t = 8, c = 8;
  for (double factor : {0.0, 1.0}) {
    MoeLayer layer(Dims({absl::StrCat("model.moe.capacity_factor=", factor)}), "layers.0.moe.");
    ParamList params;
    layer.CollectParams(params);
    ASSERT_EQ(params[0]->name, "layers.0.moe.router");
    params[0]->value.Zero();
    Tensor x = testing::RandomTensor({t, c}, DType::kF64, 3), y = Tensor::Empty({t, c}, DType::kF64);
    layer.Forward(x, y);
    const RoutingStats& s = layer.stats();
    EXPECT_EQ(s.assignments, 2 * t);
    EXPECT_EQ(s.load_min, 0);
    EXPECT_EQ(s.load_max, t);
    EXPECT_NEAR(s.load_cv, 1.0, 1e-15);
    EXPECT_EQ(s.dropped, factor == 0 ? 0 : t);  // capacity ceil(1·16/4) = 4 of 8 per expert
    for (int64_t row = 0; row < t; ++row) {
      double norm = 0;
      for (int64_t i = 0; i < c; ++i) norm += std::abs(y.Get(row * c + i));
      if (factor == 0 || row < t / 2) {
        EXPECT_GT(norm, 1e-6) << "token " << row << " factor " << factor;
      } else {
        EXPECT_EQ(norm, 0) << "token " << row << " was dropped by both experts, factor " << factor;
      }
    }
  }
}

TEST(MoeLayer, AmpleCapacityEqualsDropless) {
  const int64_t t = 11;
  MoeLayer dropless(Dims({"model.moe.shared_experts=1"}), "layers.0.moe.");
  MoeLayer ample(Dims({"model.moe.shared_experts=1", "model.moe.capacity_factor=2"}), "layers.0.moe.");
  Tensor x = testing::RandomTensor({t, 8}, DType::kF64, 5);
  Tensor a = Tensor::Empty({t, 8}, DType::kF64), b = Tensor::Empty({t, 8}, DType::kF64);
  dropless.Forward(x, a);
  ample.Forward(x, b);
  EXPECT_EQ(ample.stats().dropped, 0);
  EXPECT_TRUE(testing::AllClose(b, a, 0, 0));
  // A tight capacity drops and changes the output.
  MoeLayer tight(Dims({"model.moe.shared_experts=1", "model.moe.capacity_factor=0.25"}), "layers.0.moe.");
  tight.Forward(x, b);
  EXPECT_GT(tight.stats().dropped, 0);
  EXPECT_FALSE(testing::AllClose(b, a, 1e-12, 1e-12));
}

TEST(MoeLayer, RunsAreBitIdentical) {
  const ModelDims dims = Dims({"model.moe.shared_experts=1", "model.moe.capacity_factor=0.8"});
  const int64_t t = 13;
  Tensor x = testing::RandomTensor({t, 8}, DType::kF64, 21), dy = testing::RandomTensor({t, 8}, DType::kF64, 22);
  std::vector<Tensor> outs;
  std::vector<ParamList> grads(2);
  std::vector<std::unique_ptr<MoeLayer>> layers;
  for (int run = 0; run < 2; ++run) {
    layers.push_back(std::make_unique<MoeLayer>(dims, "layers.0.moe."));
    Tensor y = Tensor::Empty({t, 8}, DType::kF64), dx = Tensor::Empty({t, 8}, DType::kF64);
    layers[run]->Forward(x, y);
    layers[run]->Backward(x, dy, dx, 1.0);
    outs.push_back(y);
    outs.push_back(dx);
    layers[run]->CollectParams(grads[run]);
  }
  EXPECT_TRUE(testing::AllClose(outs[2], outs[0], 0, 0)) << "y";
  EXPECT_TRUE(testing::AllClose(outs[3], outs[1], 0, 0)) << "dx";
  for (size_t i = 0; i < grads[0].size(); ++i)
    EXPECT_TRUE(testing::AllClose(grads[1][i]->grad, grads[0][i]->grad, 0, 0)) << grads[0][i]->name;
}

// k = E, softmax, no normalisation: y_t = Σ_e softmax(x_t W_rᵀ)_e · SwiGLU_e(x_t),
// computed here from the parameters with the plain ops.
TEST(MoeLayer, TopKOfAllExpertsEqualsDenseMixture) {
  const ModelDims dims = Dims({"model.moe.top_k=4"});
  MoeLayer layer(dims, "layers.0.moe.");
  const int64_t t = 7, c = 8, e = 4, f = dims.moe.ffn;
  ParamList params;
  layer.CollectParams(params);
  std::map<std::string, Tensor> p;
  for (Param* q : params) p[q->name] = q->value;
  Tensor x = testing::RandomTensor({t, c}, DType::kF64, 8), y = Tensor::Empty({t, c}, DType::kF64);
  layer.Forward(x, y);
  Tensor logits = Tensor::Empty({t, e}, DType::kF64);
  ops::LinearForward(x, p.at("layers.0.moe.router"), logits);
  Tensor expected = Tensor::Zeros({t, c}, DType::kF64);
  for (int64_t i = 0; i < e; ++i) {
    const std::string pre = absl::StrCat("layers.0.moe.experts.", i, ".");
    Tensor g = Tensor::Empty({t, f}, DType::kF64), u = Tensor::Empty({t, f}, DType::kF64),
           h = Tensor::Empty({t, f}, DType::kF64), o = Tensor::Empty({t, c}, DType::kF64);
    ops::LinearForward(x, p.at(pre + "w_gate"), g);
    ops::LinearForward(x, p.at(pre + "w_up"), u);
    ops::SwigluForward(g, u, h);
    ops::LinearForward(h, p.at(pre + "w_down"), o);
    for (int64_t r = 0; r < t; ++r) {
      double z = 0;
      for (int64_t j = 0; j < e; ++j) z += std::exp(logits.Get(r * e + j));
      const double prob = std::exp(logits.Get(r * e + i)) / z;
      for (int64_t col = 0; col < c; ++col) expected.data<double>()[r * c + col] += prob * o.Get(r * c + col);
    }
  }
  EXPECT_TRUE(testing::AllClose(y, expected, 1e-12, 1e-14));
}

TEST(MoeLayer, BiasBalancingMovesBiasAgainstTheLoad) {
  MoeLayer layer(Dims({"model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.25"}), "layers.0.moe.");
  ParamList params;
  layer.CollectParams(params);
  params[0]->value.Zero();  // every token on experts 0 and 1
  Tensor x = testing::RandomTensor({6, 8}, DType::kF64, 4), y = Tensor::Empty({6, 8}, DType::kF64);
  Tensor dx = Tensor::Empty({6, 8}, DType::kF64);
  layer.Forward(x, y);
  layer.Backward(x, y, dx, 1.0);
  layer.UpdateBias();
  EXPECT_EQ(layer.bias(), (std::vector<double>{-0.25, -0.25, 0.25, 0.25}));
  // The bias now steers the tied scores to experts 2 and 3.
  layer.Forward(x, y);
  EXPECT_EQ(layer.stats().load_min, 0);
  layer.Backward(x, y, dx, 1.0);
  layer.UpdateBias();
  EXPECT_EQ(layer.bias(), (std::vector<double>{0, 0, 0, 0}));
}

void CheckModelGradients(const config::Config& c) { model_testing::CheckModelGradients(c, 40); }

TEST(MoeModel, GradientsMatchFiniteDifferences_HybridWithSharedExpert) {
  CheckModelGradients(MoeConfig({"model.moe.shared_experts=1"}));
}

TEST(MoeModel, GradientsMatchFiniteDifferences_SigmoidCapacity) {
  CheckModelGradients(MoeConfig({"model.moe.router=sigmoid", "model.moe.normalize_top_k=true",
                                 "model.moe.capacity_factor=0.75", "model.recompute=all"}));
}

TEST(MoeModel, RouterLossEntersTheLoss) {
  const config::Config with = MoeConfig();
  const config::Config without = MoeConfig({"model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0"});
  Model a(ModelDims::FromConfig(with)), b(ModelDims::FromConfig(without));
  Batch batch = model_testing::DenseBatch(with, 2);
  const double n = 2.0 * (batch.seq_len - 1);
  const double la = a.Evaluate(batch, n, nullptr).loss, lb = b.Evaluate(batch, n, nullptr).loss;
  // Each of the 2 MoE layers adds 0.5·aux + 0.1·z with aux >= ~1 and z > 0.
  EXPECT_GT(la - lb, 2 * 0.5 * 0.9);
  const auto stats = a.RoutingStatistics();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[0].first, 0);
  EXPECT_EQ(stats[1].first, 1);
  EXPECT_EQ(stats[1].second.assignments, 2 * batch.tokens_count());
}

TEST(MoeModel, ConfigRefusesParallelismAndBadFields) {
  config::Config c = MoeConfig();
  ASSERT_TRUE(ApplyOverride(c, "parallel.tp=2").ok());
  auto s = ValidateConfig(c);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("parallel.tp"), std::string::npos) << s;
  for (const char* bad : {"model.moe.top_k=5", "model.moe.router=relu", "model.moe.capacity_factor=-1"}) {
    config::Config d = MoeConfig();
    ASSERT_TRUE(ApplyOverride(d, bad).ok()) << bad;
    auto status = ValidateConfig(d);
    EXPECT_FALSE(status.ok()) << bad;
    const std::string field(std::string(bad).substr(0, std::string(bad).find('=')));
    EXPECT_NE(status.message().find(field), std::string::npos) << status;
  }
}

}  // namespace
}  // namespace loom
