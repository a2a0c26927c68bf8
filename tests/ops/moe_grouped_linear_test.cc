// Grouped linear (ops/grouped_linear.h) on the CPU: each group equals Linear
// on its rows, with an empty group, dx written or accumulated and dW added
// to what it held.
#include <gtest/gtest.h>

#include "ops/grouped_linear.h"
#include "ops/linear.h"
#include "tests/testing.h"

namespace loom::ops {
namespace {

TEST(MoeGroupedLinear, EachGroupIsLinearOnItsRows) {
  const std::vector<int64_t> rows = {3, 0, 5, 2};
  const int64_t r = 10, in = 6, out = 4;
  const Tensor x = testing::RandomTensor({r, in}, DType::kF64, 1), dy = testing::RandomTensor({r, out}, DType::kF64, 2);
  std::vector<Tensor> w, dw, dw_ref;
  for (size_t g = 0; g < rows.size(); ++g) {
    w.push_back(testing::RandomTensor({out, in}, DType::kF64, 10 + g));
    dw.push_back(testing::RandomTensor({out, in}, DType::kF64, 20 + g));  // gradients accumulate onto this
    dw_ref.push_back(dw.back().Clone());
  }
  const std::vector<const Tensor*> wp = testing::ConstPointers(w);
  const std::vector<Tensor*> dwp = testing::Pointers(dw);
  Tensor y = Tensor::Empty({r, out}, DType::kF64), dx = testing::RandomTensor({r, in}, DType::kF64, 3);
  const Tensor dx_before = dx.Clone();
  GroupedLinearForward(x, wp, rows, y);
  GroupedLinearBackward(x, wp, rows, dy, &dx, dwp, /*accumulate_dx=*/true);
  int64_t at = 0;
  for (size_t g = 0; g < rows.size(); ++g) {
    if (rows[g] > 0) {
      Tensor y_ref = Tensor::Empty({rows[g], out}, DType::kF64), dx_ref = dx_before.Slice(at, rows[g]).Clone();
      LinearForward(x.Slice(at, rows[g]), w[g], y_ref);
      LinearBackward(x.Slice(at, rows[g]), w[g], dy.Slice(at, rows[g]), &dx_ref, dw_ref[g], /*accumulate_dx=*/true);
      EXPECT_TRUE(testing::AllClose(y.Slice(at, rows[g]), y_ref, 1e-14, 1e-14)) << "y of group " << g;
      EXPECT_TRUE(testing::AllClose(dx.Slice(at, rows[g]), dx_ref, 1e-14, 1e-14)) << "dx of group " << g;
    }
    EXPECT_TRUE(testing::AllClose(dw[g], dw_ref[g], 1e-14, 1e-14)) << "dW of group " << g;  // group 1: unchanged
    at += rows[g];
  }
  // dx written (not accumulated) when asked.
  Tensor dx2 = testing::RandomTensor({r, in}, DType::kF64, 4);
  GroupedLinearBackward(x, wp, rows, dy, &dx2, dwp);
  Tensor dx_ref = Tensor::Empty({rows[0], in}, DType::kF64), dw_scratch = Tensor::Zeros({out, in}, DType::kF64);
  LinearBackward(x.Slice(0, rows[0]), w[0], dy.Slice(0, rows[0]), &dx_ref, dw_scratch);
  EXPECT_TRUE(testing::AllClose(dx2.Slice(0, rows[0]), dx_ref, 1e-14, 1e-14));
}

// The pair form: dy2 = [dya | dyb] rows; dx = dya·Wa + dyb·Wb (written),
// or added, dWa, dWb accumulated, as two plain backwards on the halves.
TEST(GroupedLinear, PairBackwardIsTheBackwardOfEachHalf) {
  const std::vector<int64_t> rows = {3, 0, 7};
  const int64_t r = 10, in = 6, out = 4;
  const Tensor x = testing::RandomTensor({r, in}, DType::kF64, 1), dy2 = testing::RandomTensor({r, 2 * out}, DType::kF64, 2);
  const auto [dya, dyb] = testing::SplitRowHalves(dy2);
  std::vector<Tensor> wa, wb, dwa, dwb, dwa_ref, dwb_ref;
  for (size_t g = 0; g < rows.size(); ++g) {
    wa.push_back(testing::RandomTensor({out, in}, DType::kF64, 10 + g));
    wb.push_back(testing::RandomTensor({out, in}, DType::kF64, 20 + g));
    dwa.push_back(testing::RandomTensor({out, in}, DType::kF64, 30 + g));
    dwb.push_back(testing::RandomTensor({out, in}, DType::kF64, 40 + g));
    dwa_ref.push_back(dwa.back().Clone());
    dwb_ref.push_back(dwb.back().Clone());
  }
  const std::vector<const Tensor*> wap = testing::ConstPointers(wa), wbp = testing::ConstPointers(wb);
  const std::vector<Tensor*> dwap = testing::Pointers(dwa), dwbp = testing::Pointers(dwb);
  const std::vector<Tensor*> dwap_ref = testing::Pointers(dwa_ref), dwbp_ref = testing::Pointers(dwb_ref);
  Tensor dx = testing::RandomTensor({r, in}, DType::kF64, 3), dx_ref = Tensor::Empty({r, in}, DType::kF64);
  GroupedLinearPairBackward(x, wap, wbp, rows, dy2, dx, dwap, dwbp);
  GroupedLinearBackward(x, wap, rows, dya, &dx_ref, dwap_ref);
  GroupedLinearBackward(x, wbp, rows, dyb, &dx_ref, dwbp_ref, /*accumulate_dx=*/true);
  EXPECT_TRUE(testing::AllClose(dx, dx_ref, 1e-14, 1e-14));
  // dx added to when asked (a SwiGLU MLP's second and later shared experts).
  Tensor dx_sum = testing::RandomTensor({r, in}, DType::kF64, 4), dx_sum_ref = dx_sum.Clone();
  GroupedLinearPairBackward(x, wap, wbp, rows, dy2, dx_sum, dwap, dwbp, /*accumulate_dx=*/true);
  GroupedLinearBackward(x, wap, rows, dya, &dx_sum_ref, dwap_ref, /*accumulate_dx=*/true);
  GroupedLinearBackward(x, wbp, rows, dyb, &dx_sum_ref, dwbp_ref, /*accumulate_dx=*/true);
  EXPECT_TRUE(testing::AllClose(dx_sum, dx_sum_ref, 1e-14, 1e-14));
  for (size_t g = 0; g < rows.size(); ++g) {
    EXPECT_TRUE(testing::AllClose(dwa[g], dwa_ref[g], 1e-14, 1e-14)) << "dWa of group " << g;
    EXPECT_TRUE(testing::AllClose(dwb[g], dwb_ref[g], 1e-14, 1e-14)) << "dWb of group " << g;
  }
}

}  // namespace
}  // namespace loom::ops
