// The CUDA RMSNorm against the CPU reference on the same inputs.
#include <gtest/gtest.h>

#include "ops/rmsnorm.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::ToCpu;
using loom::testing::ToGpu;

TEST(GpuRmsNorm, MatchesCpuReference) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  struct Case { int64_t rows, d; bool weight; };
  for (const Case& c : {Case{37, 96, true}, Case{5, 1024, true}, Case{64, 32, false}, Case{3, 4097, true}}) {
    SCOPED_TRACE(internal::StreamCat("rows ", c.rows, " d ", c.d, c.weight ? "" : " no weight"));
    const Tensor x = testing::RandomTensor({c.rows, c.d}, DType::kF32, 1);
    const Tensor dy = testing::RandomTensor({c.rows, c.d}, DType::kF32, 2);
    const Tensor w = c.weight ? testing::RandomTensor({c.d}, DType::kF32, 3, 0.5, 1.5) : Tensor();
    Tensor y = Tensor::Empty(x.shape(), DType::kF32), rstd = Tensor::Empty({c.rows}, DType::kF32);
    Tensor dx = Tensor::Empty(x.shape(), DType::kF32), dw = testing::RandomTensor({c.d}, DType::kF32, 4);
    const Tensor dw0 = dw.Clone();
    ops::RmsNormForward(x, w, 1e-5, y, rstd);
    ops::RmsNormBackward(x, w, rstd, dy, dx, dw);

    const Tensor gw = c.weight ? ToGpu(w) : Tensor();
    Tensor gy = Tensor::Empty(x.shape(), DType::kF32, Device::Cuda(0));
    Tensor grstd = Tensor::Empty({c.rows}, DType::kF32, Device::Cuda(0));
    Tensor gdx = Tensor::Empty(x.shape(), DType::kF32, Device::Cuda(0));
    Tensor gdw = ToGpu(dw0);
    ops::RmsNormForward(ToGpu(x), gw, 1e-5, gy, grstd);
    ops::RmsNormBackward(ToGpu(x), gw, grstd, ToGpu(dy), gdx, gdw);
    EXPECT_TRUE(testing::AllClose(ToCpu(gy), y, 1e-5, 1e-6));
    EXPECT_TRUE(testing::AllClose(ToCpu(grstd), rstd, 1e-5, 1e-6));
    EXPECT_TRUE(testing::AllClose(ToCpu(gdx), dx, 1e-4, 1e-5));
    if (c.weight) {
      EXPECT_TRUE(testing::AllClose(ToCpu(gdw), dw, 1e-4, 1e-4));
    }
  }
}

}  // namespace
}  // namespace loom
