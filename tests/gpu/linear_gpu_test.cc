// cuBLASLt Matmul and Linear against the CPU reference on the same inputs.
// f32 runs must agree to about 1e-5 (true f32, no TF32); bf16 runs take
// bf16-rounded inputs, which the CPU multiplies in f32, and agree to about
// 1e-2 of the output's scale (the output is rounded to bf16), except the f32
// weight gradient, accumulated in f32 from exact bf16 products.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "ops/linear.h"
#include "ops/matmul.h"
#include "ops/stacked_linear.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::AllClose;
using loom::testing::RandomTensor;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;
using loom::testing::CloseToScale;

TEST(GpuMatmul, EveryTransposeMatchesCpuF32) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t m = 37, n = 53, k = 71;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (double beta : {0.0, 0.5}) {
        SCOPED_TRACE(internal::StreamCat("trans_a ", ta, " trans_b ", tb, " beta ", beta));
        const Tensor a = RandomTensor(ta ? Shape{k, m} : Shape{m, k}, DType::kF32, 1);
        const Tensor b = RandomTensor(tb ? Shape{n, k} : Shape{k, n}, DType::kF32, 2);
        Tensor c = RandomTensor({m, n}, DType::kF32, 3);
        Tensor gc = beta == 0 ? PoisonedGpu({m, n}, DType::kF32) : ToGpu(c);
        ops::Matmul(a, ta, b, tb, c, 1.5, beta);
        ops::Matmul(ToGpu(a), ta, ToGpu(b), tb, gc, 1.5, beta);
        EXPECT_TRUE(CloseToScale(gc, c, 1e-5));
      }
    }
  }
}

TEST(GpuMatmul, Bf16IntoBf16AndIntoF32Accumulator) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t m = 64, n = 40, k = 200;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(internal::StreamCat("trans_a ", ta, " trans_b ", tb));
      const Tensor a = RandomTensor(ta ? Shape{k, m} : Shape{m, k}, DType::kBF16, 4);
      const Tensor b = RandomTensor(tb ? Shape{n, k} : Shape{k, n}, DType::kBF16, 5);
      const Tensor c0 = RandomTensor({m, n}, DType::kF32, 6);
      Tensor c = c0.Clone();
      ops::Matmul(a.To(DType::kF32), ta, b.To(DType::kF32), tb, c, 1.0, 1.0);
      Tensor gacc = ToGpu(c0);  // f32 C = D, beta 1: how weight gradients accumulate
      ops::Matmul(ToGpu(a), ta, ToGpu(b), tb, gacc, 1.0, 1.0);
      EXPECT_TRUE(CloseToScale(gacc, c, 1e-5)) << "bf16 x bf16 -> f32 accumulate";

      Tensor plain = Tensor::Empty({m, n}, DType::kF32);
      ops::Matmul(a.To(DType::kF32), ta, b.To(DType::kF32), tb, plain);
      Tensor gout = PoisonedGpu({m, n}, DType::kBF16);
      ops::Matmul(ToGpu(a), ta, ToGpu(b), tb, gout, 1.0, 0.0);
      EXPECT_TRUE(CloseToScale(gout, plain, 1e-2)) << "bf16 x bf16 -> bf16";
    }
  }
}

TEST(GpuMatmul, EmptyInnerDimensionScalesC) {
  LOOM_SKIP_WITHOUT_GPU();
  const Tensor a = Tensor::Empty({5, 0}, DType::kF32), b = Tensor::Empty({0, 7}, DType::kF32);
  Tensor c = RandomTensor({5, 7}, DType::kF32, 7);
  Tensor gc = ToGpu(c), gz = PoisonedGpu({5, 7}, DType::kF32);
  ops::Matmul(a, false, b, false, c, 1.0, 0.25);
  ops::Matmul(ToGpu(a), false, ToGpu(b), false, gc, 1.0, 0.25);
  ops::Matmul(ToGpu(a), false, ToGpu(b), false, gz, 1.0, 0.0);
  EXPECT_TRUE(AllClose(ToCpu(gc), c, 1e-7, 0));
  EXPECT_TRUE(AllClose(ToCpu(gz), Tensor::Zeros({5, 7}, DType::kF32), 0, 0));
}

struct LinearCase {
  int64_t rows, in, out;
  bool accumulate_dx;
};

