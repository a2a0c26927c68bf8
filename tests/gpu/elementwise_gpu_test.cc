// The CUDA element-wise ops (SiLU, SwiGLU, sigmoid gate, AddInPlace) against
// the CPU reference on the same inputs. The activations run the CPU op in
// f64 on the exact f32 or bf16 inputs, so the difference is the GPU's own
// f32 error: a few ulp (rtol 1e-5), plus an absolute 1e-5 where a backward
// cancels (1 + x·σ(−x) → 0 near x = −1.28, with terms up to 6·6 = 36 around
// it: 36 · 2^-24 · a few). bf16 outputs add their final rounding (relative
// 2^-8 = 0.0039; rtol 1e-2). (The f32 CPU op is no oracle at 1e-5 here: its
// 1 − σ(x) loses digits as σ(x) → 1, 2.6e-5 relative at x = 6.)
// Outputs start as NaN, so an element the kernel never writes fails.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "ops/add.h"
#include "ops/sigmoid_gate.h"
#include "ops/silu.h"
#include "ops/swiglu.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::AllClose;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;

constexpr double kF32Rtol = 1e-5, kF32Atol = 1e-5;
constexpr double kBf16Rtol = 1e-2, kBf16Atol = 1e-5;

struct ElementwiseOp {
  const char* name;
  int inputs, outputs;
  std::function<void(const std::vector<Tensor>&, std::vector<Tensor>&)> run;
};

const std::vector<ElementwiseOp>& Ops() {
  static const std::vector<ElementwiseOp> ops = {
      {"SiluForward", 1, 1, [](const auto& in, auto& out) { ops::SiluForward(in[0], out[0]); }},
      {"SiluBackward", 2, 1, [](const auto& in, auto& out) { ops::SiluBackward(in[0], in[1], out[0]); }},
      {"SwigluForward", 2, 1, [](const auto& in, auto& out) { ops::SwigluForward(in[0], in[1], out[0]); }},
      {"SigmoidGateForward", 2, 1,
       [](const auto& in, auto& out) { ops::SigmoidGateForward(in[0], in[1], out[0]); }},
      {"SigmoidGateBackward", 3, 2,
       [](const auto& in, auto& out) { ops::SigmoidGateBackward(in[0], in[1], in[2], out[0], out[1]); }},
  };
  return ops;
}

// Runs `op` on n elements in `dtype` on both devices and compares. With
// `offset` the GPU tensors are views starting `offset` elements into their
// storage (not 16-byte aligned: the element-by-element path).
void ExpectOpMatches(const ElementwiseOp& op, int64_t n, DType dtype, int64_t offset = 0) {
  SCOPED_TRACE(internal::StreamCat(op.name, " n ", n, " ", DTypeName(dtype), " offset ", offset));
  std::vector<Tensor> cpu_in, gpu_in, cpu_out, gpu_out;
  for (int k = 0; k < op.inputs; ++k) {
    const Tensor drawn = testing::RandomTensor({n + offset}, dtype, 11 + k, -6, 6);  // past σ's linear range
    cpu_in.push_back(drawn.To(DType::kF64).Slice(offset, n));
    gpu_in.push_back(ToGpu(drawn).Slice(offset, n));
  }
  for (int k = 0; k < op.outputs; ++k) {
    cpu_out.push_back(Tensor::Empty({n}, DType::kF64));
    gpu_out.push_back(PoisonedGpu({n + offset}, dtype).Slice(offset, n));
  }
  op.run(cpu_in, cpu_out);
  op.run(gpu_in, gpu_out);
  const bool f32 = dtype == DType::kF32;
  for (int k = 0; k < op.outputs; ++k) {
    EXPECT_TRUE(AllClose(ToCpu(gpu_out[k]), cpu_out[k], f32 ? kF32Rtol : kBf16Rtol,
                         f32 ? kF32Atol : kBf16Atol))
        << "output " << k;
  }
}

// Sizes around the 8-element vector: a lone element, a short tail, exact
// vectors, and a large odd size with many grid-stride steps.
constexpr int64_t kSizes[] = {1, 7, 8, 1000, 4099, (1 << 20) + 3};

TEST(GpuElementwise, EveryOpMatchesCpuReference_F32) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  for (const ElementwiseOp& op : Ops())
    for (int64_t n : kSizes) ExpectOpMatches(op, n, DType::kF32);
}

TEST(GpuElementwise, EveryOpMatchesCpuReference_Bf16) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  for (const ElementwiseOp& op : Ops())
    for (int64_t n : kSizes) ExpectOpMatches(op, n, DType::kBF16);
}

TEST(GpuElementwise, UnalignedViewsMatchCpuReference) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  for (const ElementwiseOp& op : Ops()) {
    ExpectOpMatches(op, 1001, DType::kF32, 1);
    ExpectOpMatches(op, 1001, DType::kBF16, 3);
  }
}

// ops/silu.h: y may alias x.
TEST(GpuElementwise, SiluInPlaceMatchesCpuReference) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  const Tensor x = testing::RandomTensor({4099}, DType::kF32, 5, -6, 6);
  Tensor y = Tensor::Empty(x.shape(), DType::kF64);
  ops::SiluForward(x.To(DType::kF64), y);
  Tensor g = ToGpu(x);
  ops::SiluForward(g, g);
  EXPECT_TRUE(AllClose(ToCpu(g), y, kF32Rtol, kF32Atol));
}

// acc += b for the three dtype pairs the GPU takes; the CPU adds in f32 the
// same (rounded) values.
TEST(GpuAddInPlace, MatchesCpuReference) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  struct Case { DType acc, b; };
  for (const Case c : {Case{DType::kF32, DType::kF32}, Case{DType::kBF16, DType::kBF16},
                       Case{DType::kF32, DType::kBF16}}) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(internal::StreamCat(DTypeName(c.acc), " += ", DTypeName(c.b), " n ", n));
      const Tensor acc = testing::RandomTensor({n}, c.acc, 21), b = testing::RandomTensor({n}, c.b, 22);
      Tensor want = acc.To(DType::kF32);
      ops::AddInPlace(want, b.To(DType::kF32));
      Tensor got = ToGpu(acc);
      ops::AddInPlace(got, ToGpu(b));
      const bool f32 = c.acc == DType::kF32;
      EXPECT_TRUE(AllClose(ToCpu(got).To(DType::kF32), want, f32 ? 0 : kBf16Rtol, f32 ? 0 : kBf16Atol))
          << "(f32 accumulators: one f32 addition of the same values, exact)";
    }
  }
}

}  // namespace
}  // namespace loom
