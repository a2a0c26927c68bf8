// GPU tests skip with a visible reason where there is no GPU (or no CUDA build).
#include <gtest/gtest.h>

#include "runtime/cuda_runtime.h"
#include "runtime/host_snapshot.h"
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

// A checkpoint's snapshot of device tensors: page-locked host copies, the
// same memory from one save to the next.
TEST(GpuRuntime, HostSnapshotOfDeviceTensors) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  HostSnapshot snap;
  Tensor host = testing::RandomTensor({1 << 20}, DType::kF32, 11);
  Tensor dev = host.To(Device::Cuda(0));
  Tensor copy = snap.Copy(0, dev);
  EXPECT_TRUE(copy.device().is_cpu());
  EXPECT_TRUE(testing::AllClose(copy, host, 0, 0));
  Tensor host2 = testing::RandomTensor({1 << 20}, DType::kF32, 12);
  dev.CopyFrom(host2);
  Tensor again = snap.Copy(0, dev);
  EXPECT_EQ(again.raw(), copy.raw());
  EXPECT_TRUE(testing::AllClose(again, host2, 0, 0));
}

// More than the GPU has: one line that names the sizes and what lowers
// them, and exit status 3 (not an abort with a CUDA call's text).
TEST(GpuRuntime, OutOfMemorySaysWhatToChangeAndExits3) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  // A forked child cannot use the parent's CUDA context: the death test
  // runs in a fresh process of this binary.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Tensor small = Tensor::Empty({1024}, DType::kF32, Device::Cuda(0));  // the pool holds something
  EXPECT_EXIT(CudaMalloc(size_t{1} << 50, 0), ::testing::ExitedWithCode(3),
              "out of GPU memory on device 0: 1048576.00 GiB asked for; .* free of .*train.seq_len");
}

}  // namespace
}  // namespace loom
