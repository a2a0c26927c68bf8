// GPU tests skip with a visible reason where there is no GPU (or no CUDA build).
#include <gtest/gtest.h>

#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

TEST(GpuRuntime, HostDeviceCopyRoundTrips) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  Tensor host = testing::RandomTensor({257, 3}, DType::kF32, 7);
  Tensor dev = Tensor::Empty(host.shape(), DType::kF32, Device::Cuda(0));
  dev.CopyFrom(host);
  Tensor back = Tensor::Zeros(host.shape(), DType::kF32);
  back.CopyFrom(dev);
  EXPECT_TRUE(testing::AllClose(back, host, 0, 0));
}

}  // namespace
}  // namespace loom
