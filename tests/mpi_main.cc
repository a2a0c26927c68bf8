// main() of the multi-rank test executables (tests/**/*_mpi.cc), run by
// ctest under `mpirun -np N --oversubscribe`. Every rank runs every test;
// rank 0 prints gtest's report, the other ranks print only their failures
// (prefixed by the rank). The process fails if any assertion on it fails, so
// mpirun (and ctest) fail if any rank does.
#include <gtest/gtest.h>

#include <cstdio>

#include "tests/mpi_testing.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  loom::Communicator& world = loom::testing::World();
  if (world.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(world.rank()));
  }
  const int result = RUN_ALL_TESTS();
  // Every rank reaches this point unless a collective hung; agree on the result.
  loom::Tensor failed = loom::Tensor::FromVector<int32_t>({result != 0}, {1});
  if (!world.AllReduce(failed, loom::ReduceOp::kMax).ok()) return 1;
  return failed.data<int32_t>()[0] != 0;
}
