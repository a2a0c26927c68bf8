#include "ops/add.h"

namespace loom::ops {
namespace {
template <typename T>
void AddKernel(T* a, const T* x, int64_t n) {
#pragma omp parallel for simd if (n > 65536)
  for (int64_t i = 0; i < n; ++i) a[i] += x[i];
}
}  // namespace

void AddInPlace(Tensor& acc, const Tensor& b) {
  if (!acc.device().is_cpu()) return cuda::AddInPlace(acc, b);
  LOOM_CHECK(acc.numel() == b.numel() && acc.dtype() == b.dtype() && acc.device().is_cpu(), "[add] ",
             ShapeString(acc.shape()), " += ", ShapeString(b.shape()));
  const int64_t n = acc.numel();
  LOOM_DISPATCH_FLOAT(acc.dtype(), T, [&] { AddKernel(acc.data<T>(), b.data<T>(), n); });
}

}  // namespace loom::ops
