// CPU sigmoid output gate, element-wise (see ops/sigmoid_gate.h).
#include "ops/sigmoid_gate.h"

#include <cmath>

namespace loom::ops {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

void CheckLike(const Tensor& t, const Tensor& x, const char* name) {
  LOOM_CHECK(x.device().is_cpu() && t.device().is_cpu(), "[sigmoid_gate] CPU tensors only");
  LOOM_CHECK(t.numel() == x.numel() && t.dtype() == x.dtype(), "[sigmoid_gate] ", name, " ",
             ShapeString(t.shape()), " ", DTypeName(t.dtype()), " must match x ", ShapeString(x.shape()), " ",
             DTypeName(x.dtype()));
}

template <typename T>
void Forward(const T* x, const T* g, int64_t n, T* y) {
#pragma omp parallel for if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] / (T(1) + std::exp(-g[i]));
}

template <typename T>
void Backward(const T* x, const T* g, const T* dy, int64_t n, T* dx, T* dg) {
#pragma omp parallel for if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i], d = dy[i];  // read before writing: the outputs may overwrite the inputs
    const T s = T(1) / (T(1) + std::exp(-g[i]));
    dx[i] = d * s;
    dg[i] = d * xi * s * (T(1) - s);
  }
}

}  // namespace

void SigmoidGateForward(const Tensor& x, const Tensor& g, Tensor& y) {
  if (!x.device().is_cpu()) return cuda::SigmoidGateForward(x, g, y);
  CheckLike(g, x, "g");
  CheckLike(y, x, "y");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { Forward(x.data<T>(), g.data<T>(), x.numel(), y.data<T>()); });
}

void SigmoidGateBackward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg) {
  if (!x.device().is_cpu()) return cuda::SigmoidGateBackward(x, g, dy, dx, dg);
  CheckLike(g, x, "g");
  CheckLike(dy, x, "dy");
  CheckLike(dx, x, "dx");
  CheckLike(dg, x, "dg");
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    Backward(x.data<T>(), g.data<T>(), dy.data<T>(), x.numel(), dx.data<T>(), dg.data<T>());
  });
}

}  // namespace loom::ops
