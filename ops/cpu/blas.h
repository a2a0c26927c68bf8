// Row-major GEMM for the two CPU compute types, on OpenBLAS:
//   C = α·op(A)·op(B) + β·C;  with β = 0, C is not read (BLAS contract).
// Loom links the OpenMP build of OpenBLAS: called inside an OpenMP parallel
// region a GEMM runs on the calling thread, outside it uses the whole team.
#pragma once

#include <cblas.h>

#include <cstdint>

namespace loom::ops::cpu {

inline void Gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void Gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace loom::ops::cpu
