// StackedLinear on any device: views where the blocks lie back to back, else
// copies, then Linear (ops/linear.h).
#include "ops/stacked_linear.h"

#include "ops/add.h"
#include "ops/linear.h"

namespace loom::ops {
namespace {

// [W_0; W_1; …]: a view, or a copy where the blocks do not lie back to back.
Tensor StackedWeights(const std::vector<const Tensor*>& w) {
  LOOM_CHECK(!w.empty(), "[stacked_linear] no weights");
  int64_t rows = 0;
  for (const Tensor* wi : w) {
    LOOM_CHECK(wi->ndim() == 2 && wi->dim(1) == w[0]->dim(1) && wi->dtype() == w[0]->dtype(),
               "[stacked_linear] W ", ShapeString(wi->shape()), " ", DTypeName(wi->dtype()), " does not stack on ",
               ShapeString(w[0]->shape()), " ", DTypeName(w[0]->dtype()));
    rows += wi->dim(0);
  }
  Tensor stacked = Tensor::Stacked(w);
  if (stacked.defined()) return stacked;
  stacked = Tensor::Empty({rows, w[0]->dim(1)}, w[0]->dtype(), w[0]->device());
  int64_t at = 0;
  for (const Tensor* wi : w) {
    Tensor block = stacked.Slice(at, wi->dim(0));
    block.CopyFrom(*wi);
    at += wi->dim(0);
  }
  return stacked;
}

}  // namespace

void StackedLinearForward(const Tensor& x, const std::vector<const Tensor*>& w, Tensor& y) {
  LinearForward(x, StackedWeights(w), y);
}

void StackedLinearBackward(const Tensor& x, const std::vector<const Tensor*>& w, const Tensor& dy, Tensor* dx,
                           const std::vector<Tensor*>& dw, bool accumulate_dx) {
  LOOM_CHECK(dw.size() == w.size(), "[stacked_linear] ", dw.size(), " gradients for ", w.size(), " weights");
  const Tensor stacked = StackedWeights(w);
  for (size_t i = 0; i < w.size(); ++i)
    LOOM_CHECK(dw[i]->shape() == w[i]->shape(), "[stacked_linear] dW ", ShapeString(dw[i]->shape()),
               " must match W ", ShapeString(w[i]->shape()));
  Tensor dstacked = Tensor::Stacked(std::vector<const Tensor*>(dw.begin(), dw.end()));
  if (dstacked.defined()) {
    LinearBackward(x, stacked, dy, dx, dstacked, accumulate_dx);
    return;
  }
  dstacked = Tensor::Zeros(stacked.shape(), dw[0]->dtype(), dw[0]->device());
  LinearBackward(x, stacked, dy, dx, dstacked, accumulate_dx);
  int64_t at = 0;
  for (Tensor* dwi : dw) {
    AddInPlace(*dwi, dstacked.Slice(at, dwi->dim(0)));
    at += dwi->dim(0);
  }
}

}  // namespace loom::ops
