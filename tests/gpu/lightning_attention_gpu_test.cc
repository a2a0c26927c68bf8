// The CUDA lightning attention (ops/cuda/lightning_attention.cu) against the
// CPU reference: the same bf16-rounded inputs, the CPU op run in f32.
//
// Tolerance. The kernels round to bf16 (unit roundoff u = 2^-8) at most
// about four times on any path: the operand the tensor cores read (masked
// scores, the state S or dS, the decayed K or Q of the state update) and the
// bf16 output. Each rounding is an independent relative error of at most u
// on terms that are summed in fp32, so the error of a whole output tensor,
// ‖gpu − ref‖ / ‖ref‖, is a few tenths of u to about u; we require at most
// kRelTol = 1e-2 (2.6 u). No element may be off by more than kMaxTol = 4e-2
// of the tensor's largest magnitude (10 u), which a wrong mask, decay power,
// state or missing tile (errors of order 1) cannot meet. Outputs that the
// op writes are poisoned with NaN first, so an unwritten element fails;
// accumulated outputs start from random values the size of the increment,
// so writing instead of adding fails.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "ops/lightning_attention.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

constexpr double kRelTol = 1e-2;
constexpr double kMaxTol = 4e-2;

using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;
// ‖a − b‖ / ‖b‖ and max |a − b| / max |b| over all elements (a on either device).
::testing::AssertionResult Close(const Tensor& gpu, const Tensor& ref, const char* what) {
  const Tensor a = gpu.device().is_cpu() ? gpu : ToCpu(gpu);
  double diff2 = 0, ref2 = 0, max_diff = 0, max_ref = 0;
  int64_t worst = -1;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.Get(i), y = ref.Get(i), d = std::abs(x - y);
    diff2 += d * d;
    ref2 += y * y;
    max_ref = std::max(max_ref, std::abs(y));
    if (!(d <= max_diff)) {  // NaN lands here too
      max_diff = d;
      worst = i;
    }
  }
  const double rel = std::sqrt(diff2 / std::max(ref2, 1e-300));
  const double max_rel = max_diff / std::max(max_ref, 1e-300);
  if (rel <= kRelTol && max_rel <= kMaxTol && ref2 > 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": ‖Δ‖/‖ref‖ = " << rel << " (tol " << kRelTol
                                       << "), max|Δ|/max|ref| = " << max_rel << " (tol " << kMaxTol
                                       << "), worst element " << worst << ": " << a.Get(worst) << " vs "
                                       << ref.Get(worst) << ", ‖ref‖ = " << std::sqrt(ref2);
}

// An input as the GPU sees it (bf16) and as the CPU reference sees it (the
// same values in f32).
struct Input {
  Tensor gpu, cpu;
};
Input RandomInput(const Shape& shape, uint64_t seed, double scale = 1.0) {
  const Tensor b = testing::RandomTensor(shape, DType::kF32, seed, -scale, scale).To(DType::kBF16);
  return {ToGpu(b), b.To(DType::kF32)};
}
Input RandomState(const Shape& shape, uint64_t seed, double scale = 1.0) {
  const Tensor f = testing::RandomTensor(shape, DType::kF32, seed, -scale, scale);
  return {ToGpu(f), f};
}
double Rms(const Tensor& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += t.Get(i) * t.Get(i);
  return std::sqrt(s / std::max<int64_t>(t.numel(), 1));
}

// Per-head decays: DESIGN.md's ALiBi family (λ from 0.78 to 0.996 at H = 4),
// or plain linear attention.
Input Decay(int64_t heads, bool lambda_one) {
  std::vector<float> lam(heads, 1.0f);
  if (!lambda_one) {
    const std::vector<double> d = ops::LightningDecay(static_cast<int>(heads), 0, 1);
    for (int64_t h = 0; h < heads; ++h) lam[h] = static_cast<float>(d[h]);
  }
  const Tensor c = Tensor::FromVector(lam, {heads});
  return {ToGpu(c), c};
}

ops::TokenRows Rows(const std::vector<int32_t>& cu) {
  return {Tensor::FromVector(cu, {static_cast<int64_t>(cu.size())}), Tensor()};
}

struct FusedCase {
  std::string name;
  int64_t d;
  bool lambda_one;
  std::vector<int32_t> cu;
  bool states;  // state_in and d_state_out given
};

