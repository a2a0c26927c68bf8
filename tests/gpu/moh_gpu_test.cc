// MoH on the GPU against the CPU reference on the same inputs: the gate op
// (ops/cuda/moh_gate.cu: gates, their backward, the active mask, the head
// gating and the zeroing of inactive heads), the lightning kernels with a
// mask (whole inactive chunks, chunks cut by mask blocks, rows not aligned to
// chunks, state in and out), and whole H and R layers forward and backward
// (every parameter gradient compared) in f32 and bf16. f32 agrees to about
// 1e-5; bf16 inputs are rounded to bf16 first and the CPU computes with them
// in f32 (tolerances as in the lightning and MoE GPU tests). Outputs start as
// NaN, so an unwritten element fails; tokens the mask turns off must come out
// exactly 0.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model/lightning_attention_layer.h"
#include "model/moh.h"
#include "model/softmax_attention_layer.h"
#include "ops/lightning_attention.h"
#include "ops/moe_router.h"
#include "ops/moh_gate.h"
#include "runtime/config.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::NormwiseClose;
using testing::PoisonedGpu;
using testing::RandomTensor;
using testing::ToCpu;
using testing::ToGpu;

Tensor Bf16Rounded(const Tensor& f32) { return f32.To(DType::kBF16).To(DType::kF32); }
Tensor AsF32(const Tensor& t) {
  const Tensor h = t.To(Device::Cpu());
  return h.dtype() == DType::kF32 ? h : h.To(DType::kF32);
}
std::vector<int32_t> IntValues(const Tensor& t) {
  const Tensor h = t.To(Device::Cpu());
  return {h.data<int32_t>(), h.data<int32_t>() + h.numel()};
}

// ---- The gate op ----

struct GateCase {
  int heads, shared, top_k;
  bool fixed;
  DType logits;  // dtype of the logits on the GPU
};

void CheckGates(const GateCase& gc) {
  const int64_t t = 333;
  const int routed = gc.heads - gc.shared;
  const ops::MohGateOptions o{.heads = gc.heads, .shared = gc.shared, .top_k = gc.top_k, .fixed_gates = gc.fixed};
  auto logits = [&](int64_t n, uint64_t seed) {
    const Tensor f = RandomTensor({t, n}, DType::kF32, seed, -3, 3);
    return gc.logits == DType::kBF16 ? Bf16Rounded(f) : f;
  };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(gc.logits == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  const bool has_shared = gc.shared > 0 && !gc.fixed, mix = has_shared && routed > 0;
  const Tensor zs = has_shared ? logits(gc.shared, 1) : Tensor();
  const Tensor zh = mix ? logits(2, 2) : Tensor();
  // The routed part: the MoE router's CPU result, given to both devices.
  ops::MoeRouting routing;
  if (routed > 0)
    ops::MoeRouterForward(logits(routed, 3), {}, {.experts = routed, .top_k = gc.top_k}, routing);
  Tensor s, a, g = Tensor::Empty({t, gc.heads}, DType::kF32);
  ops::MohGatesForward(zs, zh, routing.experts, routing.gates, o, s, a, g);
  const Tensor experts_gpu = routed > 0 ? ToGpu(routing.experts) : Tensor();
  const Tensor p_gpu = routed > 0 ? ToGpu(routing.gates) : Tensor();
  Tensor gs, ga, gg = PoisonedGpu({t, gc.heads}, DType::kF32);
  ops::MohGatesForward(has_shared ? to_gpu(zs) : Tensor(), mix ? to_gpu(zh) : Tensor(), experts_gpu, p_gpu, o, gs,
                       ga, gg);
  EXPECT_TRUE(NormwiseClose(gg, g, "gates", 1e-6));
  if (has_shared) {
    EXPECT_TRUE(NormwiseClose(gs, s, "shared scores", 1e-6));
  }
  if (mix) {
    EXPECT_TRUE(NormwiseClose(ga, a, "alpha", 1e-6));
  }
  // Unkept routed heads are exactly 0 on both.
  const Tensor gh = ToCpu(gg);
  for (int64_t i = 0; i < gh.numel(); ++i) {
    if (g.Get(i) == 0) {
      ASSERT_EQ(gh.Get(i), 0.0) << "gate " << i;
    }
  }
  if (gc.fixed) return;
  const Tensor dg = RandomTensor({t, gc.heads}, DType::kF32, 4);
  Tensor dzs, dzh, dp;
  ops::MohGatesBackward(s, a, routing.experts, routing.gates, dg, o, dzs, dzh, dp);
  Tensor gdzs = has_shared ? PoisonedGpu({t, gc.shared}, gc.logits) : Tensor();
  Tensor gdzh = mix ? PoisonedGpu({t, 2}, gc.logits) : Tensor();
  Tensor gdp = routed > 0 ? PoisonedGpu({t, gc.top_k}, DType::kF32) : Tensor();
  ops::MohGatesBackward(gs, ga, experts_gpu, p_gpu, ToGpu(dg), o, gdzs, gdzh, gdp);
  const double tol = gc.logits == DType::kBF16 ? 1e-2 : 1e-5;
  if (has_shared) {
    EXPECT_TRUE(NormwiseClose(AsF32(gdzs), dzs, "dshared_logits", tol));
  }
  if (mix) {
    EXPECT_TRUE(NormwiseClose(AsF32(gdzh), dzh, "dalpha_logits", tol));
  }
  if (routed > 0) {
    EXPECT_TRUE(NormwiseClose(gdp, dp, "drouted_gates", 1e-5));
  }
}

TEST(GpuMohGates, MatchesCpu_SharedAndRoutedF32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckGates({.heads = 16, .shared = 4, .top_k = 6, .fixed = false, .logits = DType::kF32});
}
TEST(GpuMohGates, MatchesCpu_SharedAndRoutedBf16Logits) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckGates({.heads = 8, .shared = 2, .top_k = 3, .fixed = false, .logits = DType::kBF16});
}
TEST(GpuMohGates, MatchesCpu_OnlyRoutedAndOnlyShared) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckGates({.heads = 6, .shared = 0, .top_k = 2, .fixed = false, .logits = DType::kF32});
  CheckGates({.heads = 5, .shared = 5, .top_k = 0, .fixed = false, .logits = DType::kF32});
}
TEST(GpuMohGates, MatchesCpu_FixedGates) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckGates({.heads = 8, .shared = 3, .top_k = 2, .fixed = true, .logits = DType::kF32});
}

