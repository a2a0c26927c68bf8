// CUDA AdamW and gradient norms against the CPU (optim/adamw.cc) on the same
// inputs: single-tensor updates (also on a view into a flat buffer, as
// parallel/data_parallel.cc uses them), the multi-tensor AdamW::Step with
// decay and no-decay parameters of odd sizes and bf16 compute copies, and
// fixed-order Σ g² that repeats its bits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "optim/adamw.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::AllClose;
using loom::testing::RandomTensor;
using loom::testing::ToCpu;
using loom::testing::ToGpu;

TEST(GpuAdamW, SingleTensorUpdateMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  const AdamWOptions options;
  for (int64_t n : {1, 1000, 100003}) {
    SCOPED_TRACE(internal::StreamCat("n ", n));
    Tensor p = RandomTensor({n}, DType::kF32, 1), m = Tensor::Zeros({n}, DType::kF32),
           v = Tensor::Zeros({n}, DType::kF32);
    Tensor gp = ToGpu(p), gm = ToGpu(m), gv = ToGpu(v);
    for (int step = 1; step <= 3; ++step) {
      const Tensor g = RandomTensor({n}, DType::kF32, 10 + step, -0.1, 0.1);
      AdamWUpdate(p, g, m, v, 1e-3, 0.1, step, options);
      AdamWUpdate(gp, ToGpu(g), gm, gv, 1e-3, 0.1, step, options);
    }
    EXPECT_TRUE(AllClose(ToCpu(gp), p, 1e-6, 0)) << "p";
    EXPECT_TRUE(AllClose(ToCpu(gm), m, 1e-6, 0)) << "m";
    EXPECT_TRUE(AllClose(ToCpu(gv), v, 1e-6, 0)) << "v";
  }
}

// data_parallel.cc updates slices of flat buffers: the view starts mid-buffer
// and the rest of the buffer must stay as it was.
TEST(GpuAdamW, UpdateOnFlatBufferViewTouchesOnlyTheView) {
  LOOM_SKIP_WITHOUT_GPU();
  const AdamWOptions options;
  const int64_t total = 5000, start = 1237, len = 2001;
  const Tensor p0 = RandomTensor({total}, DType::kF32, 2), g = RandomTensor({total}, DType::kF32, 3);
  const Tensor m0 = RandomTensor({total}, DType::kF32, 4, -0.01, 0.01), v0 = RandomTensor({total}, DType::kF32, 5, 0, 0.01);
  Tensor p = p0.Clone(), m = m0.Clone(), v = v0.Clone();
  Tensor gp = ToGpu(p0), gg = ToGpu(g), gm = ToGpu(m0), gv = ToGpu(v0);
  Tensor ps = p.Slice(start, len), ms = m.Slice(start, len), vs = v.Slice(start, len);
  Tensor gps = gp.Slice(start, len), gms = gm.Slice(start, len), gvs = gv.Slice(start, len);
  AdamWUpdate(ps, g.Slice(start, len), ms, vs, 3e-4, 0.0, 7, options);
  AdamWUpdate(gps, gg.Slice(start, len), gms, gvs, 3e-4, 0.0, 7, options);
  EXPECT_TRUE(AllClose(ToCpu(gp), p, 1e-6, 0)) << "p";
  EXPECT_TRUE(AllClose(ToCpu(gm), m, 1e-6, 0)) << "m";
  EXPECT_TRUE(AllClose(ToCpu(gv), v, 1e-6, 0)) << "v";
}

// A CPU parameter and its GPU twin (same value; gradients set per step).
struct Twin {
  Param cpu, gpu;
};

