// RoPE scaling tables (ops/rope.h RopeTable) against transformers'
// ROPE_INIT_FUNCTIONS (tests/fixtures/hf/rope.json, bench/hf_fixtures.py),
// and the scaled op's algebra.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "checkpoint/hf.h"
#include "nlohmann/json.hpp"
#include "ops/rope.h"
#include "runtime/config.h"
#include "tests/testing.h"

namespace loom {
namespace {

nlohmann::json ReadRopeFixture() {
  std::ifstream in(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/hf/rope.json");
  std::stringstream s;
  s << in.rdbuf();
  return nlohmann::json::parse(s.str());
}

Tensor Positions(int64_t count, int32_t stride) {
  std::vector<int32_t> p(count);
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<int32_t>(i * stride);
  return Tensor::FromVector(p, {count});
}

// transformers rounds inv_freq to f32 (rel. error <= 2^-24 a rounding, a
// few roundings deep); Loom computes in double. 1e-6 relative covers that
// and nothing more.
constexpr double kRelTol = 1e-6;

TEST(RopeScaling, EveryTypeMatchesTransformersFixture) {
  const nlohmann::json fixture = ReadRopeFixture();
  ASSERT_EQ(fixture["cases"].size(), 6u) << "tests/fixtures/hf/rope.json";
  for (const nlohmann::json& c : fixture["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    config::ModelConfig model;
    ASSERT_TRUE(checkpoint::RopeFromHfConfig(c["config"].dump(), &model).ok());
    // Loom's "dynamic" is transformers' formula at a fixed length.
    if (!c["seq_len"].is_null()) model.mutable_rope_scaling()->set_dynamic_seq_len(c["seq_len"].get<int>());
    absl::StatusOr<ops::RopeTable> table =
        ops::RopeTable::FromConfig(model.rope_theta(), model.rope_scaling(), c["head_dim"].get<int>());
    ASSERT_TRUE(table.ok()) << table.status();
    const std::vector<double> want = c["inv_freq"].get<std::vector<double>>();
    ASSERT_EQ(table->inv_freq.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(table->inv_freq[i], want[i], kRelTol * std::abs(want[i]))
          << name << " inv_freq[" << i << "]: Loom " << table->inv_freq[i] << ", transformers " << want[i]
          << ", tolerance " << kRelTol << " relative";
    }
    const double want_factor = c["attention_factor"].get<double>();
    EXPECT_NEAR(table->attention_factor, want_factor, kRelTol * want_factor)
        << name << " attention factor: Loom " << table->attention_factor << ", transformers " << want_factor;
  }
}

// Each scaling type must change the frequencies the way its name says,
// so a fixture that silently matched plain RoPE would be caught.
TEST(RopeScaling, ScaledTypesDifferFromPlainRope) {
  const nlohmann::json fixture = ReadRopeFixture();
  const ops::RopeTable plain = ops::RopeTable::Plain(10000, 16);
  for (const nlohmann::json& c : fixture["cases"]) {
    if (c["name"] == "default" || c["name"] == "dynamic" || c["name"] == "llama3") continue;  // other thetas
    const std::vector<double> f = c["inv_freq"].get<std::vector<double>>();
    EXPECT_LT(f.back(), plain.inv_freq.back() * 0.9) << c["name"] << ": the lowest frequency is not scaled down";
  }
}

TEST(RopeScaling, DefaultConfigIsBitIdenticalToPlainTheta) {
  const config::RopeScaling none;
  absl::StatusOr<ops::RopeTable> table = ops::RopeTable::FromConfig(10000, none, 16);
  ASSERT_TRUE(table.ok());
  EXPECT_EQ(table->attention_factor, 1.0);
  const Tensor x = testing::RandomTensor({7, 3, 16}, DType::kF32, 11);
  const Tensor pos = Positions(7, 5);
  Tensor a = Tensor::Empty(x.shape(), DType::kF32), b = Tensor::Empty(x.shape(), DType::kF32);
  ops::RopeForward(x, pos, *table, a);
  ops::RopeForward(x, pos, 10000.0, b);
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "default scaling changed plain RoPE's bits";
}

// With an attention factor a, forward is a·R and backward must be its
// transpose a·Rᵀ: <F(x), g> = <x, B(g)>, in f64.
TEST(RopeScaling, YarnBackwardIsTransposeOfForward) {
  config::RopeScaling yarn;
  yarn.set_type("yarn");
  yarn.set_factor(8);
  yarn.set_original_max_position_embeddings(32);
  absl::StatusOr<ops::RopeTable> table = ops::RopeTable::FromConfig(10000, yarn, 32);
  ASSERT_TRUE(table.ok());
  ASSERT_GT(table->attention_factor, 1.1);
  const Tensor x = testing::RandomTensor({9, 2, 32}, DType::kF64, 1);
  const Tensor g = testing::RandomTensor({9, 2, 32}, DType::kF64, 2);
  const Tensor pos = Positions(9, 37);
  Tensor fx = Tensor::Empty(x.shape(), DType::kF64), bg = Tensor::Empty(x.shape(), DType::kF64);
  ops::RopeForward(x, pos, *table, fx);
  ops::RopeBackward(g, pos, *table, bg);
  double lhs = 0, rhs = 0, norm_x = 0, norm_fx = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    lhs += fx.Get(i) * g.Get(i);
    rhs += x.Get(i) * bg.Get(i);
    norm_x += x.Get(i) * x.Get(i);
    norm_fx += fx.Get(i) * fx.Get(i);
  }
  EXPECT_NEAR(lhs, rhs, 1e-12 * std::abs(lhs) + 1e-12) << "<F x, g> vs <x, B g>";
  // A rotation scaled by a: |F x| = a |x|.
  EXPECT_NEAR(std::sqrt(norm_fx), table->attention_factor * std::sqrt(norm_x), 1e-12 * std::sqrt(norm_fx));
}

TEST(RopeScaling, ConfigValidationNamesTheField) {
  struct Case {
    std::string set, field;
  };
  for (const Case& c : {Case{"model.rope_scaling.type=longrope", "model.rope_scaling.type"},
                        Case{"model.rope_scaling.factor=0.5", "model.rope_scaling.factor"},
                        Case{"model.rope_scaling.beta_fast=0.5", "model.rope_scaling.beta_fast"},
                        Case{"model.rope_scaling.high_freq_factor=0.5", "model.rope_scaling.high_freq_factor"}}) {
    absl::StatusOr<config::Config> config = LoadConfig("", {c.set});
    ASSERT_FALSE(config.ok()) << c.set << " was accepted";
    EXPECT_NE(config.status().message().find(c.field), std::string::npos) << config.status();
  }
  absl::StatusOr<config::Config> ok = LoadConfig("", {"model.rope_scaling.type=llama3", "model.rope_scaling.factor=8"});
  EXPECT_TRUE(ok.ok()) << ok.status();
}

}  // namespace
}  // namespace loom