std::vector<FusedCase> FusedCases() {
  // 1,024-token segments and 64-token chunks: 2,500 spans three segments and
  // ends mid-chunk; the varlen rows hold 1, 64, 1,235, 0 and 1,700 tokens.
  const std::vector<int32_t> varlen{0, 1, 65, 1300, 1300, 3000};
  return {
      {"D64_decay_two_rows", 64, false, {0, 300, 600}, false},
      {"D128_decay_states", 128, false, {0, 2500}, true},
      {"D128_lambda1_states", 128, true, {0, 1100, 2200}, true},
      {"D64_lambda1_varlen_states", 64, true, varlen, true},
      {"D128_decay_varlen_states", 128, false, varlen, true},
      {"D64_decay_varlen", 64, false, varlen, false},
  };
}

class GpuLightningFused : public ::testing::TestWithParam<FusedCase> {};

// Forward (o, state_out) and backward (dq, dk, dv, d_state_in) of the fused
// call, one workspace shared by every case so that re-planning is exercised.
TEST_P(GpuLightningFused, MatchesCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  static ops::cuda::LightningWorkspace workspace;
  const FusedCase& c = GetParam();
  const int64_t heads = 4, t = c.cu.back(), r = static_cast<int64_t>(c.cu.size()) - 1;
  const Shape x_shape{t, heads, c.d}, s_shape{r, heads, c.d, c.d};
  const Input q = RandomInput(x_shape, 11), k = RandomInput(x_shape, 12), v = RandomInput(x_shape, 13);
  const Input d_o = RandomInput(x_shape, 14), lam = Decay(heads, c.lambda_one);
  const Input s_in = c.states ? RandomState(s_shape, 15) : Input{};
  const Input ds_out = c.states ? RandomState(s_shape, 16) : Input{};
  const ops::TokenRows rows = Rows(c.cu);

  Tensor o, s_out, dq, dk, dv, ds_in = c.states ? Tensor::Empty(s_shape, DType::kF32) : Tensor();
  ops::LightningAttentionForward(q.cpu, k.cpu, v.cpu, lam.cpu, rows, {}, s_in.cpu, o, s_out);
  ops::LightningAttentionBackward(q.cpu, k.cpu, v.cpu, lam.cpu, rows, {}, s_in.cpu, d_o.cpu, ds_out.cpu, dq, dk,
                                  dv, ds_in);

  Tensor go = PoisonedGpu(x_shape, DType::kBF16), gs_out = PoisonedGpu(s_shape, DType::kF32);
  Tensor gdq = PoisonedGpu(x_shape, DType::kBF16), gdk = PoisonedGpu(x_shape, DType::kBF16);
  Tensor gdv = PoisonedGpu(x_shape, DType::kBF16);
  Tensor gds_in = c.states ? PoisonedGpu(s_shape, DType::kF32) : Tensor();
  ops::cuda::LightningAttentionForward(q.gpu, k.gpu, v.gpu, lam.gpu, rows, s_in.gpu, go, gs_out, workspace, nullptr);
  ops::cuda::LightningAttentionBackward(q.gpu, k.gpu, v.gpu, lam.gpu, rows, s_in.gpu, d_o.gpu, ds_out.gpu, gdq, gdk,
                                        gdv, gds_in, workspace, nullptr);
  CudaSynchronize();
  EXPECT_TRUE(Close(go, o, "o"));
  EXPECT_TRUE(Close(gs_out, s_out, "state_out"));
  EXPECT_TRUE(Close(gdq, dq, "dq"));
  EXPECT_TRUE(Close(gdk, dk, "dk"));
  EXPECT_TRUE(Close(gdv, dv, "dv"));
  if (c.states) {
    EXPECT_TRUE(Close(gds_in, ds_in, "d_state_in"));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuLightningFused, ::testing::ValuesIn(FusedCases()),
                         [](const auto& info) { return info.param.name; });

// The forward through ops::LightningAttentionForward on CUDA tensors (the
// device dispatch, outputs allocated by the op) equals the direct call.
TEST(GpuLightning, DispatchOnDeviceMatchesCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape shape{700, 2, 128};
  const Input q = RandomInput(shape, 21), k = RandomInput(shape, 22), v = RandomInput(shape, 23);
  const Input lam = Decay(2, false);
  const ops::TokenRows rows = Rows({0, 200, 700});
  Tensor o, s, go, gs;
  ops::LightningAttentionForward(q.cpu, k.cpu, v.cpu, lam.cpu, rows, {}, Tensor(), o, s);
  ops::LightningAttentionForward(q.gpu, k.gpu, v.gpu, lam.gpu, rows, {}, Tensor(), go, gs);
  CudaSynchronize();
  EXPECT_TRUE(Close(go, o, "o"));
  EXPECT_TRUE(Close(gs, s, "state_out"));
}

// Rows with documents inside them (a packed text batch): the dispatch runs
// each document as a row of its own; forward and backward with initial
// states against the CPU's fused calls over doc_ids, bf16 and f32 kernels.
TEST(GpuLightning, DocumentsInsideRowsMatchCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape shape{700, 2, 64}, s_shape{2, 2, 64, 64};
  std::vector<int32_t> ids(700);
  for (int t = 0; t < 700; ++t) ids[t] = t < 200 ? (t < 70 ? 0 : t < 71 ? 1 : 2) : (t < 450 ? 0 : 1);
  ops::TokenRows rows = Rows({0, 200, 700});
  rows.doc_ids = Tensor::FromVector(ids, {700});
  const Input q = RandomInput(shape, 31), k = RandomInput(shape, 32), v = RandomInput(shape, 33);
  const Input d_o = RandomInput(shape, 34), lam = Decay(2, false);
  const Input s_in = RandomState(s_shape, 35), ds_out = RandomState(s_shape, 36);
  Tensor o, s, dq, dk, dv, ds_in = Tensor::Empty(s_shape, DType::kF32);
  ops::LightningAttentionForward(q.cpu, k.cpu, v.cpu, lam.cpu, rows, {}, s_in.cpu, o, s);
  ops::LightningAttentionBackward(q.cpu, k.cpu, v.cpu, lam.cpu, rows, {}, s_in.cpu, d_o.cpu, ds_out.cpu, dq, dk, dv,
                                  ds_in);
  for (const bool bf16 : {true, false}) {
    SCOPED_TRACE(bf16 ? "bf16" : "f32");
    const auto dev = [&](const Input& x) { return bf16 ? x.gpu : ToGpu(x.cpu); };
    Tensor go, gs, gdq, gdk, gdv, gds_in = PoisonedGpu(s_shape, DType::kF32);
    ops::LightningAttentionForward(dev(q), dev(k), dev(v), lam.gpu, rows, {}, s_in.gpu, go, gs);
    ops::LightningAttentionBackward(dev(q), dev(k), dev(v), lam.gpu, rows, {}, s_in.gpu, dev(d_o), ds_out.gpu, gdq,
                                    gdk, gdv, gds_in);
    CudaSynchronize();
    EXPECT_TRUE(Close(go, o, "o"));
    EXPECT_TRUE(Close(gs, s, "state_out"));
    EXPECT_TRUE(Close(gdq, dq, "dq"));
    EXPECT_TRUE(Close(gdk, dk, "dk"));
    EXPECT_TRUE(Close(gdv, dv, "dv"));
    EXPECT_TRUE(Close(gds_in, ds_in, "d_state_in"));
  }
}

// LASP's chunk phases through the ops on a chunk with documents inside it
// (run on token ranges on the GPU) against the CPU's phases over doc_ids;
// outputs from zero (accumulated ones allocated by the ops).
TEST(GpuLightning, PhasesWithDocumentsMatchCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  const Shape shape{600, 2, 64}, s_shape{2, 64, 64};
  std::vector<int32_t> ids(600);
  for (int t = 0; t < 600; ++t) ids[t] = t < 130 ? 0 : t < 131 ? 1 : t < 500 ? 2 : 3;
  const Tensor docs = Tensor::FromVector(ids, {600});
  const Input q = RandomInput(shape, 41), k = RandomInput(shape, 42), v = RandomInput(shape, 43);
  const Input d_o = RandomInput(shape, 44), lam = Decay(2, false), s = RandomState(s_shape, 45),
              dm = RandomState(s_shape, 46);
  Tensor m, o, inter, dk, dv, dq, dq2, ds;
  ops::LightningChunkState(k.cpu, v.cpu, lam.cpu, docs, m);
  ops::LightningIntraChunk(q.cpu, k.cpu, v.cpu, lam.cpu, docs, o);
  ops::LightningInterChunk(q.cpu, lam.cpu, docs, s.cpu, inter);
  ops::LightningChunkStateBackward(k.cpu, v.cpu, lam.cpu, docs, dm.cpu, dk, dv);
  ops::LightningIntraChunkBackward(q.cpu, k.cpu, v.cpu, lam.cpu, docs, d_o.cpu, dq, dk, dv);
  ops::LightningInterChunkBackward(q.cpu, lam.cpu, docs, s.cpu, d_o.cpu, dq2, ds);
  Tensor gm, go, ginter, gdk, gdv, gdq, gdq2, gds;
  EXPECT_TRUE(ops::LightningChunkState(k.gpu, v.gpu, lam.gpu, docs, gm));
  ops::LightningIntraChunk(q.gpu, k.gpu, v.gpu, lam.gpu, docs, go);
  ops::LightningInterChunk(q.gpu, lam.gpu, docs, s.gpu, ginter);
  ops::LightningChunkStateBackward(k.gpu, v.gpu, lam.gpu, docs, dm.gpu, gdk, gdv);
  ops::LightningIntraChunkBackward(q.gpu, k.gpu, v.gpu, lam.gpu, docs, d_o.gpu, gdq, gdk, gdv);
  ops::LightningInterChunkBackward(q.gpu, lam.gpu, docs, s.gpu, d_o.gpu, gdq2, gds);
  CudaSynchronize();
  EXPECT_TRUE(Close(gm, m, "m"));
  EXPECT_TRUE(Close(go, o, "intra o"));
  EXPECT_TRUE(Close(ginter, inter, "inter o"));
  EXPECT_TRUE(Close(gdq, dq, "intra dq"));
  EXPECT_TRUE(Close(gdk, dk, "dk"));
  EXPECT_TRUE(Close(gdv, dv, "dv"));
  EXPECT_TRUE(Close(gdq2, dq2, "inter dq"));
  EXPECT_TRUE(Close(gds, ds, "ds"));
}

// ---- The phases LASP needs, on one chunk of C tokens (spanning segments) ----

struct PhaseCase {
  std::string name;
  int64_t d;
  bool lambda_one;
  int64_t c;
};

class GpuLightningPhases : public ::testing::TestWithParam<PhaseCase> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) return;
    const PhaseCase& p = GetParam();
    shape = {p.c, heads, p.d};
    s_shape = {heads, p.d, p.d};
    q = RandomInput(shape, 31);
    k = RandomInput(shape, 32);
    v = RandomInput(shape, 33);
    d_o = RandomInput(shape, 34);
    lam = Decay(heads, p.lambda_one);
  }
  // An accumulator's start: random values of the increment's size, bf16 on
  // the GPU (f32 copy for the reference) or f32 for states.
  Input Start(const Tensor& increment, uint64_t seed, DType gpu_dtype) const {
    const double scale = std::max(Rms(increment), 1e-3);
    return gpu_dtype == DType::kBF16 ? RandomInput(increment.shape(), seed, scale)
                                     : RandomState(increment.shape(), seed, scale);
  }
  static Tensor Plus(const Tensor& a, const Tensor& b) {
    Tensor s = Tensor::Empty(a.shape(), DType::kF32);
    for (int64_t i = 0; i < a.numel(); ++i) s.data<float>()[i] = static_cast<float>(a.Get(i) + b.Get(i));
    return s;
  }

  const int64_t heads = 3;
  Shape shape, s_shape;
  Input q, k, v, d_o, lam;
  ops::cuda::LightningWorkspace workspace;
};