// The mask, bitwise, for blocks that divide T and blocks that do not.
TEST(GpuMohMask, MatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t t = 1000;
  const ops::MohGateOptions o{.heads = 10, .shared = 2, .top_k = 2, .fixed_gates = false};
  ops::MoeRouting routing;
  // Logits that favour head (t / 100) mod 8: blocks of tokens agree, as in a trained router.
  Tensor z = RandomTensor({t, 8}, DType::kF32, 5, -0.5, 0.5);
  for (int64_t i = 0; i < t; ++i) z.data<float>()[i * 8 + (i / 100) % 8] += 4.0f;
  ops::MoeRouterForward(z, {}, {.experts = 8, .top_k = 2}, routing);
  for (const int64_t block : {64, 100, 7}) {
    Tensor cpu, gpu;
    ops::MohActiveMask(routing.experts, o, t, block, cpu);
    ops::MohActiveMask(ToGpu(routing.experts), o, t, block, gpu);
    EXPECT_EQ(IntValues(gpu), IntValues(cpu)) << "block " << block;
  }
}

// Head gating and its backward (d_o aliasing dout, as the layers call it),
// and the zeroing of inactive heads.
void CheckHeadGates(DType act) {
  const int64_t t = 130, h = 6, d = 40;
  auto input = [&](const Shape& s, uint64_t seed) {
    const Tensor f = RandomTensor(s, DType::kF32, seed);
    return act == DType::kBF16 ? Bf16Rounded(f) : f;
  };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(act == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  const double tol = act == DType::kBF16 ? 1e-2 : 1e-6;
  const Tensor o = input({t, h, d}, 1), dout = input({t, h, d}, 2);
  const Tensor g = RandomTensor({t, h}, DType::kF32, 3);
  Tensor out = Tensor::Empty(o.shape(), DType::kF32), gout = PoisonedGpu(o.shape(), act);
  ops::ApplyHeadGates(o, g, out);
  ops::ApplyHeadGates(to_gpu(o), ToGpu(g), gout);
  EXPECT_TRUE(NormwiseClose(AsF32(gout), out, "g ⊙ o", tol));
  Tensor d_o = dout.Clone(), dg = Tensor::Empty({t, h}, DType::kF32);
  ops::HeadGatesBackward(o, g, d_o, d_o, dg);
  Tensor gd_o = to_gpu(dout), gdg = PoisonedGpu({t, h}, DType::kF32);
  ops::HeadGatesBackward(to_gpu(o), ToGpu(g), gd_o, gd_o, gdg);
  EXPECT_TRUE(NormwiseClose(AsF32(gd_o), d_o, "d_o", tol));
  EXPECT_TRUE(NormwiseClose(gdg, dg, "dgates", act == DType::kBF16 ? 1e-5 : 1e-6));
  const int64_t block = 16, blocks = (t + block - 1) / block;
  Tensor active = Tensor::Empty({h, blocks}, DType::kI32);
  for (int64_t i = 0; i < active.numel(); ++i) active.data<int32_t>()[i] = (i * 7) % 3 != 0;
  Tensor zeroed = o.Clone(), gzeroed = to_gpu(o);
  ops::ZeroInactiveHeads(active, block, zeroed);
  ops::ZeroInactiveHeads(ToGpu(active), block, gzeroed);
  EXPECT_TRUE(AllClose(AsF32(gzeroed), zeroed, 0, 0));
}
TEST(GpuMohHeadGates, MatchesCpu_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckHeadGates(DType::kF32);
}
TEST(GpuMohHeadGates, MatchesCpu_Bf16) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckHeadGates(DType::kBF16);
}

