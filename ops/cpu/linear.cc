// CPU Linear: GEMMs on 2-D views. x, dx are [rows, in] and y, dy [rows, out]
// whatever their stored shapes (a projection may write [T, H, D] directly).
#include "ops/linear.h"

#include "ops/matmul.h"

namespace loom::ops {
namespace {
Tensor Rows(const Tensor& t, int64_t rows, int64_t cols, const char* name) {
  LOOM_CHECK(t.numel() == rows * cols, "[linear] ", name, " ", ShapeString(t.shape()), " does not hold [", rows,
             ", ", cols, "]");
  return t.Reshape({rows, cols});
}
}  // namespace

void LinearForward(const Tensor& x, const Tensor& w, Tensor& y, const Tensor* residual) {
  if (!x.device().is_cpu()) return cuda::LinearForward(x, w, y, residual);
  LOOM_CHECK(w.ndim() == 2, "[linear] W must be [out, in], got ", ShapeString(w.shape()));
  LOOM_CHECK(x.numel() % w.dim(1) == 0, "[linear] x ", ShapeString(x.shape()), " is not rows of W's input size ",
             w.dim(1));
  const int64_t rows = x.numel() / w.dim(1);
  const Tensor x2 = x.Reshape({rows, w.dim(1)});
  Tensor y2 = Rows(y, rows, w.dim(0), "y");
  if (residual != nullptr) {
    const Tensor r2 = Rows(*residual, rows, w.dim(0), "residual");
    if (r2.raw() != y2.raw()) y2.CopyFrom(r2);
  }
  Matmul(x2, /*trans_a=*/false, w, /*trans_b=*/true, y2, 1.0, residual != nullptr ? 1.0 : 0.0);
}

void LinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw,
                    bool accumulate_dx) {
  if (!x.device().is_cpu()) return cuda::LinearBackward(x, w, dy, dx, dw, accumulate_dx);
  LOOM_CHECK(w.ndim() == 2 && dw.shape() == w.shape(), "[linear] dW ", ShapeString(dw.shape()),
             " must match W ", ShapeString(w.shape()));
  LOOM_CHECK(x.numel() % w.dim(1) == 0, "[linear] x ", ShapeString(x.shape()), " is not rows of W's input size ",
             w.dim(1));
  const int64_t rows = x.numel() / w.dim(1);
  const Tensor x2 = x.Reshape({rows, w.dim(1)});
  const Tensor dy2 = Rows(dy, rows, w.dim(0), "dy");
  if (dx != nullptr) {
    Tensor dx2 = Rows(*dx, rows, w.dim(1), "dx");
    Matmul(dy2, false, w, false, dx2, 1.0, accumulate_dx ? 1.0 : 0.0);
  }
  Matmul(dy2, /*trans_a=*/true, x2, /*trans_b=*/false, dw, 1.0, /*beta=*/1.0);
}

}  // namespace loom::ops
