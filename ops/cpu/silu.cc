// CPU SiLU, element-wise (see ops/silu.h).
#include "ops/silu.h"

#include <cmath>

namespace loom::ops {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

void CheckLike(const Tensor& t, const Tensor& x, const char* name) {
  LOOM_CHECK(x.device().is_cpu() && t.device().is_cpu(), "[silu] CPU tensors only");
  LOOM_CHECK(t.numel() == x.numel() && t.dtype() == x.dtype(), "[silu] ", name, " ", ShapeString(t.shape()), " ",
             DTypeName(t.dtype()), " must match x ", ShapeString(x.shape()), " ", DTypeName(x.dtype()));
}

template <typename T>
void Forward(const T* x, int64_t n, T* y) {
#pragma omp parallel for if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] / (T(1) + std::exp(-x[i]));
}

template <typename T>
void Backward(const T* x, const T* dy, int64_t n, T* dx) {
#pragma omp parallel for if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const T s = T(1) / (T(1) + std::exp(-x[i]));
    dx[i] = dy[i] * s * (T(1) + x[i] * (T(1) - s));
  }
}

}  // namespace

void SiluForward(const Tensor& x, Tensor& y) {
  if (!x.device().is_cpu()) return cuda::SiluForward(x, y);
  CheckLike(y, x, "y");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { Forward(x.data<T>(), x.numel(), y.data<T>()); });
}

void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx) {
  if (!x.device().is_cpu()) return cuda::SiluBackward(x, dy, dx);
  CheckLike(dy, x, "dy");
  CheckLike(dx, x, "dx");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { Backward(x.data<T>(), dy.data<T>(), x.numel(), dx.data<T>()); });
}

}  // namespace loom::ops
