// MoE on the GPU against the CPU reference on the same inputs: the router
// kernel (forward statistics and backward), the permutation (index,
// gather, combine, the gate moves through the [T·k, 1] view), the grouped
// linear, the row-scaled SwiGLU, and a whole MoE
// layer forward and backward (every parameter gradient compared).
// f32 runs agree to about 1e-5; bf16 runs take bf16-rounded inputs and
// weights, which the CPU computes with in f32, and agree to about 1e-2 (the
// GPU rounds every activation to bf16). Outputs the ops write start as NaN.
#include <gtest/gtest.h>

#include <cmath>

#include "model/moe.h"
#include "ops/convert.h"
#include "ops/grouped_linear.h"
#include "ops/moe_permute.h"
#include "ops/moe_router.h"
#include "ops/swiglu.h"
#include "runtime/config.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::ConstPointers;
using testing::NormwiseClose;
using testing::Pointers;
using testing::PoisonedGpu;
using testing::RandomTensor;
using testing::ToGpu;

// A tensor rounded through bf16 and back to f32 (the CPU reference's view of a bf16 input).
Tensor Bf16Rounded(const Tensor& f32) { return f32.To(DType::kBF16).To(DType::kF32); }

std::vector<int32_t> IntValues(const Tensor& t) {
  const Tensor h = t.To(Device::Cpu());
  return {h.data<int32_t>(), h.data<int32_t>() + h.numel()};
}

struct RouterCase {
  bool sigmoid, normalize, bias;
  DType dtype;
};

void CheckRouter(const RouterCase& rc) {
  const int64_t t = 777;
  const int e = 8;
  const ops::MoeRouterOptions o{.experts = e, .top_k = 2, .sigmoid = rc.sigmoid, .normalize_top_k = rc.normalize};
  std::vector<double> bias;
  if (rc.bias) bias = {0.05, -0.02, 0.0, 0.1, -0.1, 0.03, 0.0, -0.04};
  const Tensor logits_src = RandomTensor({t, e}, DType::kF32, 1, -3, 3);
  const Tensor logits = rc.dtype == DType::kBF16 ? Bf16Rounded(logits_src) : logits_src;
  ops::MoeRouting cpu, gpu;
  ops::MoeRouterForward(logits, bias, o, cpu);
  const Tensor logits_gpu = ToGpu(rc.dtype == DType::kBF16 ? logits.To(DType::kBF16) : logits);
  ops::MoeRouterForward(logits_gpu, bias, o, gpu);
  EXPECT_EQ(IntValues(gpu.experts), IntValues(cpu.experts));
  EXPECT_TRUE(NormwiseClose(gpu.scores, cpu.scores, "scores", 1e-5));
  EXPECT_TRUE(NormwiseClose(gpu.gates, cpu.gates, "gates", 1e-5));
  EXPECT_TRUE(NormwiseClose(gpu.lse, cpu.lse, "lse", 1e-5));
  EXPECT_EQ(gpu.load, cpu.load);
  for (int i = 0; i < e; ++i) EXPECT_NEAR(gpu.mean_prob[i], cpu.mean_prob[i], 1e-6) << "expert " << i;
  EXPECT_NEAR(gpu.aux_loss, cpu.aux_loss, 1e-6 * cpu.aux_loss);
  EXPECT_NEAR(gpu.z_loss, cpu.z_loss, 1e-5 * cpu.z_loss);
  // Backward through gates, aux and z.
  const Tensor dgates = RandomTensor({t, 2}, DType::kF32, 2);
  Tensor dlogits = Tensor::Empty({t, e}, DType::kF32);
  ops::MoeRouterBackward(logits, cpu, dgates, 0.7, 0.3, o, dlogits);
  Tensor dlogits_gpu = PoisonedGpu({t, e}, rc.dtype);
  ops::MoeRouterBackward(logits_gpu, gpu, ToGpu(dgates), 0.7, 0.3, o, dlogits_gpu);
  const Tensor got = rc.dtype == DType::kBF16 ? dlogits_gpu.To(Device::Cpu()).To(DType::kF32) : dlogits_gpu;
  EXPECT_TRUE(NormwiseClose(got, dlogits, "dlogits", rc.dtype == DType::kBF16 ? 1e-2 : 1e-5));
}