TEST_P(GpuLightningPhases, ChunkStateMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor m;
  ops::LightningChunkState(k.cpu, v.cpu, lam.cpu, Tensor(), m);
  Tensor gm = PoisonedGpu(s_shape, DType::kF32);
  EXPECT_FALSE(ops::cuda::LightningChunkState(k.gpu, v.gpu, lam.gpu, Tensor(), gm, workspace, nullptr));
  CudaSynchronize();
  EXPECT_TRUE(Close(gm, m, "m"));
}

TEST_P(GpuLightningPhases, ChunkStateBackwardAccumulatesLikeCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  const Input dm = RandomState(s_shape, 41);
  Tensor dk, dv;  // the increments alone
  ops::LightningChunkStateBackward(k.cpu, v.cpu, lam.cpu, Tensor(), dm.cpu, dk, dv);
  const Input dk0 = Start(dk, 42, DType::kBF16), dv0 = Start(dv, 43, DType::kBF16);
  Tensor gdk = dk0.gpu.Clone(), gdv = dv0.gpu.Clone();
  ops::cuda::LightningChunkStateBackward(k.gpu, v.gpu, lam.gpu, Tensor(), dm.gpu, gdk, gdv, workspace, nullptr);
  CudaSynchronize();
  EXPECT_TRUE(Close(gdk, Plus(dk0.cpu, dk), "dk"));
  EXPECT_TRUE(Close(gdv, Plus(dv0.cpu, dv), "dv"));
}

