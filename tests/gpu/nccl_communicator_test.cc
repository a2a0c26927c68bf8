// The NCCL communicator in a world of one rank (one GPU): every collective's
// values and counters, CPU tensors through its MPI host communicator, a
// split group, clear errors, and a wait that outlasts the timeout aborting
// the NCCL communicator. Plus the backend choice of MakeWorld, which runs in
// every build (it needs no GPU to refuse one).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "parallel/communicator_factory.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"
#include "runtime/cuda_runtime.h"
#include "tests/gpu/nccl_collective_checks.h"

#if LOOM_CUDA
#include <cuda_runtime.h>
#endif

namespace loom {
namespace {

bool HaveGpu() { return BuiltWithNccl() && CudaDeviceCount() > 0; }

#define LOOM_SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)")

std::unique_ptr<Communicator> NcclOverWorld(double timeout_s) {
  auto host = MpiWorld(timeout_s);
  LOOM_CHECK(host.ok(), host.status().message());
  auto nccl = MakeNcclCommunicator(std::move(*host), timeout_s);
  LOOM_CHECK(nccl.ok(), nccl.status().message());
  return std::move(*nccl);
}

TEST(NcclCommunicator, EveryCollectiveOnOneRankGivesItsValuesAndCounts) {
  LOOM_SKIP_WITHOUT_GPU();
  const int gpu = SelectLocalGpu();
  ASSERT_GE(gpu, 0);
  std::unique_ptr<Communicator> c = NcclOverWorld(60);
  EXPECT_EQ(c->backend(), "nccl");
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->world_ranks(), std::vector<int>{0});
  testing::CheckEveryCollective(*c, Device::Cuda(gpu));
}

TEST(NcclCommunicator, CpuTensorsGoThroughTheHostAndCount) {
  LOOM_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = NcclOverWorld(60);
  testing::CheckEveryCollective(*c, Device::Cpu());
}

TEST(NcclCommunicator, SplitGroupIsNcclAndWorks) {
  LOOM_SKIP_WITHOUT_GPU();
  const int gpu = SelectLocalGpu();
  std::unique_ptr<Communicator> c = NcclOverWorld(60);
  auto sub = c->Split(/*color=*/3, /*key=*/0);
  ASSERT_TRUE(sub.ok()) << sub.status().message();
  EXPECT_EQ((*sub)->backend(), "nccl");
  testing::CheckEveryCollective(**sub, Device::Cuda(gpu));
  EXPECT_EQ(c->counters().Calls(CommOp::kAllReduce), 0) << "the parent counts only its own calls";
}

TEST(NcclCommunicator, MisplacedOrMismatchedTensorsAreClearErrors) {
  LOOM_SKIP_WITHOUT_GPU();
  const int gpu = SelectLocalGpu();
  std::unique_ptr<Communicator> c = NcclOverWorld(60);
  const Tensor gpu_in = testing::ValueTensor(0, 8, DType::kF32, Device::Cuda(gpu));
  Tensor cpu_out = Tensor::Empty({8}, DType::kF32);
  absl::Status s = c->AllGather(gpu_in, cpu_out);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("tensors on cuda:" + std::to_string(gpu) + " and cpu"), std::string::npos) << s.message();
  Tensor short_out = Tensor::Empty({4}, DType::kF32, Device::Cuda(gpu));
  s = c->ReduceScatter(gpu_in, short_out);
  EXPECT_NE(s.message().find("reduce_scatter: input has 8 elements, not 1 x output's 4"), std::string::npos)
      << s.message();
  Tensor t = testing::ValueTensor(0, 8, DType::kF32, Device::Cuda(gpu));
  s = c->Send(t, /*peer=*/1);
  EXPECT_NE(s.message().find("send: peer 1 is not in a group of 1"), std::string::npos) << s.message();
}

// An operation that cannot finish: the default stream, which every NCCL
// launch waits for, is held by a host function for 4 s, past the 2 s
// timeout (NCCL itself refuses the one-rank way to hang, a receive from
// oneself with no send). The wait must abort that NCCL communicator, return
// DeadlineExceeded naming its group, refuse further work at once, and leave
// other communicators working.
TEST(NcclCommunicator, WaitPastTheTimeoutAbortsAndNamesTheGroup) {
  LOOM_SKIP_WITHOUT_GPU();
#if LOOM_CUDA
  const int gpu = SelectLocalGpu();
  std::unique_ptr<Communicator> healthy = NcclOverWorld(60);
  std::unique_ptr<Communicator> doomed = NcclOverWorld(/*timeout_s=*/2);
  Tensor t = testing::ValueTensor(0, 16, DType::kF32, Device::Cuda(gpu));
  std::atomic<bool> release{false};
  ASSERT_EQ(cudaLaunchHostFunc(
                cudaStreamLegacy,
                [](void* flag) {
                  while (!static_cast<std::atomic<bool>*>(flag)->load())
                    std::this_thread::sleep_for(std::chrono::milliseconds(1));
                },
                &release),
            cudaSuccess);
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::seconds(4));
    release = true;
  });
  const auto start = std::chrono::steady_clock::now();
  absl::Status s = doomed->AllReduce(t);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  releaser.join();
  CudaSynchronize();
  EXPECT_TRUE(absl::IsDeadlineExceeded(s)) << s;
  EXPECT_NE(s.message().find("nccl all_reduce in a group of 1 (world ranks 0) waited 2 s"), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("communicator was aborted"), std::string::npos) << s.message();
  EXPECT_GE(waited, 2.0);
  EXPECT_LT(waited, 10.0);
  s = doomed->Barrier();
  EXPECT_NE(s.message().find("aborted after an earlier failure"), std::string::npos) << s.message();
  Tensor ok = testing::ValueTensor(0, 16, DType::kF32, Device::Cuda(gpu));
  EXPECT_TRUE(healthy->AllReduce(ok).ok());
  EXPECT_EQ(testing::OnCpu(ok).Get(3), testing::CollectiveValue(0, 3));
