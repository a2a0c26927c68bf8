// CPU Matmul: one call to OpenBLAS GEMM, row-major, on the 2-D views
// [rows, last dim] of the three tensors.
#include "ops/matmul.h"

#include "ops/cpu/blas.h"

#include <algorithm>
#include <type_traits>

namespace loom::ops {
MatmulShape CheckMatmulShape(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c) {
  LOOM_CHECK(a.ndim() >= 2 && b.ndim() >= 2 && c.ndim() >= 2, "[matmul] tensors need at least 2 dimensions: a ",
             ShapeString(a.shape()), ", b ", ShapeString(b.shape()), ", c ", ShapeString(c.shape()));
  const auto rows = [](const Tensor& t) {  // every dimension but the last
    int64_t r = 1;
    for (int i = 0; i + 1 < t.ndim(); ++i) r *= t.dim(i);
    return r;
  };
  MatmulShape g;
  g.m = trans_a ? a.dim(-1) : rows(a);
  g.k = trans_a ? rows(a) : a.dim(-1);
  const int64_t kb = trans_b ? b.dim(-1) : rows(b);
  g.n = trans_b ? rows(b) : b.dim(-1);
  LOOM_CHECK(g.k == kb, "[matmul] inner dimensions differ: op(a) is [", g.m, ", ", g.k, "] (a ", ShapeString(a.shape()),
             trans_a ? " transposed" : "", "), op(b) is [", kb, ", ", g.n, "] (b ", ShapeString(b.shape()),
             trans_b ? " transposed" : "", ")");
  LOOM_CHECK(rows(c) == g.m && c.dim(-1) == g.n, "[matmul] c is ", ShapeString(c.shape()), " read as [", rows(c), ", ",
             c.dim(-1), "], but op(a)·op(b) is [", g.m, ", ", g.n, "]");
  LOOM_CHECK(c.numel() == 0 || (c.raw() != a.raw() && c.raw() != b.raw()), "[matmul] c must not alias a or b");
  return g;
}

void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta) {
  if (!a.device().is_cpu()) return cuda::Matmul(a, trans_a, b, trans_b, c, alpha, beta);
  LOOM_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(), "[matmul] CPU tensors only, got ",
             a.device().ToString(), ", ", b.device().ToString(), ", ", c.device().ToString());
  LOOM_CHECK(a.dtype() == b.dtype() && a.dtype() == c.dtype(), "[matmul] dtypes differ: a ", DTypeName(a.dtype()),
             ", b ", DTypeName(b.dtype()), ", c ", DTypeName(c.dtype()));
  const auto [m, n, k] = CheckMatmulShape(a, trans_a, b, trans_b, c);
  if (m == 0 || n == 0) return;

  LOOM_DISPATCH_FLOAT(a.dtype(), T, [&] {
    T* cp = c.data<T>();
    if (k == 0) {  // an empty sum: c = beta · c, with beta = 0 clearing whatever c held
      for (int64_t i = 0; i < m * n; ++i) cp[i] = beta == 0 ? T(0) : static_cast<T>(beta) * cp[i];
      return;
    }
    // Leading dimensions are the stored row lengths, whatever the transpose.
    cpu::Gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k,
            static_cast<T>(alpha), a.data<T>(), std::max<int64_t>(1, a.dim(-1)), b.data<T>(),
            std::max<int64_t>(1, b.dim(-1)), static_cast<T>(beta), cp, std::max<int64_t>(1, n));
  });
}

}  // namespace loom::ops