// ---- The lightning kernels with a mask ----

// ‖a − b‖ / ‖b‖ ≤ 1e-2 and max |a − b| ≤ 4e-2 max |b| (the bounds of
// tests/gpu/lightning_attention_gpu_test.cc: a few bf16 roundings).
::testing::AssertionResult Bf16Close(const Tensor& gpu, const Tensor& ref, const std::string& what) {
  const Tensor a = AsF32(gpu);
  double d2 = 0, r2 = 0, dmax = 0, rmax = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.Get(i), y = ref.Get(i), d = std::abs(x - y);
    d2 += d * d;
    r2 += y * y;
    rmax = std::max(rmax, std::abs(y));
    if (!(d <= dmax)) dmax = d;
  }
  const double rel = std::sqrt(d2 / std::max(r2, 1e-300)), max_rel = dmax / std::max(rmax, 1e-300);
  std::printf("  %-12s normwise %.3g, max %.3g\n", what.c_str(), rel, max_rel);
  if (rel <= 1e-2 && max_rel <= 4e-2 && r2 > 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": ‖Δ‖/‖ref‖ " << rel << ", max|Δ|/max|ref| " << max_rel;
}

// Tokens whose head the mask turns off are exactly 0 in x [T, H, D] (any device).
::testing::AssertionResult ZeroWhereInactive(const Tensor& x, const Tensor& active, int64_t block,
                                             const std::string& what) {
  const Tensor a = AsF32(x);
  const int64_t t = a.dim(0), h = a.dim(1), d = a.dim(2), blocks = active.dim(1);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < h; ++i)
      if (active.data<int32_t>()[i * blocks + r / block] == 0)
        for (int64_t c = 0; c < d; ++c)
          if (a.data<float>()[(r * h + i) * d + c] != 0)
            return ::testing::AssertionFailure() << what << " token " << r << " head " << i << " is "
                                                 << a.data<float>()[(r * h + i) * d + c] << ", not 0";
  return ::testing::AssertionSuccess();
}

struct MaskCase {
  std::string name;
  int64_t d, block;
  std::vector<int32_t> cu;
  DType dtype;
};

class GpuLightningMask : public ::testing::TestWithParam<MaskCase> {};