// x [rows, in], W [out, in]; dW pre-filled (accumulated); dx poisoned or
// pre-filled (accumulate_dx).
void CheckLinear(const LinearCase& c, DType dtype) {
  SCOPED_TRACE(internal::StreamCat(DTypeName(dtype), " rows ", c.rows, " in ", c.in, " out ", c.out,
                                   c.accumulate_dx ? " accumulate_dx" : ""));
  const Tensor x = RandomTensor({c.rows, c.in}, dtype, 11);
  const Tensor w = RandomTensor({c.out, c.in}, dtype, 12);
  const Tensor dy = RandomTensor({c.rows, c.out}, dtype, 13);
  const Tensor dx0 = RandomTensor({c.rows, c.in}, dtype, 14);
  const Tensor dw0 = RandomTensor({c.out, c.in}, DType::kF32, 15);

  // CPU in f32 on the (rounded) inputs.
  const Tensor xf = x.To(DType::kF32), wf = w.To(DType::kF32), dyf = dy.To(DType::kF32);
  Tensor y = Tensor::Empty({c.rows, c.out}, DType::kF32);
  Tensor dx = dx0.To(DType::kF32), dw = dw0.Clone();
  ops::LinearForward(xf, wf, y);
  ops::LinearBackward(xf, wf, dyf, &dx, dw, c.accumulate_dx);

  const Tensor gx = ToGpu(x), gw = ToGpu(w);
  Tensor gy = PoisonedGpu({c.rows, c.out}, dtype);
  Tensor gdx = c.accumulate_dx ? ToGpu(dx0) : PoisonedGpu({c.rows, c.in}, dtype);
  Tensor gdw = ToGpu(dw0);
  ops::LinearForward(gx, gw, gy);
  ops::LinearBackward(gx, gw, ToGpu(dy), &gdx, gdw, c.accumulate_dx);
  // With a residual in the GEMM's epilogue (cuBLASLt's C apart from D).
  const Tensor r = RandomTensor({c.rows, c.out}, dtype, 16), rf = r.To(DType::kF32);
  Tensor y_res = Tensor::Empty({c.rows, c.out}, DType::kF32);
  ops::LinearForward(xf, wf, y_res, &rf);
  Tensor gy_res = PoisonedGpu({c.rows, c.out}, dtype);
  const Tensor gr = ToGpu(r);
  ops::LinearForward(gx, gw, gy_res, &gr);
  const double tol = dtype == DType::kF32 ? 1e-5 : 1e-2;
  EXPECT_TRUE(CloseToScale(gy, y, tol)) << "y";
  EXPECT_TRUE(CloseToScale(gy_res, y_res, tol)) << "y + residual";
  EXPECT_TRUE(CloseToScale(gdx, dx, tol)) << "dx";
  // dW is f32 from exact bf16 products: f32 accuracy in both runs.
  EXPECT_TRUE(CloseToScale(gdw, dw, 1e-5)) << "dW";
}

TEST(GpuLinear, ForwardBackwardMatchCpuF32) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const LinearCase& c : {LinearCase{33, 65, 47, false}, LinearCase{128, 256, 192, true},
                              LinearCase{1, 7, 3, false}, LinearCase{300, 64, 96, true}}) {
    CheckLinear(c, DType::kF32);
  }
}

TEST(GpuLinear, ForwardBackwardMatchCpuBf16) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const LinearCase& c : {LinearCase{33, 64, 48, false}, LinearCase{128, 256, 192, true},
                              LinearCase{5, 24, 8, true}, LinearCase{300, 136, 96, false}}) {
    CheckLinear(c, DType::kBF16);
  }
}

TEST(GpuLinear, NullDxOnlyAccumulatesDw) {
  LOOM_SKIP_WITHOUT_GPU();
  const Tensor x = RandomTensor({20, 16}, DType::kF32, 21), w = RandomTensor({12, 16}, DType::kF32, 22);
  const Tensor dy = RandomTensor({20, 12}, DType::kF32, 23), dw0 = RandomTensor({12, 16}, DType::kF32, 24);
  Tensor dw = dw0.Clone(), gdw = ToGpu(dw0);
  ops::LinearBackward(x, w, dy, nullptr, dw);
  ops::LinearBackward(ToGpu(x), ToGpu(w), ToGpu(dy), nullptr, gdw);
  EXPECT_TRUE(CloseToScale(gdw, dw, 1e-5));
}

// StackedLinear in bf16 (the attention's q, k, v: 4, 1 and 1 blocks of 64
// rows) against the CPU in f32, with the weights and the f32 gradients back
// to back (one GEMM each) and apart (the composite form on the GPU).
TEST(GpuStackedLinear, MatchesCpuStackedOrApart) {
  LOOM_SKIP_WITHOUT_GPU();
  const int64_t rows = 96, in = 128;
  const std::vector<int64_t> out = {256, 64, 64};
  const Tensor x = RandomTensor({rows, in}, DType::kBF16, 31), w = RandomTensor({384, in}, DType::kBF16, 32);
  const Tensor dy = RandomTensor({rows, 384}, DType::kBF16, 33), dw0 = RandomTensor({384, in}, DType::kF32, 34);
  // The CPU in f32 on the rounded inputs.
  const Tensor xf = x.To(DType::kF32), wf = w.To(DType::kF32), dyf = dy.To(DType::kF32);
  Tensor y = Tensor::Empty({rows, 384}, DType::kF32), dx = Tensor::Empty({rows, in}, DType::kF32);
  Tensor dw = dw0.Clone();
  ops::LinearForward(xf, wf, y);
  ops::LinearBackward(xf, wf, dyf, &dx, dw);
  for (const bool stacked : {true, false}) {
    SCOPED_TRACE(stacked ? "back to back" : "apart");
    const Tensor gw_buffer = ToGpu(w);
    Tensor gdw_buffer = ToGpu(dw0);
    std::vector<Tensor> gw, gdw;
    int64_t at = 0;
    for (int64_t o : out) {
      gw.push_back(stacked ? gw_buffer.Slice(at, o) : gw_buffer.Slice(at, o).Clone());
      gdw.push_back(stacked ? gdw_buffer.Slice(at, o) : gdw_buffer.Slice(at, o).Clone());
      at += o;
    }
    ASSERT_EQ(Tensor::Stacked(testing::ConstPointers(gdw)).defined(), stacked);
    Tensor gy = PoisonedGpu({rows, 384}, DType::kBF16), gdx = PoisonedGpu({rows, in}, DType::kBF16);
    ops::StackedLinearForward(ToGpu(x), testing::ConstPointers(gw), gy);
    ops::StackedLinearBackward(ToGpu(x), testing::ConstPointers(gw), ToGpu(dy), &gdx, testing::Pointers(gdw));
    EXPECT_TRUE(CloseToScale(gy, y, 1e-2)) << "y";
    EXPECT_TRUE(CloseToScale(gdx, dx, 1e-2)) << "dx";
    at = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_TRUE(CloseToScale(gdw[i], dw.Slice(at, out[i]), 1e-5)) << "dW block " << i;
      at += out[i];
    }
  }
}

}  // namespace
}  // namespace loom