TEST(GpuMoeRouter, MatchesCpu_SoftmaxF32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckRouter({false, false, false, DType::kF32});
}
TEST(GpuMoeRouter, MatchesCpu_SigmoidNormalizedBiasF32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckRouter({true, true, true, DType::kF32});
}
TEST(GpuMoeRouter, MatchesCpu_SoftmaxNormalizedBf16) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckRouter({false, true, false, DType::kBF16});
}

// Every score equal: the CPU's tie rule (lower expert index first).
TEST(GpuMoeRouter, TiesGoToTheLowerExpertIndex) {
  LOOM_SKIP_WITHOUT_GPU();
  ops::MoeRouting r;
  ops::MoeRouterForward(ToGpu(Tensor::Zeros({5, 6}, DType::kF32)), {}, {.experts = 6, .top_k = 3}, r);
  EXPECT_EQ(IntValues(r.experts), (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2}));
}

// Random routes of T tokens, k = 2, over E = 8 experts, on the host.
Tensor RandomExperts(int64_t t, int e, uint64_t seed) {
  const Tensor u = RandomTensor({t, 2}, DType::kF64, seed, 0, e);
  Tensor out = Tensor::Empty({t, 2}, DType::kI32);
  for (int64_t i = 0; i < t; ++i) {
    const int a = static_cast<int>(u.Get(2 * i)), b = static_cast<int>(u.Get(2 * i + 1));
    out.data<int32_t>()[2 * i] = a;
    out.data<int32_t>()[2 * i + 1] = b == a ? (a + 1) % e : b;
  }
  return out;
}

void CheckPermute(DType dtype, bool capacity) {
  const int64_t t = 3001, c = 136;  // c a multiple of 8 (vectorised); 3001 tokens: 6 index chunks
  const int e = 8;
  const Tensor experts = RandomExperts(t, e, 7);
  std::vector<int64_t> kept(e, 0);
  for (int64_t i = 0; i < experts.numel(); ++i) ++kept[experts.data<int32_t>()[i]];
  if (capacity)
    for (int64_t& n : kept) n = std::min<int64_t>(n, 700);
  ops::MoePermutation cpu, gpu;
  ops::MoePermuteIndex(experts, kept, cpu);
  ops::MoePermuteIndex(ToGpu(experts), kept, gpu);
  ASSERT_EQ(IntValues(gpu.rows), IntValues(cpu.rows));
  const int64_t s = cpu.size();
  auto input = [&](const Shape& shape, uint64_t seed) {
    const Tensor f = RandomTensor(shape, DType::kF32, seed);
    return dtype == DType::kBF16 ? Bf16Rounded(f) : f;
  };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(dtype == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  auto as_f32 = [&](const Tensor& g) { return dtype == DType::kBF16 ? g.To(Device::Cpu()).To(DType::kF32) : g; };
  const double tol = dtype == DType::kBF16 ? 1e-2 : 1e-6;
  const Tensor x = input({t, c}, 1), ye = input({s, c}, 2), add = input({t, c}, 3);
  // Gather: a copy, exact.
  Tensor xe = Tensor::Empty({s, c}, DType::kF32), xe_gpu = PoisonedGpu({s, c}, dtype);
  ops::MoeGather(x, cpu.rows, xe);
  ops::MoeGather(to_gpu(x), gpu.rows, xe_gpu);
  EXPECT_TRUE(NormwiseClose(as_f32(xe_gpu), xe, "gather", 0.0));
  // Combine, with an addend and without.
  Tensor y = Tensor::Empty({t, c}, DType::kF32), y_gpu = PoisonedGpu({t, c}, dtype);
  ops::MoeCombine(ye, cpu.rows, &add, y);
  const Tensor add_gpu = to_gpu(add), ye_gpu = to_gpu(ye);
  ops::MoeCombine(ye_gpu, gpu.rows, &add_gpu, y_gpu);
  EXPECT_TRUE(NormwiseClose(as_f32(y_gpu), y, "combine", tol));
  Tensor back = Tensor::Empty({t, c}, DType::kF32), back_gpu = PoisonedGpu({t, c}, dtype);
  ops::MoeCombine(ye, cpu.rows, nullptr, back);
  ops::MoeCombine(ye_gpu, gpu.rows, nullptr, back_gpu);
  EXPECT_TRUE(NormwiseClose(as_f32(back_gpu), back, "combine (no addend)", tol));
  // With the thin product a [T, 8] · w [8, C] (the router's input gradient).
  const Tensor a = input({t, 8}, 6), w = input({8, c}, 7);
  Tensor yw = Tensor::Empty({t, c}, DType::kF32), yw_gpu = PoisonedGpu({t, c}, dtype);
  ops::MoeCombine(ye, cpu.rows, &add, yw, &a, &w);
  const Tensor a_gpu = to_gpu(a), w_gpu = to_gpu(w);
  ops::MoeCombine(ye_gpu, gpu.rows, &add_gpu, yw_gpu, &a_gpu, &w_gpu);
  EXPECT_TRUE(NormwiseClose(as_f32(yw_gpu), yw, "combine with a · w", tol));
  // f32 gates moved one value an assignment ([T·k, 1] views, 256 tokens a
  // block): to row order and back (0 where dropped), exact.
  const Tensor gates = RandomTensor({t * 2, 1}, DType::kF32, 5);
  Tensor by_row = Tensor::Empty({s, 1}, DType::kF32), by_row_gpu = PoisonedGpu({s, 1}, DType::kF32);
  ops::MoeGather(gates, cpu.rows.Reshape({t * 2, 1}), by_row);
  ops::MoeGather(ToGpu(gates), gpu.rows.Reshape({t * 2, 1}), by_row_gpu);
  EXPECT_TRUE(NormwiseClose(by_row_gpu, by_row, "gates to rows", 0.0));
  Tensor by_id = Tensor::Empty({t * 2, 1}, DType::kF32), by_id_gpu = PoisonedGpu({t * 2, 1}, DType::kF32);
  ops::MoeCombine(by_row, cpu.rows.Reshape({t * 2, 1}), nullptr, by_id);
  ops::MoeCombine(by_row_gpu, gpu.rows.Reshape({t * 2, 1}), nullptr, by_id_gpu);
  EXPECT_TRUE(NormwiseClose(by_id_gpu, by_id, "rows to gates", 0.0));
}

TEST(GpuMoePermute, MatchesCpu_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckPermute(DType::kF32, false);
}
TEST(GpuMoePermute, MatchesCpu_F32Capacity) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckPermute(DType::kF32, true);
}
TEST(GpuMoePermute, MatchesCpu_Bf16Capacity) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckPermute(DType::kBF16, true);
}