// Forward and backward of the fused call with a mask whose heads are off in
// runs of blocks (a whole 1,024-token segment for one head, single blocks,
// every other block), state in and d_state_out given.
TEST_P(GpuLightningMask, MatchesCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  const MaskCase& c = GetParam();
  const int64_t heads = 4, t = c.cu.back(), r = static_cast<int64_t>(c.cu.size()) - 1;
  const Shape x_shape{t, heads, c.d}, s_shape{r, heads, c.d, c.d};
  auto input = [&](const Shape& s, uint64_t seed) {
    const Tensor f = RandomTensor(s, DType::kF32, seed);
    return c.dtype == DType::kBF16 ? Bf16Rounded(f) : f;
  };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(c.dtype == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  const Tensor q = input(x_shape, 1), k = input(x_shape, 2), v = input(x_shape, 3), d_o = input(x_shape, 4);
  const Tensor s_in = RandomTensor(s_shape, DType::kF32, 5), ds_out = RandomTensor(s_shape, DType::kF32, 6);
  const std::vector<double> lam64 = ops::LightningDecay(heads, 0, 1);
  const Tensor lam = Tensor::FromVector(std::vector<float>(lam64.begin(), lam64.end()), {heads});
  ops::TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(c.cu, {static_cast<int64_t>(c.cu.size())});
  const int64_t blocks = (t + c.block - 1) / c.block;
  Tensor active = Tensor::Empty({heads, blocks}, DType::kI32);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t tok = b * c.block;
    active.data<int32_t>()[0 * blocks + b] = 1;                          // always on
    active.data<int32_t>()[1 * blocks + b] = tok < 1024 || tok >= 2048;  // a segment off
    active.data<int32_t>()[2 * blocks + b] = b % 2;                      // every other block
    active.data<int32_t>()[3 * blocks + b] = b % 5 == 3;                 // mostly off
  }
  ops::LightningOptions options;
  options.block = c.block;
  options.active = active;
  Tensor o, s_out, dq, dk, dv, ds_in = Tensor::Empty(s_shape, DType::kF32);
  ops::LightningAttentionForward(q, k, v, lam, rows, options, s_in, o, s_out);
  ops::LightningAttentionBackward(q, k, v, lam, rows, options, s_in, d_o, ds_out, dq, dk, dv, ds_in);

  ops::LightningOptions gpu_options = options;
  gpu_options.active = ToGpu(active);
  Tensor go = PoisonedGpu(x_shape, c.dtype), gs_out = PoisonedGpu(s_shape, DType::kF32);
  Tensor gdq = PoisonedGpu(x_shape, c.dtype), gdk = PoisonedGpu(x_shape, c.dtype), gdv = PoisonedGpu(x_shape, c.dtype);
  Tensor gds_in = PoisonedGpu(s_shape, DType::kF32);
  const Tensor gq = to_gpu(q), gk = to_gpu(k), gv = to_gpu(v);
  ops::LightningAttentionForward(gq, gk, gv, ToGpu(lam), rows, gpu_options, ToGpu(s_in), go, gs_out);
  ops::LightningAttentionBackward(gq, gk, gv, ToGpu(lam), rows, gpu_options, ToGpu(s_in), to_gpu(d_o),
                                  ToGpu(ds_out), gdq, gdk, gdv, gds_in);
  if (c.dtype == DType::kBF16) {
    EXPECT_TRUE(Bf16Close(go, o, "o"));
    EXPECT_TRUE(Bf16Close(gs_out, s_out, "state_out"));
    EXPECT_TRUE(Bf16Close(gdq, dq, "dq"));
    EXPECT_TRUE(Bf16Close(gdk, dk, "dk"));
    EXPECT_TRUE(Bf16Close(gdv, dv, "dv"));
    EXPECT_TRUE(Bf16Close(gds_in, ds_in, "d_state_in"));
  } else {
    EXPECT_TRUE(NormwiseClose(go, o, "o", 1e-5));
    EXPECT_TRUE(NormwiseClose(gs_out, s_out, "state_out", 1e-5));
    EXPECT_TRUE(NormwiseClose(gdq, dq, "dq", 1e-5));
    EXPECT_TRUE(NormwiseClose(gdk, dk, "dk", 1e-5));
    EXPECT_TRUE(NormwiseClose(gdv, dv, "dv", 1e-5));
    EXPECT_TRUE(NormwiseClose(gds_in, ds_in, "d_state_in", 1e-5));
  }
  EXPECT_TRUE(ZeroWhereInactive(go, active, c.block, "o"));
  EXPECT_TRUE(ZeroWhereInactive(gdq, active, c.block, "dq"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GpuLightningMask,
    ::testing::Values(
        // Blocks of 64 on rows at multiples of 64: whole chunks on or off.
        MaskCase{"Bf16_D128_block64_aligned", 128, 64, {0, 2048, 3072}, DType::kBF16},
        // Rows not at multiples of 64 and blocks of 48: chunks cut by the mask.
        MaskCase{"Bf16_D64_block48_varlen", 64, 48, {0, 1, 65, 1300, 1300, 3000}, DType::kBF16},
        MaskCase{"Bf16_D128_block200_varlen", 128, 200, {0, 700, 2600}, DType::kBF16},
        // f32: the f32 kernels compute everything and zero the inactive outputs.
        MaskCase{"F32_D64_block48_varlen", 64, 48, {0, 1, 65, 1300, 1300, 3000}, DType::kF32}),
    [](const ::testing::TestParamInfo<MaskCase>& i) { return i.param.name; });

// ---- The softmax (flash) kernels with a mask ----

// Rows [r0, r1) of a [T, H, ...] tensor's head h set to 0 where `keep` says
// no: the comparison below leaves out what the GPU may compute and the CPU
// skips (inactive queries inside a query tile that has an active block).
Tensor KeepRows(const Tensor& x, const std::vector<char>& keep) {
  Tensor a = AsF32(x);
  const int64_t t = a.dim(0), h = a.dim(1), per = a.numel() / (t * h);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < h; ++i)
      if (!keep[r * h + i]) std::fill_n(a.data<float>() + (r * h + i) * per, per, 0.0f);
  return a;
}

struct SoftmaxMaskCase {
  std::string name;
  int64_t d;
  std::vector<int32_t> cu;
  int64_t run;  // the mask changes every `run` tokens (128: whole query tiles)
  bool deterministic;
};

class GpuSoftmaxMask : public ::testing::TestWithParam<SoftmaxMaskCase> {};

// Causal GQA (4 query heads on 2 KV heads), bf16, against the CPU reference
// with the same mask (f32 on the bf16-rounded inputs). d_o is 0 on inactive
// queries, as MoH's gating makes it. With runs of 128 on rows at multiples
// of 128 every query tile is wholly on or off, and o, lse (−∞ where
// skipped) are compared everywhere; otherwise on the active queries.
TEST_P(GpuSoftmaxMask, MatchesCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  const SoftmaxMaskCase& c = GetParam();
  const int64_t hq = 4, hk = 2, t = c.cu.back(), block = 64, blocks = (t + block - 1) / block;
  const Shape qs{t, hq, c.d}, ks{t, hk, c.d};
  Tensor active = Tensor::Empty({hq, blocks}, DType::kI32);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t u = b * block / c.run;
    active.data<int32_t>()[0 * blocks + b] = 1;
    active.data<int32_t>()[1 * blocks + b] = u % 2;
    active.data<int32_t>()[2 * blocks + b] = u % 3 == 1;
    active.data<int32_t>()[3 * blocks + b] = u < 4;
  }
  std::vector<char> keep(t * hq);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < hq; ++i) keep[r * hq + i] = active.data<int32_t>()[i * blocks + r / block] != 0;
  const Tensor q = Bf16Rounded(RandomTensor(qs, DType::kF32, 1)), k = Bf16Rounded(RandomTensor(ks, DType::kF32, 2));
  const Tensor v = Bf16Rounded(RandomTensor(ks, DType::kF32, 3));
  const Tensor d_o = KeepRows(Bf16Rounded(RandomTensor(qs, DType::kF32, 4)), keep);
  ops::TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(c.cu, {static_cast<int64_t>(c.cu.size())});
  ops::AttentionOptions options;
  options.causal = true;
  options.deterministic = c.deterministic;
  options.active = active;
  options.active_block = block;
  Tensor o = Tensor::Empty(qs, DType::kF32), lse = Tensor::Empty({t, hq}, DType::kF32);
  Tensor dq = Tensor::Empty(qs, DType::kF32), dk = Tensor::Empty(ks, DType::kF32), dv = Tensor::Empty(ks, DType::kF32);
  ops::SoftmaxAttentionForward(q, k, v, rows, rows, options, o, lse);
  ops::SoftmaxAttentionBackward(q, k, v, o, lse, d_o, rows, rows, options, dq, dk, dv);

  ops::AttentionOptions gpu_options = options;
  gpu_options.active = ToGpu(active);
  auto bf = [](const Tensor& f) { return ToGpu(f.To(DType::kBF16)); };
  const Tensor gq = bf(q), gk = bf(k), gv = bf(v);
  Tensor go = PoisonedGpu(qs, DType::kBF16), glse = PoisonedGpu({t, hq}, DType::kF32);
  ops::SoftmaxAttentionForward(gq, gk, gv, rows, rows, gpu_options, go, glse);
  Tensor gdq = PoisonedGpu(qs, DType::kBF16), gdk = PoisonedGpu(ks, DType::kBF16), gdv = PoisonedGpu(ks, DType::kBF16);
  ops::SoftmaxAttentionBackward(gq, gk, gv, go, glse, bf(d_o), rows, rows, gpu_options, gdq, gdk, gdv);
  const bool whole = c.run % 128 == 0;
  if (whole) {
    EXPECT_TRUE(Bf16Close(go, o, "o"));
    EXPECT_TRUE(NormwiseClose(glse, lse, "lse", 1e-4));
  } else {
    EXPECT_TRUE(Bf16Close(KeepRows(go, keep), KeepRows(o, keep), "o (active)"));
    EXPECT_TRUE(NormwiseClose(KeepRows(glse.Reshape({t, hq, 1}), keep),
                              KeepRows(lse.Reshape({t, hq, 1}), keep), "lse (active)", 1e-4));
  }
  EXPECT_TRUE(Bf16Close(gdq, dq, "dq"));
  EXPECT_TRUE(Bf16Close(gdk, dk, "dk"));
  EXPECT_TRUE(Bf16Close(gdv, dv, "dv"));
  EXPECT_TRUE(ZeroWhereInactive(gdq, active, block, "dq"));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GpuSoftmaxMask,
    ::testing::Values(SoftmaxMaskCase{"D128_whole_tiles", 128, {0, 1024, 2048}, 128, false},
                      SoftmaxMaskCase{"D64_whole_tiles_deterministic", 64, {0, 1024, 2048}, 128, true},
                      SoftmaxMaskCase{"D128_blocks_unaligned_rows", 128, {0, 300, 1000}, 64, false},
                      SoftmaxMaskCase{"D64_blocks_unaligned_rows_deterministic", 64, {0, 300, 1000}, 64, true}),
    [](const ::testing::TestParamInfo<SoftmaxMaskCase>& i) { return i.param.name; });

