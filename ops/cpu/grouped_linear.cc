// CPU grouped linear (ops/grouped_linear.h): Linear's GEMMs on each group's
// rows (views, no copies); the pair form reads dy2's halves in place.
#include "ops/grouped_linear.h"

#include <numeric>

#include "ops/cpu/blas.h"
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
    LOOM_CHECK(wg->ndim() == 2 && wg->shape() == w[0]->shape() && wg->dim(1) == x.dim(1) && wg->dtype() == x.dtype(),
               "[grouped_linear] W ", ShapeString(wg->shape()), " ", DTypeName(wg->dtype()), " must be [out, ",
               x.dim(1), "] ", DTypeName(x.dtype()), " like every group's");
}

// One gradient of each weight's shape and dtype.
void CheckGrads(const std::vector<Tensor*>& dw, const std::vector<const Tensor*>& w) {
  LOOM_CHECK(dw.size() == w.size(), "[grouped_linear] ", dw.size(), " weight gradients for ", w.size(), " groups");
  for (size_t g = 0; g < w.size(); ++g)
    LOOM_CHECK(dw[g]->shape() == w[g]->shape() && dw[g]->dtype() == w[g]->dtype(), "[grouped_linear] dW ",
               ShapeString(dw[g]->shape()), " ", DTypeName(dw[g]->dtype()), " must match W ",
               ShapeString(w[g]->shape()), " ", DTypeName(w[g]->dtype()));
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
  CheckGrads(dw, w);
  LOOM_CHECK(dy.ndim() == 2 && dy.dim(0) == x.dim(0) && dy.dim(1) == w[0]->dim(0) &&
                 (dx == nullptr || dx->shape() == x.shape()),
             "[grouped_linear] dy ", ShapeString(dy.shape()), " and dx must match y and x");
  int64_t at = 0;
  for (size_t g = 0; g < w.size(); ++g) {
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

void GroupedLinearPairBackward(const Tensor& x, const std::vector<const Tensor*>& wa,
                               const std::vector<const Tensor*>& wb, const std::vector<int64_t>& rows, const Tensor& dy2,
                               Tensor& dx, const std::vector<Tensor*>& dwa, const std::vector<Tensor*>& dwb,
                               bool accumulate_dx) {
  if (!x.device().is_cpu())
    return cuda::GroupedLinearPairBackward(x, wa, wb, rows, dy2, dx, dwa, dwb, accumulate_dx);
  Check(x, wa, rows);
  Check(x, wb, rows);
  CheckGrads(dwa, wa);
  CheckGrads(dwb, wb);
  const int64_t in = x.dim(1), out = wa[0]->dim(0);
  LOOM_CHECK(wb[0]->dim(0) == out && dy2.ndim() == 2 && dy2.dim(0) == x.dim(0) && dy2.dim(1) == 2 * out &&
                 dy2.dtype() == x.dtype() && dx.shape() == x.shape() && dx.dtype() == x.dtype(),
             "[grouped_linear] pair: Wb ", ShapeString(wb[0]->shape()), ", dy2 ", ShapeString(dy2.shape()),
             " and dx ", ShapeString(dx.shape()), " must be [", out, ", ", in, "], [", x.dim(0), ", ", 2 * out,
             "] and like x");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    int64_t at = 0;
    for (size_t g = 0; g < wa.size(); ++g) {
      const int64_t r = rows[g];
      if (r > 0) {  // the halves of dy2 in place: leading dimension 2·out
        const T* xg = x.data<T>() + at * in;
        const T* dya = dy2.data<T>() + at * 2 * out;
        T* dxg = dx.data<T>() + at * in;
        const T beta_dx = accumulate_dx ? T(1) : T(0);
        cpu::Gemm(CblasNoTrans, CblasNoTrans, r, in, out, T(1), dya, 2 * out, wa[g]->data<T>(), in, beta_dx, dxg, in);
        cpu::Gemm(CblasNoTrans, CblasNoTrans, r, in, out, T(1), dya + out, 2 * out, wb[g]->data<T>(), in, T(1), dxg,
                  in);
        cpu::Gemm(CblasTrans, CblasNoTrans, out, in, r, T(1), dya, 2 * out, xg, in, T(1), dwa[g]->data<T>(), in);
        cpu::Gemm(CblasTrans, CblasNoTrans, out, in, r, T(1), dya + out, 2 * out, xg, in, T(1), dwb[g]->data<T>(), in);
      }
      at += r;
    }
  });
}

}  // namespace loom::ops
