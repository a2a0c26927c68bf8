// The CUDA RMSNorm against the CPU reference on the same inputs. On the GPU
// w, dw and rstd are f32 whatever x is; the CPU reference runs in f32 (for
// bf16, on the inputs rounded to bf16), so bf16 outputs differ by their final
// rounding (relative 2^-8; tolerance 1e-2) and f32 results by f32 sums
// against the CPU's f64 ones. Outputs start as NaN; dw starts filled and is
// accumulated.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "ops/rmsnorm.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::AllClose;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;

struct Case {
  int64_t rows, d;
  bool weight;
};
// Odd widths (scalar path: 37, 4097), vector widths (96, 1024, 2048), a
// per-head view [N·H, Dh] = [256·4, 128] with w [Dh], many rows per block
// (3000 × 64), a width that leaves fewer than 8 warps a block for the dw
// partial rows in shared memory (12288), no weight.
constexpr Case kCases[] = {{37, 96, true},   {5, 1024, true},    {64, 32, false}, {3, 4097, true},
                           {11, 37, true},   {1024, 128, true},  {3000, 64, true}, {16, 2048, true},
                           {5, 12288, true}, {300, 2048, false}};

void ExpectMatches(const Case& c, DType dtype) {
  SCOPED_TRACE(internal::StreamCat(DTypeName(dtype), " rows ", c.rows, " d ", c.d, c.weight ? "" : " no weight"));
  const bool f32 = dtype == DType::kF32;
  const Tensor x = testing::RandomTensor({c.rows, c.d}, dtype, 1);
  const Tensor dy = testing::RandomTensor({c.rows, c.d}, dtype, 2);
  const Tensor w = c.weight ? testing::RandomTensor({c.d}, DType::kF32, 3, 0.5, 1.5) : Tensor();
  const Tensor dw0 = testing::RandomTensor({c.d}, DType::kF32, 4);
  const Tensor add = testing::RandomTensor({c.rows, c.d}, dtype, 5);  // a residual's gradient

  const Tensor cx = x.To(DType::kF32), cdy = dy.To(DType::kF32), cadd = add.To(DType::kF32);
  Tensor y = Tensor::Empty(x.shape(), DType::kF32), rstd = Tensor::Empty({c.rows}, DType::kF32);
  Tensor dx = Tensor::Empty(x.shape(), DType::kF32), dw = dw0.Clone();
  ops::RmsNormForward(cx, w, 1e-5, y, rstd);
  ops::RmsNormBackward(cx, w, rstd, cdy, dx, dw);
  Tensor dx_add = Tensor::Empty(x.shape(), DType::kF32), dw_add = dw0.Clone();
  ops::RmsNormBackward(cx, w, rstd, cdy, dx_add, dw_add, &cadd);

  const Tensor gw = c.weight ? ToGpu(w) : Tensor();
  const Tensor gx = ToGpu(x);
  Tensor gy = PoisonedGpu(x.shape(), dtype), grstd = PoisonedGpu({c.rows}, DType::kF32), gdx = PoisonedGpu(x.shape(), dtype);
  Tensor gdw = ToGpu(dw0);
  ops::RmsNormForward(gx, gw, 1e-5, gy, grstd);
  ops::RmsNormBackward(gx, gw, grstd, ToGpu(dy), gdx, gdw);
  Tensor gdx_add = ToGpu(add), gdw_add = ToGpu(dw0);  // dx = add's own buffer: summed in place
  ops::RmsNormBackward(gx, gw, grstd, ToGpu(dy), gdx_add, gdw_add, &gdx_add);
  // f32: sums of D products in f32 (vs f64) move r by ~1e-7 relative; dx has
  // a cancellation (g − x·c), hence its absolute floor.
  EXPECT_TRUE(AllClose(ToCpu(grstd), rstd, 1e-5, 1e-6)) << "rstd";
  EXPECT_TRUE(AllClose(ToCpu(gy).To(DType::kF32), y, f32 ? 1e-5 : 1e-2, 1e-6)) << "y";
  EXPECT_TRUE(AllClose(ToCpu(gdx).To(DType::kF32), dx, f32 ? 1e-4 : 1e-2, f32 ? 1e-5 : 1e-4)) << "dx";
  EXPECT_TRUE(AllClose(ToCpu(gdx_add).To(DType::kF32), dx_add, f32 ? 1e-4 : 1e-2, f32 ? 1e-5 : 1e-4)) << "dx + add";
  // dw: f32 in both runs; Σ over up to 3000 rows in f32 (GPU) vs f64 (CPU).
  if (c.weight) {
    EXPECT_TRUE(AllClose(ToCpu(gdw), dw, 1e-4, 1e-4)) << "dw";
  } else {
    EXPECT_TRUE(AllClose(ToCpu(gdw), dw0, 0, 0)) << "dw without a weight is left alone";
  }
}

TEST(GpuRmsNorm, MatchesCpuReference_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const Case& c : kCases) ExpectMatches(c, DType::kF32);
}

TEST(GpuRmsNorm, MatchesCpuReference_Bf16) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const Case& c : kCases) ExpectMatches(c, DType::kBF16);
}

// The same backward twice from the same dw gives the same bits (dw and dx).
TEST(GpuRmsNorm, BackwardIsBitwiseDeterministic) {
  LOOM_SKIP_WITHOUT_GPU();
  constexpr int64_t kRows = 4096, kD = 2048;
  const Tensor gx = ToGpu(testing::RandomTensor({kRows, kD}, DType::kBF16, 1));
  const Tensor gdy = ToGpu(testing::RandomTensor({kRows, kD}, DType::kBF16, 2));
  const Tensor gw = ToGpu(testing::RandomTensor({kD}, DType::kF32, 3, 0.5, 1.5));
  const Tensor dw0 = testing::RandomTensor({kD}, DType::kF32, 4);
  Tensor y = Tensor::Empty({kRows, kD}, DType::kBF16, Device::Cuda(0));
  Tensor rstd = Tensor::Empty({kRows}, DType::kF32, Device::Cuda(0));
  ops::RmsNormForward(gx, gw, 1e-5, y, rstd);
  Tensor dx[2], dw[2];
  for (int run = 0; run < 2; ++run) {
    dx[run] = Tensor::Empty({kRows, kD}, DType::kBF16, Device::Cuda(0));
    dw[run] = ToGpu(dw0);
    ops::RmsNormBackward(gx, gw, rstd, gdy, dx[run], dw[run]);
  }
  const Tensor a = ToCpu(dw[0]), b = ToCpu(dw[1]), da = ToCpu(dx[0]), db = ToCpu(dx[1]);
  int64_t differ = 0, first = -1;
  for (int64_t i = 0; i < kD; ++i) {
    if (std::memcmp(a.data<float>() + i, b.data<float>() + i, sizeof(float)) != 0) {
      if (first < 0) first = i;
      ++differ;
    }
  }
  EXPECT_EQ(differ, 0) << "dw differs, first at " << first << ": " << (first >= 0 ? a.Get(first) : 0) << " vs "
                       << (first >= 0 ? b.Get(first) : 0);
  EXPECT_EQ(std::memcmp(da.raw(), db.raw(), da.nbytes()), 0) << "dx differs between runs";
  EXPECT_FALSE(AllClose(a, dw0, 0, 0)) << "the backward left dw unchanged";
}

}  // namespace
}  // namespace loom
