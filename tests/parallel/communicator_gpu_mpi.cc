// GPU tensors across ranks: the MPI backend staged through pinned host
// memory (ranks may share one GPU), and NCCL when every rank has a GPU of
// its own. Each case checks every collective's values and counters
// (tests/gpu/nccl_collective_checks.h). Both skip where no GPU is visible;
// the NCCL case also where ranks share a GPU (MakeWorld refuses it, on every
// rank alike).
#include <gtest/gtest.h>

#include "parallel/communicator_factory.h"
#include "parallel/nccl_communicator.h"
#include "runtime/cuda_runtime.h"
#include "tests/gpu/nccl_collective_checks.h"
#include "tests/mpi_testing.h"

namespace loom {
namespace {

// The same checks on CPU tensors: the harness itself, on every machine.
TEST(GpuCommunicator, HarnessHoldsForMpiOnCpuTensors) {
  Communicator& world = testing::World();
  testing::CheckEveryCollective(world, Device::Cpu());
}

TEST(GpuCommunicator, MpiStagedThroughPinnedMemoryGivesEveryValue) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  const int gpu = SelectLocalGpu();
  Communicator& world = testing::World();
  testing::CheckEveryCollective(world, Device::Cuda(gpu));
  // And on a split group (the odd and even ranks).
  auto half = world.Split(world.rank() % 2, world.rank());
  ASSERT_TRUE(half.ok()) << half.status();
  testing::CheckEveryCollective(**half, Device::Cuda(gpu));
}

TEST(GpuCommunicator, NcclAcrossRanksGivesEveryValue) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)");
  config::ParallelConfig parallel;
  parallel.set_backend("nccl");
  parallel.set_timeout_s(60);
  auto nccl = MakeWorld(parallel, /*gpu_tensors=*/true);
  if (!nccl.ok()) {
    EXPECT_NE(nccl.status().message().find("share"), std::string::npos) << nccl.status();
    GTEST_SKIP() << "skipped: " << nccl.status().message();
  }
  testing::CheckEveryCollective(**nccl, Device::Cuda(SelectLocalGpu()));
  auto half = (*nccl)->Split(testing::World().rank() % 2, testing::World().rank());
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_EQ((*half)->backend(), "nccl");
  testing::CheckEveryCollective(**half, Device::Cuda(SelectLocalGpu()));
}

}  // namespace
}  // namespace loom
