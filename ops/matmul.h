// Matrix products: OpenBLAS on the CPU (ops/cpu/matmul.cc), cuBLASLt on CUDA
// (ops/cuda/matmul.cu). Tensors are row-major; a tensor of more than two
// dimensions is read as 2-D [rows, last dim].
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

// c[M,N] = alpha · op(a) · op(b) + beta · c, op(x) = xᵀ when trans_x.
void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha = 1.0,
            double beta = 0.0);

namespace cuda {
// CUDA tensors: a and b both f32 or both bf16; c in their dtype, or f32 for
// bf16 a and b (an f32 accumulator such as a weight gradient). f32 products
// are true f32 (CUBLAS_COMPUTE_32F, never TF32); bf16 products accumulate in
// f32. One cuBLASLt handle and one 32 MiB workspace per device, created on
// first use, and the heuristic's algorithm cached per (shape, dtypes,
// transposes, pointer alignment).
// c_in (shaped and typed like c, not aliasing a or b): the beta term reads
// c_in instead of c, c = alpha · op(a) · op(b) + beta · c_in (cuBLASLt's C
// and D apart: a skip connection added in the GEMM's epilogue).
void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta,
            CudaStream stream = nullptr, const Tensor* c_in = nullptr);
}  // namespace cuda

// The product both Matmuls compute: op(a) [m, k] · op(b) [k, n] into c
// [m, n], each tensor read as row-major [rows, last dim]. Aborts (a bug in
// the caller) on fewer than 2 dimensions, mismatched shapes, or c aliasing
// a or b (ops/cpu/matmul.cc).
struct MatmulShape {
  int64_t m = 0, n = 0, k = 0;
};
MatmulShape CheckMatmulShape(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c);

}  // namespace loom::ops
