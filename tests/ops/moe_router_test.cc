// MoE router: gradients through the gate weights and both router losses in
// f64, tie-breaking, the loss values on hand-made cases, bias balancing.
#include "ops/moe_router.h"

#include <gtest/gtest.h>

#include <cmath>

#include "ops/linear.h"
#include "tests/testing.h"

namespace loom::ops {
namespace {

struct Case {
  bool sigmoid;
  bool normalize;
  bool bias;
};

// loss = Σ w ⊙ gates + a·aux + b·z with logits = x W_rᵀ; checks dW_r and dx.
void CheckRouterGradients(const Case& c) {
  const int64_t n = 7, dim = 5, e = 6;
  MoeRouterOptions o{.experts = e, .top_k = 2, .sigmoid = c.sigmoid, .normalize_top_k = c.normalize};
  Tensor x = testing::RandomTensor({n, dim}, DType::kF64, 1);
  Tensor w = testing::RandomTensor({e, dim}, DType::kF64, 2);
  Tensor gw = testing::RandomTensor({n, o.top_k}, DType::kF64, 3);
  std::vector<double> bias;
  if (c.bias) bias = {0.3, -0.2, 0.1, 0.0, -0.4, 0.25};
  const double a = 0.7, b = 0.3;
  auto loss = [&] {
    Tensor logits = Tensor::Empty({n, e}, DType::kF64);
    LinearForward(x, w, logits);
    MoeRouting r;
    MoeRouterForward(logits, bias, o, r);
    return testing::Dot(gw, r.gates) + a * r.aux_loss + b * r.z_loss;
  };
  Tensor logits = Tensor::Empty({n, e}, DType::kF64);
  LinearForward(x, w, logits);
  MoeRouting r;
  MoeRouterForward(logits, bias, o, r);
  Tensor dlogits = Tensor::Empty({n, e}, DType::kF64);
  MoeRouterBackward(logits, r, gw, a, b, o, dlogits);
  Tensor dx = Tensor::Empty({n, dim}, DType::kF64), dw = Tensor::Zeros({e, dim}, DType::kF64);
  LinearBackward(x, w, dlogits, &dx, dw);
  testing::ExpectGradientsMatch(loss, {{"x", x, dx}, {"w_router", w, dw}}, 1e-8);
}

TEST(MoeRouter, GradientsMatchFiniteDifferences_Softmax) { CheckRouterGradients({false, false, false}); }
TEST(MoeRouter, GradientsMatchFiniteDifferences_SoftmaxNormalized) { CheckRouterGradients({false, true, false}); }
TEST(MoeRouter, GradientsMatchFiniteDifferences_Sigmoid) { CheckRouterGradients({true, false, false}); }
TEST(MoeRouter, GradientsMatchFiniteDifferences_SigmoidNormalizedBias) { CheckRouterGradients({true, true, true}); }

TEST(MoeRouter, TiesGoToTheLowerExpertIndex) {
  Tensor logits = Tensor::Zeros({3, 4}, DType::kF64);
  MoeRouting r;
  MoeRouterForward(logits, {}, {.experts = 4, .top_k = 2}, r);
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(r.experts.data<int32_t>()[2 * t], 0);
    EXPECT_EQ(r.experts.data<int32_t>()[2 * t + 1], 1);
  }
  // A bias breaks the tie for selection only: the gate is still the score.
  MoeRouterForward(logits, {0, 0, 0, 1e-3}, {.experts = 4, .top_k = 2}, r);
  EXPECT_EQ(r.experts.data<int32_t>()[0], 3);
  EXPECT_EQ(r.experts.data<int32_t>()[1], 0);
  EXPECT_DOUBLE_EQ(r.gates.Get(0), 0.25);
}

TEST(MoeRouter, AuxLossIsOneWhenBalancedAndEWhenCollapsed) {
  const int e = 4;
  Tensor uniform = Tensor::Zeros({4, e}, DType::kF64);
  MoeRouting r;
  // Balanced: each token a different expert → f = P = 1/E → aux = 1.
  Tensor balanced = Tensor::Zeros({4, e}, DType::kF64);
  for (int t = 0; t < 4; ++t) balanced.data<double>()[t * e + t] = 30.0;
  MoeRouterForward(balanced, {}, {.experts = e, .top_k = 1}, r);
  EXPECT_NEAR(r.aux_loss, 1.0, 1e-10);
  for (int i = 0; i < e; ++i) EXPECT_EQ(r.load[i], 1);
  // Collapsed: every token on expert 2 with probability ≈ 1 → aux ≈ E.
  Tensor collapsed = Tensor::Zeros({4, e}, DType::kF64);
  for (int t = 0; t < 4; ++t) collapsed.data<double>()[t * e + 2] = 30.0;
  MoeRouterForward(collapsed, {}, {.experts = e, .top_k = 1}, r);
  EXPECT_NEAR(r.aux_loss, double(e), 1e-10);
  EXPECT_EQ(r.load[2], 4);
  // z-loss: logits all zero → lse = log E for every token.
  MoeRouterForward(uniform, {}, {.experts = e, .top_k = 1}, r);
  EXPECT_NEAR(r.z_loss, std::log(double(e)) * std::log(double(e)), 1e-12);
}

TEST(MoeRouter, NormalizedGatesSumToOne) {
  Tensor logits = testing::RandomTensor({9, 8}, DType::kF64, 7, -2, 2);
  for (bool sigmoid : {false, true}) {
    MoeRouting r;
    MoeRouterForward(logits, {}, {.experts = 8, .top_k = 3, .sigmoid = sigmoid, .normalize_top_k = true}, r);
    for (int t = 0; t < 9; ++t) {
      const double sum = r.gates.Get(3 * t) + r.gates.Get(3 * t + 1) + r.gates.Get(3 * t + 2);
      EXPECT_NEAR(sum, 1.0, 1e-12) << "token " << t << " sigmoid " << sigmoid;
      // Best first.
      EXPECT_GE(r.gates.Get(3 * t), r.gates.Get(3 * t + 1));
      EXPECT_GE(r.gates.Get(3 * t + 1), r.gates.Get(3 * t + 2));
    }
  }
}

TEST(MoeRouter, BiasUpdateMovesTowardsTheMeanLoad) {
  std::vector<double> bias = {0, 0, 0, 0};
  MoeBiasUpdate({10, 2, 4, 4}, 0.01, bias);  // mean 5
  EXPECT_DOUBLE_EQ(bias[0], -0.01);
  EXPECT_DOUBLE_EQ(bias[1], 0.01);
  EXPECT_DOUBLE_EQ(bias[2], 0.01);
  EXPECT_DOUBLE_EQ(bias[3], 0.01);
  MoeBiasUpdate({5, 5, 5, 5}, 0.01, bias);  // balanced: unchanged
  EXPECT_DOUBLE_EQ(bias[0], -0.01);
  EXPECT_DOUBLE_EQ(bias[1], 0.01);
}

}  // namespace
}  // namespace loom::ops