void CheckGroupedLinear(DType dtype) {
  const std::vector<int64_t> rows = {37, 0, 100, 64};
  const int64_t r = 201, in = 72, out = 48;
  auto input = [&](const Shape& shape, uint64_t seed) {
    const Tensor f = RandomTensor(shape, DType::kF32, seed);
    return dtype == DType::kBF16 ? Bf16Rounded(f) : f;
  };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(dtype == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  auto as_f32 = [&](const Tensor& g) { return dtype == DType::kBF16 ? g.To(Device::Cpu()).To(DType::kF32) : g; };
  const Tensor x = input({r, in}, 1), dy = input({r, out}, 2);
  std::vector<Tensor> w, w_gpu, dw, dw_gpu;
  for (size_t g = 0; g < rows.size(); ++g) {
    w.push_back(input({out, in}, 10 + g));
    w_gpu.push_back(to_gpu(w.back()));
    dw.push_back(RandomTensor({out, in}, DType::kF32, 20 + g));  // f32, accumulated onto
    dw_gpu.push_back(ToGpu(dw.back()));
  }
  const std::vector<const Tensor*> wp = ConstPointers(w), wp_gpu = ConstPointers(w_gpu);
  const std::vector<Tensor*> dwp = Pointers(dw), dwp_gpu = Pointers(dw_gpu);
  const double tol = dtype == DType::kBF16 ? 1e-2 : 1e-5;
  const Tensor x_gpu = to_gpu(x);
  Tensor y = Tensor::Empty({r, out}, DType::kF32), y_gpu = PoisonedGpu({r, out}, dtype);
  ops::GroupedLinearForward(x, wp, rows, y);
  ops::GroupedLinearForward(x_gpu, wp_gpu, rows, y_gpu);
  EXPECT_TRUE(NormwiseClose(as_f32(y_gpu), y, "grouped y", tol));
  Tensor dx = Tensor::Empty({r, in}, DType::kF32), dx_gpu = PoisonedGpu({r, in}, dtype);
  ops::GroupedLinearBackward(x, wp, rows, dy, &dx, dwp);
  ops::GroupedLinearBackward(x_gpu, wp_gpu, rows, to_gpu(dy), &dx_gpu, dwp_gpu, false);
  EXPECT_TRUE(NormwiseClose(as_f32(dx_gpu), dx, "grouped dx", tol));
  for (size_t g = 0; g < rows.size(); ++g)  // f32 sums of exact products: f32 agreement
    EXPECT_TRUE(NormwiseClose(dw_gpu[g], dw[g], "grouped dW " + std::to_string(g), 1e-5));

  // The pair form: dy2 = [dya | dyb] rows; Wb_g right after Wa_g and dWb_g
  // right after dWa_g in one buffer each (one dx GEMM of depth 2·out, one dW
  // GEMM of 2·out rows) and each in its own (two GEMMs each).
  const Tensor dy2 = input({r, 2 * out}, 3);
  std::vector<Tensor> wb, dwa, dwb;
  for (size_t g = 0; g < rows.size(); ++g) {
    wb.push_back(input({out, in}, 30 + g));
    dwa.push_back(RandomTensor({out, in}, DType::kF32, 40 + g));
    dwb.push_back(RandomTensor({out, in}, DType::kF32, 50 + g));
  }
  Tensor dx2 = Tensor::Empty({r, in}, DType::kF32);
  ops::GroupedLinearPairBackward(x, wp, ConstPointers(wb), rows, dy2, dx2, Pointers(dwa), Pointers(dwb));
  for (bool adjacent : {true, false}) {
    SCOPED_TRACE(adjacent ? "adjacent pair" : "separate pair");
    std::vector<Tensor> wa_gpu, wb_gpu, dwa_gpu, dwb_gpu;
    // GPU tensors a and b as they are, or copied back to back into one
    // buffer when `adjacent`.
    auto place = [&](const Tensor& a, const Tensor& b, std::vector<Tensor>& at, std::vector<Tensor>& bt) {
      if (!adjacent) {
        at.push_back(a);
        bt.push_back(b);
        return;
      }
      Tensor both = PoisonedGpu({a.dim(0) + b.dim(0), a.dim(1)}, a.dtype());
      at.push_back(both.Slice(0, a.dim(0)));
      bt.push_back(both.Slice(a.dim(0), b.dim(0)));
      at.back().CopyFrom(a);
      bt.back().CopyFrom(b);
    };
    for (size_t g = 0; g < rows.size(); ++g) {
      place(to_gpu(w[g]), to_gpu(wb[g]), wa_gpu, wb_gpu);
      place(ToGpu(RandomTensor({out, in}, DType::kF32, 40 + g)), ToGpu(RandomTensor({out, in}, DType::kF32, 50 + g)),
            dwa_gpu, dwb_gpu);
    }
    Tensor dx2_gpu = PoisonedGpu({r, in}, dtype);
    ops::GroupedLinearPairBackward(x_gpu, ConstPointers(wa_gpu), ConstPointers(wb_gpu), rows, to_gpu(dy2), dx2_gpu,
                                   Pointers(dwa_gpu), Pointers(dwb_gpu));
    EXPECT_TRUE(NormwiseClose(as_f32(dx2_gpu), dx2, "pair dx", tol));
    for (size_t g = 0; g < rows.size(); ++g) {
      EXPECT_TRUE(NormwiseClose(dwa_gpu[g], dwa[g], "pair dWa " + std::to_string(g), 1e-5));
      EXPECT_TRUE(NormwiseClose(dwb_gpu[g], dwb[g], "pair dWb " + std::to_string(g), 1e-5));
    }
  }
}

TEST(GpuGroupedLinear, MatchesCpu_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckGroupedLinear(DType::kF32);
}
TEST(GpuGroupedLinear, MatchesCpu_Bf16) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckGroupedLinear(DType::kBF16);
}

