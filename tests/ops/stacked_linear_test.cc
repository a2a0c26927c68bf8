#include "ops/stacked_linear.h"

#include <gtest/gtest.h>

#include "ops/linear.h"
#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::Columns;
using testing::RandomTensor;

constexpr int64_t kRows = 5, kIn = 6;
const std::vector<int64_t> kOut = {4, 2, 3};

// The weights (and gradients) as slices of one buffer, back to back, or
// as separate tensors with the same values.
struct Blocks {
  Tensor buffer;
  std::vector<Tensor> parts;
  Blocks(const Tensor& values, bool stacked) {
    buffer = values.Clone();
    int64_t at = 0;
    for (int64_t out : kOut) {
      parts.push_back(stacked ? buffer.Slice(at, out) : buffer.Slice(at, out).Clone());
      at += out;
    }
  }
};

// Each way against Linear on each block: y's column blocks, dx the sum of
// the blocks' dx, each dW_i its block's; with the blocks back to back (one
// GEMM) and apart (the composite form).
TEST(StackedLinear, MatchesOneLinearPerBlockStackedOrApart) {
  const Tensor x = RandomTensor({kRows, kIn}, DType::kF64, 1), w = RandomTensor({9, kIn}, DType::kF64, 2),
               dy = RandomTensor({kRows, 9}, DType::kF64, 3), dw0 = RandomTensor({9, kIn}, DType::kF64, 4),
               dx0 = RandomTensor({kRows, kIn}, DType::kF64, 5);
  for (const bool stacked : {true, false}) {
    SCOPED_TRACE(stacked ? "back to back" : "apart");
    const Blocks weights(w, stacked);
    Blocks grads(dw0, stacked);
    ASSERT_EQ(Tensor::Stacked(testing::ConstPointers(weights.parts)).defined(), stacked);
    Tensor y = Tensor::Empty({kRows, 9}, DType::kF64);
    ops::StackedLinearForward(x, testing::ConstPointers(weights.parts), y);
    Tensor dx = dx0.Clone();
    ops::StackedLinearBackward(x, testing::ConstPointers(weights.parts), dy, &dx, testing::Pointers(grads.parts),
                               /*accumulate_dx=*/true);
    Tensor want_dx = dx0.Clone();
    int64_t at = 0;
    for (size_t i = 0; i < kOut.size(); ++i) {
      Tensor yi = Tensor::Empty({kRows, kOut[i]}, DType::kF64);
      ops::LinearForward(x, weights.parts[i], yi);
      EXPECT_TRUE(AllClose(Columns(y, at, kOut[i]), yi, 1e-14, 1e-14)) << "y block " << i;
      Tensor want_dw = dw0.Slice(at, kOut[i]).Clone();
      ops::LinearBackward(x, weights.parts[i], Columns(dy, at, kOut[i]), &want_dx, want_dw, /*accumulate_dx=*/true);
      EXPECT_TRUE(AllClose(grads.parts[i], want_dw, 1e-14, 1e-14)) << "dW block " << i;
      at += kOut[i];
    }
    EXPECT_TRUE(AllClose(dx, want_dx, 1e-13, 1e-13));
    // Written, not added, without accumulate_dx; and dx may be null.
    Tensor written = dx0.Clone();
    ops::StackedLinearBackward(x, testing::ConstPointers(weights.parts), dy, &written, testing::Pointers(grads.parts));
    Tensor sub = want_dx.Clone();
    for (int64_t i = 0; i < sub.numel(); ++i) sub.data<double>()[i] -= dx0.data<double>()[i];
    EXPECT_TRUE(AllClose(written, sub, 1e-12, 1e-12));
    ops::StackedLinearBackward(x, testing::ConstPointers(weights.parts), dy, nullptr, testing::Pointers(grads.parts));
  }
}

}  // namespace
}  // namespace loom