// ---- Whole layers ----

// x [T, C] whose rows in each run of 64 tokens share a random direction
// (plus 5% noise): a router then sends a block's tokens to the same heads,
// as trained routers do, so some (head, block) pairs have no token.
Tensor BlockCorrelatedX(int64_t t, int64_t c, uint64_t seed) {
  const Tensor base = RandomTensor({(t + 63) / 64, c}, DType::kF32, seed);
  const Tensor noise = RandomTensor({t, c}, DType::kF32, seed + 1);
  Tensor x = Tensor::Empty({t, c}, DType::kF32);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < c; ++j)
      x.data<float>()[i * c + j] = base.data<float>()[(i / 64) * c + j] + 0.05f * noise.data<float>()[i * c + j];
  return x;
}

struct LayerCase {
  bool softmax;   // H, else R
  DType act;
  int64_t heads, head_dim;
  int shared, top_k;
  bool lightning_norm = true;  // R: the per-head RMSNorm
};

config::Config LayerConfig(const LayerCase& lc) {
  const int64_t hidden = lc.heads * lc.head_dim;
  auto c = LoadConfig("", {lc.softmax ? "model.pattern=H" : "model.pattern=R", "model.layers=1",
                           "model.hidden=" + std::to_string(hidden), "model.heads=" + std::to_string(lc.heads),
                           "model.kv_heads=" + std::to_string(lc.heads), "model.vocab=64", "train.dtype=f32", "data.recall.pairs=3",
                           "data.recall.queries=3", "data.recall.key_vocab=8", "data.recall.value_vocab=8",
                           "model.init_std=0.05", "model.lightning_block=64", "train.seq_len=640",
                           "model.moh.shared_heads=" + std::to_string(lc.shared),
                           "model.moh.top_k=" + std::to_string(lc.top_k), "model.moh.aux_loss_coef=0.3",
                           lc.lightning_norm ? "model.lightning_norm=true" : "model.lightning_norm=false"});
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

struct LayerPair {
  std::unique_ptr<SoftmaxAttentionLayer> s;
  std::unique_ptr<LightningAttentionLayer> l;
  LayerPair(const ModelDims& dims, bool softmax) {
    if (softmax) {
      s = std::make_unique<SoftmaxAttentionLayer>(dims, TensorParallel{}, ContextParallel{}, "layers.0.attn.", true);
    } else {
      l = std::make_unique<LightningAttentionLayer>(dims, TensorParallel{}, ContextParallel{}, 0, "layers.0.attn.",
                                                    true);
    }
  }
  void Forward(const Tensor& x, const Batch& b, Tensor& y) { s ? s->Forward(x, b, y) : l->Forward(x, b, y); }
  void Backward(const Tensor& x, const Batch& b, const Tensor& dy, Tensor& dx, double scale) {
    s ? s->Backward(x, b, dy, dx, scale) : l->Backward(x, b, dy, dx, scale);
  }
  void Skip(bool on) { s ? s->set_skip_inactive_heads(on) : l->set_skip_inactive_heads(on); }
  MohRouter* moh() { return s ? s->moh() : l->moh(); }
  ParamList params() {
    ParamList p;
    s ? s->CollectParams(p) : l->CollectParams(p);
    return p;
  }
};

// Two rows of 300 tokens (row 1 starts inside a block of 64).
Batch TwoRows() {
  const int64_t rows = 2, len = 300;
  Batch b = Batch::Allocate(rows, len, /*with_docs=*/false);
  for (int64_t i = 0; i < rows * len; ++i) {
    b.tokens.data<int32_t>()[i] = 0;
    b.targets.data<int32_t>()[i] = 0;
    b.positions.data<int32_t>()[i] = static_cast<int32_t>(i % len);
  }
  return b;
}

// The layer on the CPU (f32) and on the GPU (f32, or bf16 activations with
// bf16 weight copies) from the same f32 master weights (bf16-rounded for a
// bf16 run): y, dx, the router loss and every parameter gradient.
void CheckLayer(const LayerCase& lc) {
  const config::Config config = LayerConfig(lc);
  ModelDims cpu_dims = ModelDims::FromConfig(config), gpu_dims = cpu_dims;
  gpu_dims.device = Device::Cuda(0);
  gpu_dims.mixed_bf16 = lc.act == DType::kBF16;
  LayerPair cpu(cpu_dims, lc.softmax), gpu(gpu_dims, lc.softmax);
  ParamList cp = cpu.params(), gp = gpu.params();
  ASSERT_EQ(cp.size(), gp.size());
  for (size_t i = 0; i < cp.size(); ++i) {
    if (lc.act == DType::kBF16 && cp[i]->value.ndim() == 2) cp[i]->value = Bf16Rounded(cp[i]->value);
    gp[i]->value = ToGpu(cp[i]->value);
    gp[i]->grad = ToGpu(cp[i]->grad);
    if (lc.act == DType::kBF16 && cp[i]->value.ndim() == 2) gp[i]->compute = ToGpu(cp[i]->value.To(DType::kBF16));
  }
  const Batch batch = TwoRows();
  const Batch gbatch = batch.To(gpu_dims.device);
  const int64_t t = batch.tokens_count(), c = cpu_dims.hidden;
  auto rounded = [&](const Tensor& f) { return lc.act == DType::kBF16 ? Bf16Rounded(f) : f; };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(lc.act == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  const Tensor x = rounded(BlockCorrelatedX(t, c, 7)), dy = rounded(RandomTensor({t, c}, DType::kF32, 9));
  const double tol = lc.act == DType::kBF16 ? 2e-2 : 1e-4;
  Tensor y = Tensor::Empty({t, c}, DType::kF32), gy = PoisonedGpu({t, c}, lc.act);
  cpu.Forward(x, batch, y);
  gpu.Forward(to_gpu(x), gbatch, gy);
  EXPECT_TRUE(NormwiseClose(AsF32(gy), y, "layer y", tol));
  // bf16: the GPU's logits are rounded to bf16, so P_i moves by about 2^-8.
  EXPECT_NEAR(gpu.moh()->router_loss(), cpu.moh()->router_loss(),
              (lc.act == DType::kBF16 ? 1e-2 : 1e-5) * cpu.moh()->router_loss() + 1e-12);
  EXPECT_EQ(gpu.moh()->stats().load_max, cpu.moh()->stats().load_max);
  EXPECT_EQ(gpu.moh()->stats().load_min, cpu.moh()->stats().load_min);
  const int64_t block = 64;
  const std::vector<int32_t> mask = IntValues(cpu.moh()->ActiveMask(block));
  EXPECT_EQ(IntValues(gpu.moh()->ActiveMask(block)), mask);
  int64_t off = 0;
  for (int32_t m : mask) off += m == 0;
  std::printf("  %ld of %zu (head, block) pairs skipped\n", static_cast<long>(off), mask.size());
  if (lc.top_k < lc.heads - lc.shared) {
    EXPECT_GT(off, 0) << "the case skips nothing";
  }
  Tensor dx = Tensor::Empty({t, c}, DType::kF32), gdx = PoisonedGpu({t, c}, lc.act);
  cpu.Backward(x, batch, dy, dx, 0.7);
  gpu.Backward(to_gpu(x), gbatch, to_gpu(dy), gdx, 0.7);
  EXPECT_TRUE(NormwiseClose(AsF32(gdx), dx, "layer dx", tol));
  for (size_t i = 0; i < cp.size(); ++i) EXPECT_TRUE(NormwiseClose(gp[i]->grad, cp[i]->grad, cp[i]->name, tol));
}

// f32: the GPU's logits agree with the CPU's to f32 rounding, so both route
// alike; 2 shared + 2 of 6 routed heads.
TEST(GpuMohLayer, R_MatchesCpu_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer({.softmax = false, .act = DType::kF32, .heads = 8, .head_dim = 16, .shared = 2, .top_k = 2});
}
TEST(GpuMohLayer, H_MatchesCpu_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer({.softmax = true, .act = DType::kF32, .heads = 8, .head_dim = 16, .shared = 2, .top_k = 2});
}
// bf16 logits could route a near tie differently from the CPU's f32 ones,
// so every routed head is kept (the gates still differ per token); D = 64
// runs the bf16 kernels. Two shared heads: with one, Softmax(W_s x) is 1 and
// W_s's gradient is exactly 0 on the CPU but f32 rounding noise (5e-7) on the
// GPU, which no relative tolerance can accept. Skipping in bf16 is checked
// below, GPU against GPU.
TEST(GpuMohLayer, H_MatchesCpu_Bf16AllRoutedKept) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer({.softmax = true, .act = DType::kBF16, .heads = 4, .head_dim = 64, .shared = 2, .top_k = 2});
}
// The R layer in bf16 without its per-head RMSNorm. With the norm, no bf16
// computation can match the f32 CPU's dq, dk: RMSNorm's backward leaves d_o
// nearly orthogonal to a, a positive mix of the v's, so d_o·v cancels. On
// the H100 (2026-12-06) W_q's and W_k's gradients were off by 0.58 and 0.68
// (W_v's 0.0045); rounding every activation to bf16 in a CPU emulation of
// this layer gives 1.01 and 0.998 with the norm, 0.003 without.
TEST(GpuMohLayer, R_MatchesCpu_Bf16AllRoutedKeptNoNorm) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer({.softmax = false, .act = DType::kBF16, .heads = 4, .head_dim = 64, .shared = 2, .top_k = 2,
              .lightning_norm = false});
}