TEST_P(GpuLightningPhases, IntraChunkMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor o;
  ops::LightningIntraChunk(q.cpu, k.cpu, v.cpu, lam.cpu, Tensor(), o);
  Tensor go = PoisonedGpu(shape, DType::kBF16);
  ops::cuda::LightningIntraChunk(q.gpu, k.gpu, v.gpu, lam.gpu, Tensor(), go, workspace, nullptr);
  CudaSynchronize();
  EXPECT_TRUE(Close(go, o, "o"));
}

TEST_P(GpuLightningPhases, IntraChunkBackwardAccumulatesLikeCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor dq, dk, dv;
  ops::LightningIntraChunkBackward(q.cpu, k.cpu, v.cpu, lam.cpu, Tensor(), d_o.cpu, dq, dk, dv);
  const Input dq0 = Start(dq, 51, DType::kBF16), dk0 = Start(dk, 52, DType::kBF16), dv0 = Start(dv, 53, DType::kBF16);
  Tensor gdq = dq0.gpu.Clone(), gdk = dk0.gpu.Clone(), gdv = dv0.gpu.Clone();
  ops::cuda::LightningIntraChunkBackward(q.gpu, k.gpu, v.gpu, lam.gpu, Tensor(), d_o.gpu, gdq, gdk, gdv, workspace,
                                         nullptr);
  CudaSynchronize();
  EXPECT_TRUE(Close(gdq, Plus(dq0.cpu, dq), "dq"));
  EXPECT_TRUE(Close(gdk, Plus(dk0.cpu, dk), "dk"));
  EXPECT_TRUE(Close(gdv, Plus(dv0.cpu, dv), "dv"));
}

