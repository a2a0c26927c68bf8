// CPU RMSNorm over the last dimension (see ops/rmsnorm.h). With
// g = dy ⊙ w and r = rstd of the row:
//   dx = r · (g − x · r² · (g·x) / D),   dw += Σ_rows dy ⊙ x · r.
// Row sums are taken in double.
#include "ops/rmsnorm.h"

#include <cmath>
#include <vector>

namespace loom::ops {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

// x read as [rows, D]; returns D after checking the tensors that go with it.
int64_t CheckRows(const Tensor& x, const Tensor& w, const Tensor& rstd) {
  LOOM_CHECK(x.device().is_cpu() && rstd.device().is_cpu() && (!w.defined() || w.device().is_cpu()),
             "[rmsnorm] CPU tensors only");
  LOOM_CHECK(x.ndim() >= 1, "[rmsnorm] x must have a last dimension");
  const int64_t d = x.dim(-1);
  LOOM_CHECK(d > 0, "[rmsnorm] empty last dimension in x ", ShapeString(x.shape()));
  LOOM_CHECK(!w.defined() || (w.numel() == d && w.dtype() == x.dtype()), "[rmsnorm] w ",
             ShapeString(w.shape()), " must be [", d, "] ", DTypeName(x.dtype()));
  LOOM_CHECK(rstd.numel() == x.numel() / d && rstd.dtype() == x.dtype(), "[rmsnorm] rstd ",
             ShapeString(rstd.shape()), " must hold one ", DTypeName(x.dtype()), " per row of x ",
             ShapeString(x.shape()));
  return d;
}

void CheckLike(const Tensor& t, const Tensor& x, const char* name) {
  LOOM_CHECK(t.device().is_cpu() && t.numel() == x.numel() && t.dtype() == x.dtype(), "[rmsnorm] ", name, " ",
             ShapeString(t.shape()), " ", DTypeName(t.dtype()), " must match x ", ShapeString(x.shape()), " ",
             DTypeName(x.dtype()));
}

// w may be null (no weight).
template <typename T>
void Forward(const T* x, const T* w, int64_t rows, int64_t d, double eps, T* y, T* rstd) {
#pragma omp parallel for if (rows * d >= kParallelMinElements)
  for (int64_t n = 0; n < rows; ++n) {
    const T* xr = x + n * d;
    T* yr = y + n * d;
    double sum_sq = 0;
    for (int64_t j = 0; j < d; ++j) sum_sq += static_cast<double>(xr[j]) * xr[j];
    const T r = static_cast<T>(1.0 / std::sqrt(sum_sq / d + eps));
    rstd[n] = r;
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * r * (w ? w[j] : T(1));
  }
}

// w and dw null together (no weight); add may be null.
template <typename T>
void Backward(const T* x, const T* w, const T* rstd, const T* dy, const T* add, int64_t rows, int64_t d, T* dx,
              T* dw) {
  // dw first, so that dx may overwrite x or dy.
  if (dw != nullptr) {
    std::vector<double> acc(d, 0.0);
    for (int64_t n = 0; n < rows; ++n) {
      const T* xr = x + n * d;
      const T* dyr = dy + n * d;
      const double r = rstd[n];
      for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(dyr[j]) * xr[j] * r;
    }
    for (int64_t j = 0; j < d; ++j) dw[j] += static_cast<T>(acc[j]);
  }
#pragma omp parallel for if (rows * d >= kParallelMinElements)
  for (int64_t n = 0; n < rows; ++n) {
    const T* xr = x + n * d;
    const T* dyr = dy + n * d;
    T* dxr = dx + n * d;
    const T* addr = add != nullptr ? add + n * d : nullptr;
    const double r = rstd[n];
    double gx = 0;
    for (int64_t j = 0; j < d; ++j) gx += static_cast<double>(dyr[j]) * (w ? w[j] : T(1)) * xr[j];
    const double c = r * r * gx / d;
    for (int64_t j = 0; j < d; ++j) {
      const double v = r * (static_cast<double>(dyr[j]) * (w ? w[j] : T(1)) - xr[j] * c);
      dxr[j] = static_cast<T>(addr != nullptr ? v + addr[j] : v);
    }
  }
}

}  // namespace

void RmsNormForward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd) {
  if (!x.device().is_cpu()) return cuda::RmsNormForward(x, w, eps, y, rstd);
  const int64_t d = CheckRows(x, w, rstd);
  CheckLike(y, x, "y");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    Forward(x.data<T>(), w.defined() ? w.data<T>() : nullptr, x.numel() / d, d, eps, y.data<T>(), rstd.data<T>());
  });
}

void RmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                     Tensor& dw, const Tensor* add) {
  if (!x.device().is_cpu()) return cuda::RmsNormBackward(x, w, rstd, dy, dx, dw, add);
  const int64_t d = CheckRows(x, w, rstd);
  CheckLike(dy, x, "dy");
  CheckLike(dx, x, "dx");
  if (add != nullptr) CheckLike(*add, x, "add");
  if (w.defined()) {
    LOOM_CHECK(dw.defined() && dw.device().is_cpu() && dw.numel() == d && dw.dtype() == x.dtype(), "[rmsnorm] dw ",
               ShapeString(dw.shape()), " must be [", d, "] ", DTypeName(x.dtype()), " like w");
  }
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    Backward(x.data<T>(), w.defined() ? w.data<T>() : nullptr, rstd.data<T>(), dy.data<T>(),
             add != nullptr ? add->data<T>() : nullptr, x.numel() / d, d, dx.data<T>(),
             w.defined() ? dw.data<T>() : nullptr);
  });
}

}  // namespace loom::ops