// A whole MoE layer (router, E experts, top-k, shared expert) on the CPU
// (f32) and on the GPU (f32, or bf16 activations with bf16 weight copies),
// from the same f32 master weights (rounded through bf16 for a bf16 run).
// SwiGLU with and without a row scale (each expert row's gate): h, the
// packed [dgate | dup] rows and the rows' dscale. F = 1408 takes the 16-byte
// path, F = 37 the element one.
void CheckSwiglu(DType dtype, int64_t f, bool scaled) {
  SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " F " << f << (scaled ? " scaled" : ""));
  const int64_t rows = 301;
  auto input = [&](const Shape& shape, uint64_t seed) {
    const Tensor v = RandomTensor(shape, DType::kF32, seed, -6, 6);
    return dtype == DType::kBF16 ? Bf16Rounded(v) : v;
  };
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(dtype == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  auto as_f32 = [&](const Tensor& g) { return dtype == DType::kBF16 ? g.To(Device::Cpu()).To(DType::kF32) : g; };
  const double tol = dtype == DType::kBF16 ? 1e-2 : 1e-6;
  const Tensor gate = input({rows, f}, 1), up = input({rows, f}, 2), dh = input({rows, f}, 3);
  const Tensor scale = RandomTensor({rows, 1}, DType::kF32, 4, 0, 1);
  const Tensor gate_gpu = to_gpu(gate), up_gpu = to_gpu(up), scale_gpu = ToGpu(scale);
  Tensor h = Tensor::Empty({rows, f}, DType::kF32), h_gpu = PoisonedGpu({rows, f}, dtype);
  ops::SwigluForward(gate, up, h, scaled ? &scale : nullptr);
  ops::SwigluForward(gate_gpu, up_gpu, h_gpu, scaled ? &scale_gpu : nullptr);
  EXPECT_TRUE(NormwiseClose(as_f32(h_gpu), h, "h", tol));
  Tensor dgu = Tensor::Empty({rows, 2 * f}, DType::kF32), dscale = Tensor::Empty({rows, 1}, DType::kF32);
  Tensor dgu_gpu = PoisonedGpu({rows, 2 * f}, dtype), dscale_gpu = PoisonedGpu({rows, 1}, DType::kF32);
  ops::SwigluBackward(gate, up, dh, dgu, scaled ? &scale : nullptr, scaled ? &dscale : nullptr);
  ops::SwigluBackward(gate_gpu, up_gpu, to_gpu(dh), dgu_gpu, scaled ? &scale_gpu : nullptr,
                      scaled ? &dscale_gpu : nullptr);
  EXPECT_TRUE(NormwiseClose(as_f32(dgu_gpu), dgu, "dgu", tol));
  if (scaled) {
    EXPECT_TRUE(NormwiseClose(dscale_gpu, dscale, "dscale", 1e-5));  // f32 sums of the same f32 products
  }
}