// bf16 R and H layers on the GPU: skipping the inactive (head, block) pairs
// gives what computing every head and gating gives, bitwise (the skipped
// terms are exact zeros: gated outputs and their d_o are 0 either way; the
// flash backward runs its deterministic dq pass).
void CheckSkippingEqualsComputingEveryHead(bool softmax) {
  const LayerCase lc{.softmax = softmax, .act = DType::kBF16, .heads = 8, .head_dim = 64, .shared = 2, .top_k = 2};
  ModelDims dims = ModelDims::FromConfig(LayerConfig(lc));
  dims.device = Device::Cuda(0);
  dims.mixed_bf16 = true;
  dims.deterministic = true;  // the flash backward's dq in a fixed order (no atomics)
  LayerPair layer(dims, softmax);
  for (Param* p : layer.params()) {
    p->value = ToGpu(p->value);
    p->grad = ToGpu(p->grad);
    if (p->value.ndim() == 2) p->compute = ToGpu(ToCpu(p->value).To(DType::kBF16));
  }
  const Batch batch = TwoRows().To(dims.device);
  const int64_t t = batch.tokens_count(), c = dims.hidden;
  const Tensor x = ToGpu(BlockCorrelatedX(t, c, 7).To(DType::kBF16));
  const Tensor dy = ToGpu(RandomTensor({t, c}, DType::kF32, 9).To(DType::kBF16));
  struct Result {
    Tensor y, dx;
    std::vector<Tensor> grads;
  };
  auto run = [&](bool skip) {
    layer.Skip(skip);
    for (Param* p : layer.params()) p->grad.CopyFrom(Tensor::Zeros(p->grad.shape(), p->grad.dtype()));
    Result r{PoisonedGpu({t, c}, DType::kBF16), PoisonedGpu({t, c}, DType::kBF16), {}};
    layer.Forward(x, batch, r.y);
    layer.Backward(x, batch, dy, r.dx, 0.7);
    for (Param* p : layer.params()) r.grads.push_back(ToCpu(p->grad));
    return r;
  };
  const Result skipped = run(true), all = run(false);
  const std::vector<int32_t> mask = IntValues(layer.moh()->ActiveMask(softmax ? 64 : dims.lightning_block));
  int64_t off = 0;
  for (int32_t m : mask) off += m == 0;
  std::printf("  %ld of %zu (head, block) pairs skipped\n", static_cast<long>(off), mask.size());
  EXPECT_GT(off, 0) << "the case skips nothing";
  EXPECT_TRUE(AllClose(AsF32(skipped.y), AsF32(all.y), 0, 0)) << "y";
  EXPECT_TRUE(AllClose(AsF32(skipped.dx), AsF32(all.dx), 0, 0)) << "dx";
  const ParamList ps = layer.params();
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_TRUE(AllClose(skipped.grads[i], all.grads[i], 0, 0)) << ps[i]->name;
}
TEST(GpuMohLayer, R_Bf16SkippingEqualsComputingEveryHead) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckSkippingEqualsComputingEveryHead(false);
}
TEST(GpuMohLayer, H_Bf16SkippingEqualsComputingEveryHead) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckSkippingEqualsComputingEveryHead(true);
}

}  // namespace
}  // namespace loom
