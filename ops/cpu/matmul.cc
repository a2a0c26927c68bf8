// CPU Matmul: one call to OpenBLAS GEMM, row-major, on the 2-D views
// [rows, last dim] of the three tensors.
#include "ops/matmul.h"

#include "ops/cpu/blas.h"

#include <algorithm>
#include <type_traits>

namespace loom::ops {
namespace {

// A tensor read as a row-major matrix: every dimension but the last is a row.
struct MatrixView {
  int64_t rows = 0;
  int64_t cols = 0;
};

MatrixView AsMatrix(const Tensor& t, const char* name) {
  LOOM_CHECK(t.ndim() >= 2, "[matmul] ", name, " needs at least 2 dimensions, got ", ShapeString(t.shape()));
  MatrixView m;
  m.cols = t.dim(-1);
  m.rows = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) m.rows *= t.dim(i);
  return m;
}

}  // namespace

void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta) {
  if (!a.device().is_cpu()) return cuda::Matmul(a, trans_a, b, trans_b, c, alpha, beta);
  LOOM_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(), "[matmul] CPU tensors only, got ",
             a.device().ToString(), ", ", b.device().ToString(), ", ", c.device().ToString());
  LOOM_CHECK(a.dtype() == b.dtype() && a.dtype() == c.dtype(), "[matmul] dtypes differ: a ", DTypeName(a.dtype()),
             ", b ", DTypeName(b.dtype()), ", c ", DTypeName(c.dtype()));
  const MatrixView av = AsMatrix(a, "a"), bv = AsMatrix(b, "b"), cv = AsMatrix(c, "c");
  const int64_t m = trans_a ? av.cols : av.rows;
  const int64_t k = trans_a ? av.rows : av.cols;
  const int64_t kb = trans_b ? bv.cols : bv.rows;
  const int64_t n = trans_b ? bv.rows : bv.cols;
  LOOM_CHECK(k == kb, "[matmul] inner dimensions differ: op(a) is [", m, ", ", k, "] (a ", ShapeString(a.shape()),
             trans_a ? " transposed" : "", "), op(b) is [", kb, ", ", n, "] (b ", ShapeString(b.shape()),
             trans_b ? " transposed" : "", ")");
  LOOM_CHECK(cv.rows == m && cv.cols == n, "[matmul] c is ", ShapeString(c.shape()), " read as [", cv.rows, ", ",
             cv.cols, "], but op(a)·op(b) is [", m, ", ", n, "]");
  LOOM_CHECK(c.numel() == 0 || (c.raw() != a.raw() && c.raw() != b.raw()), "[matmul] c must not alias a or b");
  if (m == 0 || n == 0) return;

  LOOM_DISPATCH_FLOAT(a.dtype(), T, [&] {
    T* cp = c.data<T>();
    if (k == 0) {  // an empty sum: c = beta · c, with beta = 0 clearing whatever c held
      for (int64_t i = 0; i < m * n; ++i) cp[i] = beta == 0 ? T(0) : static_cast<T>(beta) * cp[i];
      return;
    }
    // Leading dimensions are the stored row lengths, whatever the transpose.
    cpu::Gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k,
            static_cast<T>(alpha), a.data<T>(), std::max<int64_t>(1, av.cols), b.data<T>(),
            std::max<int64_t>(1, bv.cols), static_cast<T>(beta), cp, std::max<int64_t>(1, n));
  });
}

}  // namespace loom::ops