TEST(GpuSwiglu, PackedBackwardMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::kF32, DType::kBF16})
    for (int64_t f : {1408, 37})
      for (bool scaled : {false, true}) CheckSwiglu(dtype, f, scaled);
}

void CheckLayer(DType act, std::vector<std::string> sets) {
  std::vector<std::string> all = {"model.pattern=S", "model.layers=1", "model.hidden=64", "model.heads=2",
                                  "model.kv_heads=2", "model.vocab=64", "train.dtype=f32", "model.init_std=0.3",
                                  "model.moe.moe_ffn=40", "model.moe.shared_experts=1",
                                  "model.moe.aux_loss_coef=0.5", "model.moe.z_loss_coef=0.1",
                                  "train.seq_len=14", "data.recall.pairs=3", "data.recall.queries=3",
                                  "data.recall.key_vocab=8", "data.recall.value_vocab=8"};
  all.insert(all.end(), sets.begin(), sets.end());
  auto config = LoadConfig("", all);
  ASSERT_TRUE(config.ok()) << config.status();
  ModelDims cpu_dims = ModelDims::FromConfig(*config), gpu_dims = cpu_dims;
  gpu_dims.device = Device::Cuda(0);
  gpu_dims.mixed_bf16 = act == DType::kBF16;
  MoeLayer cpu(cpu_dims, "layers.0.moe."), gpu(gpu_dims, "layers.0.moe.");
  ParamList cp, gp;
  cpu.CollectParams(cp);
  gpu.CollectParams(gp);
  ASSERT_EQ(cp.size(), gp.size());
  for (size_t i = 0; i < cp.size(); ++i) {
    if (act == DType::kBF16 && cp[i]->value.ndim() == 2) cp[i]->value = Bf16Rounded(cp[i]->value);
    gp[i]->value = ToGpu(cp[i]->value);
    gp[i]->grad = testing::ToGpu(cp[i]->grad);
  }
  if (act == DType::kBF16) {  // as Model does: one buffer, an expert's w_gate and w_up adjacent
    AllocateComputeCopies(gp, DType::kBF16);
    for (Param* p : gp)
      if (p->value.ndim() == 2) ops::Convert(p->value, p->compute);
  }
  const int64_t t = 300, c = cpu_dims.hidden;
  const Tensor x = act == DType::kBF16 ? Bf16Rounded(RandomTensor({t, c}, DType::kF32, 1))
                                       : RandomTensor({t, c}, DType::kF32, 1);
  const Tensor dy = act == DType::kBF16 ? Bf16Rounded(RandomTensor({t, c}, DType::kF32, 2))
                                        : RandomTensor({t, c}, DType::kF32, 2);
  auto to_gpu = [&](const Tensor& f32) { return ToGpu(act == DType::kBF16 ? f32.To(DType::kBF16) : f32); };
  auto as_f32 = [&](const Tensor& g) { return act == DType::kBF16 ? g.To(Device::Cpu()).To(DType::kF32) : g; };
  const double tol = act == DType::kBF16 ? 2e-2 : 1e-5;
  const Tensor x_gpu = to_gpu(x);
  Tensor y = Tensor::Empty({t, c}, DType::kF32), y_gpu = PoisonedGpu({t, c}, act);
  cpu.Forward(x, y);
  gpu.Forward(x_gpu, y_gpu);
  EXPECT_TRUE(NormwiseClose(as_f32(y_gpu), y, "layer y", tol));
  EXPECT_NEAR(gpu.router_loss(), cpu.router_loss(), (act == DType::kBF16 ? 1e-2 : 1e-5) * cpu.router_loss());
  EXPECT_EQ(gpu.stats().dropped, cpu.stats().dropped);
  EXPECT_EQ(gpu.stats().load_max, cpu.stats().load_max);
  EXPECT_EQ(gpu.stats().load_min, cpu.stats().load_min);
  Tensor dx = Tensor::Empty({t, c}, DType::kF32), dx_gpu = PoisonedGpu({t, c}, act);
  cpu.Backward(x, dy, dx, 0.8);
  gpu.Backward(x_gpu, to_gpu(dy), dx_gpu, 0.8);
  EXPECT_TRUE(NormwiseClose(as_f32(dx_gpu), dx, "layer dx", tol));
  for (size_t i = 0; i < cp.size(); ++i) EXPECT_TRUE(NormwiseClose(gp[i]->grad, cp[i]->grad, cp[i]->name, tol));
}

// k = 2 of 8 in f32: the GPU and CPU logits agree to f32 rounding, so both route alike.
TEST(GpuMoeLayer, MatchesCpu_F32Top2) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer(DType::kF32, {"model.moe.experts=8", "model.moe.top_k=2"});
}
TEST(GpuMoeLayer, MatchesCpu_F32SigmoidCapacityDrops) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer(DType::kF32, {"model.moe.experts=8", "model.moe.top_k=2", "model.moe.router=sigmoid",
                           "model.moe.normalize_top_k=true", "model.moe.capacity_factor=0.8"});
}
// bf16: the GPU's logits are rounded to bf16 and a near tie could route a
// token differently from the CPU's f32 logits, so every expert is chosen
// (k = E): the same assignments, still permuted, gated and cut by capacity.
TEST(GpuMoeLayer, MatchesCpu_Bf16AllExpertsCapacityDrops) {
  LOOM_SKIP_WITHOUT_GPU();
  CheckLayer(DType::kBF16, {"model.moe.experts=4", "model.moe.top_k=4", "model.moe.capacity_factor=0.75"});
}

}  // namespace
}  // namespace loom
