// CPU grouped linear (ops/grouped_linear.h): Linear's GEMMs on each group's
// rows (views, no copies).
#include "ops/grouped_linear.h"

#include <numeric>

#include "ops/matmul.h"

namespace loom::ops {
namespace {

void Check(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows) {
  LOOM_CHECK(!w.empty() && w.size() == rows.size(), "[grouped_linear] ", w.size(), " weights for ", rows.size(),
             " groups");
  LOOM_CHECK(x.ndim() == 2 && x.dim(0) == std::accumulate(rows.begin(), rows.end(), int64_t{0}),
             "[grouped_linear] x ", ShapeString(x.shape()), " must be [R, in] with R the groups' ",
             std::accumulate(rows.begin(), rows.end(), int64_t{0}), " rows");
  for (const Tensor* wg : w)
    LOOM_CHECK(wg->ndim() == 2 && wg->shape() == w[0]->shape() && wg->dim(1) == x.dim(1), "[grouped_linear] W ",
               ShapeString(wg->shape()), " must be [out, ", x.dim(1), "] like every group's");
}

}  // namespace

void GroupedLinearForward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                          Tensor& y) {
  if (!x.device().is_cpu()) return cuda::GroupedLinearForward(x, w, rows, y);
  Check(x, w, rows);
  LOOM_CHECK(y.ndim() == 2 && y.dim(0) == x.dim(0) && y.dim(1) == w[0]->dim(0), "[grouped_linear] y ",
             ShapeString(y.shape()), " must be [", x.dim(0), ", ", w[0]->dim(0), "]");
  int64_t at = 0;
  for (size_t g = 0; g < w.size(); ++g) {
    if (rows[g] > 0) {
      Tensor yg = y.Slice(at, rows[g]);
      Matmul(x.Slice(at, rows[g]), false, *w[g], /*trans_b=*/true, yg);
    }
    at += rows[g];
  }
}

void GroupedLinearBackward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                           const Tensor& dy, Tensor* dx, const std::vector<Tensor*>& dw, bool accumulate_dx) {
  if (!x.device().is_cpu()) return cuda::GroupedLinearBackward(x, w, rows, dy, dx, dw, accumulate_dx);
  Check(x, w, rows);
  LOOM_CHECK(dw.size() == w.size() && dy.ndim() == 2 && dy.dim(0) == x.dim(0) && dy.dim(1) == w[0]->dim(0) &&
                 (dx == nullptr || dx->shape() == x.shape()),
             "[grouped_linear] dy ", ShapeString(dy.shape()), " and dx must match y and x");
  int64_t at = 0;
  for (size_t g = 0; g < w.size(); ++g) {
    LOOM_CHECK(dw[g]->shape() == w[g]->shape(), "[grouped_linear] dW ", ShapeString(dw[g]->shape()),
               " must match W ", ShapeString(w[g]->shape()));
    if (rows[g] > 0) {
      const Tensor xg = x.Slice(at, rows[g]), dyg = dy.Slice(at, rows[g]);
      if (dx != nullptr) {
        Tensor dxg = dx->Slice(at, rows[g]);
        Matmul(dyg, false, *w[g], false, dxg, 1.0, accumulate_dx ? 1.0 : 0.0);
      }
      Matmul(dyg, /*trans_a=*/true, xg, false, *dw[g], 1.0, /*beta=*/1.0);
    }
    at += rows[g];
  }
}

}  // namespace loom::ops
