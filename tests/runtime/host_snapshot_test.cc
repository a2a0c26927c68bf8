// HostSnapshot: host copies that keep their slot's memory from one copy to
// the next (checkpoint snapshots).
#include "runtime/host_snapshot.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

TEST(HostSnapshot, SlotsKeepTheirMemoryWhileTheShapeStays) {
  HostSnapshot snap;
  Tensor a = testing::RandomTensor({64, 3}, DType::kF32, 1), b = testing::RandomTensor({5}, DType::kF64, 2);
  Tensor ca = snap.Copy(0, a), cb = snap.Copy(1, b);
  EXPECT_TRUE(testing::AllClose(ca, a, 0, 0));
  EXPECT_TRUE(testing::AllClose(cb, b, 0, 0));
  EXPECT_NE(ca.raw(), a.raw()) << "a copy, not a view";
  EXPECT_EQ(snap.bytes(), 64 * 3 * 4 + 5 * 8);
  // The next snapshot: new values in the same memory.
  Tensor a2 = testing::RandomTensor({64, 3}, DType::kF32, 3);
  Tensor again = snap.Copy(0, a2);
  EXPECT_EQ(again.raw(), ca.raw());
  EXPECT_TRUE(testing::AllClose(again, a2, 0, 0));
  // Another shape or dtype gets a new tensor.
  EXPECT_EQ(snap.Copy(1, testing::RandomTensor({6}, DType::kF64, 4)).numel(), 6);
  EXPECT_EQ(snap.Copy(0, testing::RandomTensor({64, 3}, DType::kF64, 5)).dtype(), DType::kF64);
}

}  // namespace
}  // namespace loom
