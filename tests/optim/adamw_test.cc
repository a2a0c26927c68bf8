#include "optim/adamw.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "optim/lr_schedule.h"
#include "runtime/config.h"

namespace loom {
namespace {

TEST(AdamW, TwoStepsMatchTheUpdateRule) {
  Param w, norm;
  w.Init("w", {2}, DType::kF64, 0, 0, 1.0, /*decay=*/true);
  norm.Init("norm", {1}, DType::kF64, 0, 0, 1.0, /*decay=*/false);
  AdamWOptions o{0.9, 0.95, 1e-8, 0.1};
  AdamW adam({&w, &norm}, o);
  const double g1[2] = {0.5, -2.0}, g2[2] = {0.1, 0.3}, lr = 0.01;
  // Reference in plain arithmetic.
  double p[2] = {1, 1}, m[2] = {0, 0}, v[2] = {0, 0};
  for (int t = 1; t <= 2; ++t) {
    const double* g = t == 1 ? g1 : g2;
    for (int i = 0; i < 2; ++i) {
      w.grad.data<double>()[i] = g[i];
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.95 * v[i] + 0.05 * g[i] * g[i];
      const double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.95, t));
      p[i] -= lr * (mh / (std::sqrt(vh) + 1e-8) + 0.1 * p[i]);
    }
    norm.grad.data<double>()[0] = 1.0;
    adam.Step(lr);
  }
  EXPECT_NEAR(w.value.data<double>()[0], p[0], 1e-15);
  EXPECT_NEAR(w.value.data<double>()[1], p[1], 1e-15);
  // No weight decay on the norm: two steps of exactly lr (g constant).
  EXPECT_NEAR(norm.value.data<double>()[0], 1.0 - 2 * lr, 1e-9);
}

TEST(AdamW, ClipGradNormScalesToTheLimit) {
  Param a;
  a.Init("a", {2}, DType::kF32, 0, 0, 0.0);
  a.grad.data<float>()[0] = 3;
  a.grad.data<float>()[1] = 4;
  EXPECT_DOUBLE_EQ(ClipGradNorm({&a}, 1.0), 5.0);
  EXPECT_NEAR(GlobalGradNorm({&a}), 1.0, 1e-6);
  EXPECT_NEAR(ClipGradNorm({&a}, 0.0), 1.0, 1e-6);  // 0 disables clipping
}

// The clip factor folded into the step (DataParallel::ClipGradients) gives
// the bits of scaling the gradients first and stepping after.
TEST(AdamW, GradScaleInTheStepEqualsScalingFirst) {
  Param a, b;
  a.Init("w", {1000}, DType::kF32, 7, 0.02);
  b.Init("w", {1000}, DType::kF32, 7, 0.02);
  Tensor g = Tensor::Empty({1000}, DType::kF32);
  FillNormal(g, RngKey(3, "g"), 1.0);
  const AdamWOptions o{0.9, 0.95, 1e-8, 0.1};
  AdamW folded({&a}, o), scaled({&b}, o);
  const double f = 1.0 / 3.7;  // rounds differently from 1
  for (int step = 0; step < 3; ++step) {
    a.grad.CopyFrom(g);
    b.grad.CopyFrom(g);
    folded.Step(1e-3, f);
    ScaleInPlace(b.grad, f);
    scaled.Step(1e-3);
  }
  EXPECT_EQ(std::memcmp(a.value.raw(), b.value.raw(), a.value.nbytes()), 0);
  EXPECT_EQ(std::memcmp(folded.first_moments()[0].raw(), scaled.first_moments()[0].raw(), a.value.nbytes()), 0);
  EXPECT_EQ(std::memcmp(folded.second_moments()[0].raw(), scaled.second_moments()[0].raw(), a.value.nbytes()), 0);
  // The gradient itself is left as it was.
  EXPECT_EQ(std::memcmp(a.grad.raw(), g.raw(), g.nbytes()), 0);
}

TEST(LrSchedule, WarmupCosineLinearWsdAndConstant) {
  config::OptimConfig o = LoadConfig("", {"optim.lr=1", "optim.min_lr_ratio=0.1", "optim.warmup_steps=10"})->optim();
  EXPECT_DOUBLE_EQ(LearningRate(o, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(LearningRate(o, 9, 110), 1.0);
  EXPECT_NEAR(LearningRate(o, 10, 110), 1.0, 1e-12);    // cosine starts at the peak
  EXPECT_NEAR(LearningRate(o, 109, 110), 0.1, 1e-7);   // and ends at min  // min_lr_ratio is a float field
  EXPECT_NEAR(LearningRate(o, 59, 110), 0.55, 0.01);    // halfway
  o.set_schedule("linear");
  EXPECT_NEAR(LearningRate(o, 109, 110), 0.1, 1e-7);  // min_lr_ratio is a float field
  o.set_schedule("wsd");
  o.set_decay_fraction(0.2);
  EXPECT_DOUBLE_EQ(LearningRate(o, 80, 110), 1.0);      // stable phase
  EXPECT_NEAR(LearningRate(o, 109, 110), 0.1, 1e-7);   // decayed to min at the end  // min_lr_ratio is a float field
  o.set_schedule("constant");
  EXPECT_DOUBLE_EQ(LearningRate(o, 100, 110), 1.0);
}

}  // namespace
}  // namespace loom