TEST(GpuAdamW, MultiTensorStepMatchesCpuAndWritesBf16Copies) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Spec { int64_t rows, cols; bool decay, compute; };
  // Sizes around the 65,536-element chunk: one element, odd, exactly one
  // chunk, a chunk and a bit, several chunks.
  const Spec specs[] = {{1, 1, false, false}, {17, 3, true, true},   {256, 256, true, true},
                        {257, 256, false, true}, {3, 65537, true, false}, {600, 700, true, true}};
  std::vector<std::unique_ptr<Twin>> twins;
  ParamList cpu_params, gpu_params;
  for (size_t i = 0; i < std::size(specs); ++i) {
    const Spec& s = specs[i];
    auto t = std::make_unique<Twin>();
    t->cpu.Init("p" + std::to_string(i), {s.rows, s.cols}, DType::kF32, 9, 0.02, 0, s.decay);
    t->gpu.name = t->cpu.name;
    t->gpu.value = ToGpu(t->cpu.value);
    t->gpu.grad = ToGpu(t->cpu.grad);
    t->gpu.weight_decay = s.decay;
    if (s.compute) {
      Tensor nan = Tensor::Empty({s.rows, s.cols}, DType::kBF16);
      nan.Fill(std::numeric_limits<double>::quiet_NaN());
      t->gpu.compute = ToGpu(nan);
    }
    cpu_params.push_back(&t->cpu);
    gpu_params.push_back(&t->gpu);
    twins.push_back(std::move(t));
  }
  AdamWOptions options;
  options.weight_decay = 0.1;
  AdamW cpu_opt(cpu_params, options), gpu_opt(gpu_params, options);
  for (int step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < twins.size(); ++i) {
      const Tensor g = RandomTensor(twins[i]->cpu.value.shape(), DType::kF32, 100 * step + i, -0.05, 0.05);
      twins[i]->cpu.grad.CopyFrom(g);
      twins[i]->gpu.grad.CopyFrom(g);
    }
    cpu_opt.Step(1e-3 * step);
    gpu_opt.Step(1e-3 * step);
    if (step == 2) {
      // New moment tensors (as a checkpoint load may give): the device table
      // must follow the new pointers.
      gpu_opt.first_moments()[1] = ToGpu(ToCpu(gpu_opt.first_moments()[1]));
      gpu_opt.second_moments()[5] = ToGpu(ToCpu(gpu_opt.second_moments()[5]));
    }
  }
  for (size_t i = 0; i < twins.size(); ++i) {
    SCOPED_TRACE(twins[i]->cpu.name);
    const Tensor value = ToCpu(twins[i]->gpu.value);
    EXPECT_TRUE(AllClose(value, twins[i]->cpu.value, 1e-6, 0)) << "value";
    EXPECT_TRUE(AllClose(ToCpu(gpu_opt.first_moments()[i]), cpu_opt.first_moments()[i], 1e-6, 0)) << "m";
    EXPECT_TRUE(AllClose(ToCpu(gpu_opt.second_moments()[i]), cpu_opt.second_moments()[i], 1e-6, 0)) << "v";
    if (!specs[i].compute) continue;
    // The copy is bf16(new value) exactly: round the GPU's own value.
    EXPECT_TRUE(AllClose(ToCpu(twins[i]->gpu.compute), value.To(DType::kBF16), 0, 0)) << "compute";
  }
}

TEST(GpuGradNorm, SumSquaresRepeatsItsBitsAndMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  for (int64_t n : {1, 255, 1 << 20, 3000001}) {
    SCOPED_TRACE(internal::StreamCat("n ", n));
    const Tensor g = RandomTensor({n}, DType::kF32, 50 + n);
    const Tensor gg = ToGpu(g);
    const double want = SumSquares(g), first = SumSquares(gg);
    for (int run = 0; run < 3; ++run) {
      const double again = SumSquares(gg);
      EXPECT_EQ(std::memcmp(&again, &first, sizeof(double)), 0) << again << " vs first run " << first;
    }
    EXPECT_LE(std::abs(first - want), 1e-6 * want) << first << " vs CPU " << want << " (rtol 1e-6)";
  }
}

TEST(GpuGradNorm, GlobalNormAndClipMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  std::vector<std::unique_ptr<Twin>> twins;
  ParamList cpu_params, gpu_params;
  for (int64_t i = 0; i < 4; ++i) {
    auto t = std::make_unique<Twin>();
    const Shape shape{3 + 50 * i, 7 + 31 * i};
    t->cpu.Init("g" + std::to_string(i), shape, DType::kF32, 1, 0.02);
    t->cpu.grad.CopyFrom(RandomTensor(shape, DType::kF32, 60 + i));
    t->gpu.value = ToGpu(t->cpu.value);
    t->gpu.grad = ToGpu(t->cpu.grad);
    cpu_params.push_back(&t->cpu);
    gpu_params.push_back(&t->gpu);
    twins.push_back(std::move(t));
  }
  const double want = GlobalGradNorm(cpu_params), got = GlobalGradNorm(gpu_params);
  EXPECT_LE(std::abs(got - want), 1e-6 * want) << got << " vs CPU " << want << " (rtol 1e-6)";
  const double max_norm = 0.25 * want;
  const double cpu_before = ClipGradNorm(cpu_params, max_norm), gpu_before = ClipGradNorm(gpu_params, max_norm);
  EXPECT_LE(std::abs(gpu_before - cpu_before), 1e-6 * cpu_before);
  for (size_t i = 0; i < twins.size(); ++i) {
    EXPECT_TRUE(AllClose(ToCpu(twins[i]->gpu.grad), twins[i]->cpu.grad, 1e-6, 0)) << "clipped grad " << i;
  }
  EXPECT_LE(std::abs(GlobalGradNorm(gpu_params) - max_norm), 1e-5 * max_norm) << "norm after clipping";
}

}  // namespace
}  // namespace loom
