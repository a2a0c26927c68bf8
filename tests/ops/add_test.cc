#include "ops/add.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

TEST(Add, AccumulatesElementWise) {
  for (DType d : {DType::kF32, DType::kF64}) {
    // Large enough for the threaded loop.
    Tensor a = testing::RandomTensor({300, 257}, d, 1), b = testing::RandomTensor({300, 257}, d, 2);
    Tensor expected = Tensor::Empty(a.shape(), DType::kF64);
    for (int64_t i = 0; i < a.numel(); ++i) expected.data<double>()[i] = a.Get(i) + b.Get(i);
    ops::AddInPlace(a, b);
    EXPECT_TRUE(testing::AllClose(a, expected, d == DType::kF32 ? 1e-7 : 0, 0)) << DTypeName(d);
  }
}

}  // namespace
}  // namespace loom