TEST_P(GpuLightningPhases, InterChunkAccumulatesLikeCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  const Input s = RandomState(s_shape, 61);
  Tensor o;
  ops::LightningInterChunk(q.cpu, lam.cpu, Tensor(), s.cpu, o);
  const Input o0 = Start(o, 62, DType::kBF16);
  Tensor go = o0.gpu.Clone();
  ops::cuda::LightningInterChunk(q.gpu, lam.gpu, Tensor(), s.gpu, go, nullptr);
  CudaSynchronize();
  EXPECT_TRUE(Close(go, Plus(o0.cpu, o), "o"));
}

TEST_P(GpuLightningPhases, InterChunkBackwardAccumulatesLikeCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  const Input s = RandomState(s_shape, 71);
  Tensor dq, ds;
  ops::LightningInterChunkBackward(q.cpu, lam.cpu, Tensor(), s.cpu, d_o.cpu, dq, ds);
  const Input dq0 = Start(dq, 72, DType::kBF16), ds0 = Start(ds, 73, DType::kF32);
  Tensor gdq = dq0.gpu.Clone(), gds = ds0.gpu.Clone();
  ops::cuda::LightningInterChunkBackward(q.gpu, lam.gpu, Tensor(), s.gpu, d_o.gpu, gdq, gds, workspace, nullptr);
  CudaSynchronize();
  EXPECT_TRUE(Close(gdq, Plus(dq0.cpu, dq), "dq"));
  EXPECT_TRUE(Close(gds, Plus(ds0.cpu, ds), "ds"));
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuLightningPhases,
                         ::testing::Values(PhaseCase{"D64_decay_C1500", 64, false, 1500},
                                           PhaseCase{"D128_decay_C2100", 128, false, 2100},
                                           PhaseCase{"D128_lambda1_C700", 128, true, 700},
                                           PhaseCase{"D64_lambda1_C64", 64, true, 64}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace loom