#endif
}

TEST(MakeWorld, AutoTakesNcclOnlyForGpuTensorsWithAGpuPerRank) {
  config::ParallelConfig parallel;  // backend "auto"
  parallel.set_timeout_s(60);
  auto cpu_run = MakeWorld(parallel, /*gpu_tensors=*/false);
  ASSERT_TRUE(cpu_run.ok()) << cpu_run.status();
  EXPECT_EQ((*cpu_run)->backend(), "mpi");
  auto gpu_run = MakeWorld(parallel, /*gpu_tensors=*/true);
  ASSERT_TRUE(gpu_run.ok()) << gpu_run.status();
  EXPECT_EQ((*gpu_run)->backend(), HaveGpu() ? "nccl" : "mpi");
}

TEST(MakeWorld, NcclThatCannotBeIsAClearError) {
  config::ParallelConfig parallel;
  parallel.set_backend("nccl");
  auto cpu_run = MakeWorld(parallel, /*gpu_tensors=*/false);
  ASSERT_FALSE(cpu_run.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(cpu_run.status()));
  const std::string why = BuiltWithNccl() ? "this run keeps its tensors on the CPU" : "built without CUDA";
  EXPECT_NE(cpu_run.status().message().find("parallel.backend=nccl: "), std::string::npos) << cpu_run.status();
  EXPECT_NE(cpu_run.status().message().find(why), std::string::npos) << cpu_run.status();
  EXPECT_NE(cpu_run.status().message().find("use parallel.backend=mpi"), std::string::npos) << cpu_run.status();
  parallel.set_backend("mpi");
  auto mpi = MakeWorld(parallel, /*gpu_tensors=*/true);
  ASSERT_TRUE(mpi.ok());
  EXPECT_EQ((*mpi)->backend(), "mpi");
}

// srun sets SLURM_LOCALID (and no Open MPI variables): the local rank comes
// from it. An srun without PMI gives every task a world of one: refused.
TEST(MakeWorld, SrunLocalRankAndSrunWithoutPmiIsRefused) {
  auto world = MpiWorld(60);  // MPI up first, as under srun
  ASSERT_TRUE(world.ok());
  const char* saved_local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const char* saved_size = std::getenv("OMPI_COMM_WORLD_SIZE");
  const std::string local = saved_local ? saved_local : "", size = saved_size ? saved_size : "";
  unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
  unsetenv("OMPI_COMM_WORLD_SIZE");
  setenv("SLURM_LOCALID", "3", 1);
  setenv("SLURM_STEP_NUM_TASKS", "4", 1);
  EXPECT_EQ(LocalRank(), 3);
  config::ParallelConfig parallel;
  auto alone = MakeWorld(parallel, /*gpu_tensors=*/false);
  EXPECT_TRUE(absl::IsInvalidArgument(alone.status())) << alone.status();
  EXPECT_NE(alone.status().message().find("srun started 4 tasks but MPI sees a world of 1"), std::string::npos)
      << alone.status();
  EXPECT_NE(alone.status().message().find("--mpi=pmix"), std::string::npos) << alone.status();
  unsetenv("SLURM_LOCALID");
  unsetenv("SLURM_STEP_NUM_TASKS");
  EXPECT_EQ(LocalRank(), 0) << "a world of one, no launcher variables: MPI's node-local rank";
  if (saved_local) setenv("OMPI_COMM_WORLD_LOCAL_RANK", local.c_str(), 1);
  if (saved_size) setenv("OMPI_COMM_WORLD_SIZE", size.c_str(), 1);
}

TEST(MakeNcclCommunicator, CpuBuildSaysItHasNoCuda) {
  if (BuiltWithNccl()) GTEST_SKIP() << "a CUDA build has NCCL";
  auto host = MpiWorld(60);
  ASSERT_TRUE(host.ok());
  auto nccl = MakeNcclCommunicator(std::move(*host), 60);
  ASSERT_FALSE(nccl.ok());
  EXPECT_NE(nccl.status().message().find("built without CUDA"), std::string::npos) << nccl.status();
  EXPECT_EQ(SelectLocalGpu(), -1);
}

}  // namespace
}  // namespace loom
