// The f32 CUDA lightning attention (ops/cuda/lightning_attention_f32.cu),
// reached through the ops:: entry points with CUDA tensors as the model calls
// them, against the CPU reference (block algorithm, f32) on the same inputs.
//
// Tolerance. Both sides compute in f32 (u = 6e-8) and differ in summation
// order (the GPU sums a 1,024-token segment's state directly and scans
// segments; the CPU carries the state block by block) and in how a power of
// λ is formed (both round pow in double, but the CPU multiplies carried
// states by λ^64 where the GPU uses λ^(L−1−j) directly). That is a few u per
// term, about 1e-6 of a tensor's scale at 2,500 tokens. We require
// ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-5 and |gpu − cpu| ≤ 1e-5 · max|cpu| + 1e-5 · |cpu|
// element-wise; a wrong decay power, mask or state is off by order 1.
// Outputs are poisoned with NaN first. Each comparison prints its errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "ops/lightning_attention.h"
#include "parallel/cp_lightning.h"
#include "parallel/solo_communicator.h"
#include "parallel/zigzag.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom::ops {
namespace {

using loom::testing::NormwiseClose;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;

constexpr double kRel = 1e-5;

struct LightningCase {
  std::string name;
  int64_t d = 64, h = 4;
  std::vector<int32_t> lens;
  std::vector<double> decay;  // one per head
  bool states = false;        // state_in, d_state_out given; d_state_in asked
};

void RunLightningCase(const LightningCase& c) {
  SCOPED_TRACE(c.name);
  ASSERT_EQ(static_cast<int64_t>(c.decay.size()), c.h);
  std::vector<int32_t> cu{0};
  for (int32_t n : c.lens) cu.push_back(cu.back() + n);
  TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(cu, {static_cast<int64_t>(cu.size())});
  const int64_t t = cu.back(), r = rows.rows();
  const Shape x_shape{t, c.h, c.d}, s_shape{r, c.h, c.d, c.d};
  // Post-SiLU-like magnitudes: q, k, v in [−0.5, 1).
  const Tensor q = testing::RandomTensor(x_shape, DType::kF32, 41, -0.5, 1);
  const Tensor k = testing::RandomTensor(x_shape, DType::kF32, 42, -0.5, 1);
  const Tensor v = testing::RandomTensor(x_shape, DType::kF32, 43, -0.5, 1);
  const Tensor d_o = testing::RandomTensor(x_shape, DType::kF32, 44);
  std::vector<float> lambda(c.decay.begin(), c.decay.end());
  const Tensor decay = Tensor::FromVector(lambda, {c.h});
  const Tensor s_in = c.states ? testing::RandomTensor(s_shape, DType::kF32, 45) : Tensor();
  const Tensor ds_out = c.states ? testing::RandomTensor(s_shape, DType::kF32, 46) : Tensor();

  LightningOptions options;
  Tensor o, s_out, dq, dk, dv, ds_in;
  if (c.states) ds_in = Tensor::Empty(s_shape, DType::kF32);
  LightningAttentionForward(q, k, v, decay, rows, options, s_in, o, s_out);
  LightningAttentionBackward(q, k, v, decay, rows, options, s_in, d_o, ds_out, dq, dk, dv, ds_in);

  const Tensor gq = ToGpu(q), gk = ToGpu(k), gv = ToGpu(v), gdo = ToGpu(d_o), gdecay = ToGpu(decay);
  const Tensor gs_in = c.states ? ToGpu(s_in) : Tensor(), gds_out = c.states ? ToGpu(ds_out) : Tensor();
  Tensor go = PoisonedGpu(x_shape, DType::kF32), gs_out = PoisonedGpu(s_shape, DType::kF32);
  Tensor gdq = PoisonedGpu(x_shape, DType::kF32), gdk = PoisonedGpu(x_shape, DType::kF32);
  Tensor gdv = PoisonedGpu(x_shape, DType::kF32);
  Tensor gds_in = c.states ? PoisonedGpu(s_shape, DType::kF32) : Tensor();
  LightningAttentionForward(gq, gk, gv, gdecay, rows, options, gs_in, go, gs_out);
  LightningAttentionBackward(gq, gk, gv, gdecay, rows, options, gs_in, gdo, gds_out, gdq, gdk, gdv, gds_in);
  CudaSynchronize();

  std::printf("[%s]\n", c.name.c_str());
  EXPECT_TRUE(NormwiseClose(go, o, "o", kRel));
  EXPECT_TRUE(NormwiseClose(gs_out, s_out, "state_out", kRel));
  EXPECT_TRUE(NormwiseClose(gdq, dq, "dq", kRel));
  EXPECT_TRUE(NormwiseClose(gdk, dk, "dk", kRel));
  EXPECT_TRUE(NormwiseClose(gdv, dv, "dv", kRel));
  if (c.states) {
    EXPECT_TRUE(NormwiseClose(gds_in, ds_in, "d_state_in", kRel));
  }
}

TEST(GpuLightningF32, SeveralDecaysAndNoDecayMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunLightningCase({.name = "D64 decays incl. 1", .d = 64, .h = 4, .lens = {300, 300},
                    .decay = {0.5, 0.9, 0.999, 1.0}});
  RunLightningCase({.name = "D128 model decays", .d = 128, .h = 4, .lens = {256},
                    .decay = LightningDecay(4, 1, 3)});
}

TEST(GpuLightningF32, SmallHeadDimsOfTheTinyConfigs) {
  LOOM_SKIP_WITHOUT_GPU();
  RunLightningCase({.name = "D32 (default.textproto)", .d = 32, .h = 4, .lens = {16, 16, 16, 16},
                    .decay = LightningDecay(4, 0, 4)});
  RunLightningCase({.name = "D16", .d = 16, .h = 4, .lens = {100, 37}, .decay = {0.7, 0.95, 0.99, 1.0}});
}

TEST(GpuLightningF32, VarlenRowsAcrossSegmentsMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  // Rows of 1, 63, 65 tokens, one of several 1,024-token segments, an empty one.
  RunLightningCase({.name = "varlen D64", .d = 64, .h = 2, .lens = {1, 63, 2500, 0, 65},
                    .decay = {0.99, 1.0}});
}

TEST(GpuLightningF32, StateInAndOutWithTheirGradientsMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunLightningCase({.name = "states D64", .d = 64, .h = 2, .lens = {130, 1100}, .decay = {0.9, 1.0},
                    .states = true});
  RunLightningCase({.name = "states D128", .d = 128, .h = 2, .lens = {70}, .decay = {0.99, 0.8}, .states = true});
}

// The three phases on one chunk (what LASP-1/2 call), f32 on the GPU against
// the CPU phases; accumulated outputs start from the same random values on
// both sides, so writing instead of adding fails.
void RunPhasesCase(int64_t c, int64_t h, int64_t d, const std::vector<double>& decays) {
  SCOPED_TRACE("phases C=" + std::to_string(c) + " D=" + std::to_string(d));
  const Shape x_shape{c, h, d}, s_shape{h, d, d};
  const Tensor q = testing::RandomTensor(x_shape, DType::kF32, 71, -0.5, 1);
  const Tensor k = testing::RandomTensor(x_shape, DType::kF32, 72, -0.5, 1);
  const Tensor v = testing::RandomTensor(x_shape, DType::kF32, 73, -0.5, 1);
  const Tensor d_o = testing::RandomTensor(x_shape, DType::kF32, 74);
  const Tensor st = testing::RandomTensor(s_shape, DType::kF32, 75);
  std::vector<float> lambda(decays.begin(), decays.end());
  const Tensor decay = Tensor::FromVector(lambda, {h}), gdecay = ToGpu(decay);
  const Tensor gq = ToGpu(q), gk = ToGpu(k), gv = ToGpu(v), gdo = ToGpu(d_o), gst = ToGpu(st);
  auto start = [&](const Shape& shape, uint64_t seed) { return testing::RandomTensor(shape, DType::kF32, seed); };
  const Tensor none;
  std::printf("[phases C=%ld D=%ld]\n", c, d);

  Tensor m = Tensor::Empty(s_shape, DType::kF32), gm = PoisonedGpu(s_shape, DType::kF32);
  LightningChunkState(k, v, decay, none, m);
  LightningChunkState(gk, gv, gdecay, none, gm);

  Tensor dk1 = start(x_shape, 81), dv1 = start(x_shape, 82), gdk1 = ToGpu(dk1), gdv1 = ToGpu(dv1);
  LightningChunkStateBackward(k, v, decay, none, st, dk1, dv1);
  LightningChunkStateBackward(gk, gv, gdecay, none, gst, gdk1, gdv1);

  Tensor o = Tensor::Empty(x_shape, DType::kF32), go = PoisonedGpu(x_shape, DType::kF32);
  LightningIntraChunk(q, k, v, decay, none, o);
  LightningIntraChunk(gq, gk, gv, gdecay, none, go);

  Tensor dq2 = start(x_shape, 83), dk2 = start(x_shape, 84), dv2 = start(x_shape, 85);
  Tensor gdq2 = ToGpu(dq2), gdk2 = ToGpu(dk2), gdv2 = ToGpu(dv2);
  LightningIntraChunkBackward(q, k, v, decay, none, d_o, dq2, dk2, dv2);
  LightningIntraChunkBackward(gq, gk, gv, gdecay, none, gdo, gdq2, gdk2, gdv2);

  Tensor o3 = start(x_shape, 86), go3 = ToGpu(o3);
  LightningInterChunk(q, decay, none, st, o3);
  LightningInterChunk(gq, gdecay, none, gst, go3);

  Tensor dq4 = start(x_shape, 87), ds4 = start(s_shape, 88), gdq4 = ToGpu(dq4), gds4 = ToGpu(ds4);
  LightningInterChunkBackward(q, decay, none, st, d_o, dq4, ds4);
  LightningInterChunkBackward(gq, gdecay, none, gst, gdo, gdq4, gds4);
  CudaSynchronize();

  EXPECT_TRUE(NormwiseClose(gm, m, "chunk m", kRel));
  EXPECT_TRUE(NormwiseClose(gdk1, dk1, "state dk (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(gdv1, dv1, "state dv (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(go, o, "intra o", kRel));
  EXPECT_TRUE(NormwiseClose(gdq2, dq2, "intra dq (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(gdk2, dk2, "intra dk (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(gdv2, dv2, "intra dv (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(go3, o3, "inter o (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(gdq4, dq4, "inter dq (+=)", kRel));
  EXPECT_TRUE(NormwiseClose(gds4, ds4, "inter ds (+=)", kRel));
}

TEST(GpuLightningF32, ChunkPhasesMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunPhasesCase(70, 2, 64, {0.9, 1.0});
  RunPhasesCase(1100, 2, 32, {0.99, 1.0});
  RunPhasesCase(64, 4, 128, {0.5, 0.8, 0.95, 1.0});
}

// LASP-1 and LASP-2 on CUDA tensors in a world of one rank: a row is its two
// zig-zag chunks, so the chains run (chunk 0's state enters chunk 1) and the
// result must equal the fused single-process op on the CPU.
void RunCpLightningCase(CpLinearScheme scheme) {
  SCOPED_TRACE(CpLinearSchemeName(scheme));
  const int64_t rows_n = 2, seq = 256, t = rows_n * seq, h = 4, d = 32;
  const TokenRows rows = TokenRows::Uniform(rows_n, seq);
  auto layout = ZigzagChunks(rows_n, seq, 1, 0);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const Shape x_shape{t, h, d};
  const Tensor q = testing::RandomTensor(x_shape, DType::kF32, 91, -0.5, 1);
  const Tensor k = testing::RandomTensor(x_shape, DType::kF32, 92, -0.5, 1);
  const Tensor v = testing::RandomTensor(x_shape, DType::kF32, 93, -0.5, 1);
  const Tensor d_o = testing::RandomTensor(x_shape, DType::kF32, 94);
  const std::vector<double> decays = LightningDecay(h, 1, 4);
  const Tensor decay = Tensor::FromVector(std::vector<float>(decays.begin(), decays.end()), {h});
  Tensor o, s_out, dq, dk, dv, no_state;
  LightningAttentionForward(q, k, v, decay, rows, {}, Tensor(), o, s_out);
  LightningAttentionBackward(q, k, v, decay, rows, {}, Tensor(), d_o, Tensor(), dq, dk, dv, no_state);

  std::unique_ptr<Communicator> world = SoloWorld();
  CpLightningOptions cp;
  cp.scheme = scheme;
  CpLightningSaved saved;
  const Tensor gq = ToGpu(q), gk = ToGpu(k), gv = ToGpu(v), gdo = ToGpu(d_o), gdecay = ToGpu(decay);
  Tensor go = PoisonedGpu(x_shape, DType::kF32), gdq = PoisonedGpu(x_shape, DType::kF32);
  Tensor gdk = PoisonedGpu(x_shape, DType::kF32), gdv = PoisonedGpu(x_shape, DType::kF32);
  ASSERT_TRUE(CpLightningForward(*world, cp, *layout, gq, gk, gv, gdecay, rows, go, &saved).ok());
  ASSERT_TRUE(CpLightningBackward(*world, cp, *layout, gq, gk, gv, gdecay, rows, gdo, &saved, gdq, gdk, gdv).ok());
  CudaSynchronize();
  std::printf("[cp %s]\n", CpLinearSchemeName(scheme));
  EXPECT_TRUE(NormwiseClose(go, o, "o", kRel));
  EXPECT_TRUE(NormwiseClose(gdq, dq, "dq", kRel));
  EXPECT_TRUE(NormwiseClose(gdk, dk, "dk", kRel));
  EXPECT_TRUE(NormwiseClose(gdv, dv, "dv", kRel));
}

TEST(GpuCpLightningF32, Lasp1AndLasp2OnCudaTensorsMatchTheFusedOp) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCpLightningCase(CpLinearScheme::kLasp1);
  RunCpLightningCase(CpLinearScheme::kLasp2);
}

}  // namespace
}  // namespace loom::ops
