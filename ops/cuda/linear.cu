// CUDA Linear (see ops/linear.h): the three GEMMs of ops/cpu/linear.cc on
// cuBLASLt, with the GPU dtype contract (docs/gpu.md) checked here.
//   forward   y [N, out] = x [N, in] · W [out, in]ᵀ (+ residual, cuBLASLt's C)
//   backward  dx [N, in] = dy · W        (written, or added: accumulate_dx)
//             dW [out, in] += dyᵀ · x     (f32, whatever the activations' dtype)
#include "ops/linear.h"
#include "ops/matmul.h"

namespace loom::ops::cuda {
namespace {

Tensor Rows(const Tensor& t, int64_t rows, int64_t cols, DType dtype, const Tensor& x, const char* name) {
  LOOM_CHECK(t.numel() == rows * cols && t.dtype() == dtype && t.device() == x.device(), "[linear] ", name, " ",
             ShapeString(t.shape()), " ", DTypeName(t.dtype()), " on ", t.device().ToString(), " must hold [", rows,
             ", ", cols, "] ", DTypeName(dtype), " on ", x.device().ToString());
  return t.Reshape({rows, cols});
}

// x read as [rows, in]; checks W against it.
int64_t CheckInputs(const Tensor& x, const Tensor& w) {
  LOOM_CHECK(w.ndim() == 2, "[linear] W must be [out, in], got ", ShapeString(w.shape()));
  LOOM_CHECK(x.dtype() == w.dtype() && (x.dtype() == DType::kF32 || x.dtype() == DType::kBF16) &&
                 w.device() == x.device(),
             "[linear] CUDA takes x and W both f32 or both bf16 on one GPU, got x ", DTypeName(x.dtype()), " on ",
             x.device().ToString(), ", W ", DTypeName(w.dtype()), " on ", w.device().ToString());
  LOOM_CHECK(w.dim(1) > 0 && x.numel() % w.dim(1) == 0, "[linear] x ", ShapeString(x.shape()),
             " is not rows of W's input size ", w.dim(1));
  return x.numel() / w.dim(1);
}

}  // namespace

void LinearForward(const Tensor& x, const Tensor& w, Tensor& y, const Tensor* residual, CudaStream stream) {
  const int64_t rows = CheckInputs(x, w);
  Tensor y2 = Rows(y, rows, w.dim(0), x.dtype(), x, "y");
  const Tensor r2 = residual != nullptr ? Rows(*residual, rows, w.dim(0), x.dtype(), x, "residual") : Tensor();
  Matmul(x.Reshape({rows, w.dim(1)}), /*trans_a=*/false, w, /*trans_b=*/true, y2, 1.0, residual != nullptr ? 1.0 : 0.0,
         stream, residual != nullptr ? &r2 : nullptr);
}

void LinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, bool accumulate_dx,
                    CudaStream stream) {
  const int64_t rows = CheckInputs(x, w);
  LOOM_CHECK(dw.shape() == w.shape() && dw.dtype() == DType::kF32 && dw.device() == x.device(), "[linear] dW ",
             ShapeString(dw.shape()), " ", DTypeName(dw.dtype()), " must be f32 ", ShapeString(w.shape()), " on ",
             x.device().ToString());
  const Tensor dy2 = Rows(dy, rows, w.dim(0), x.dtype(), x, "dy");
  if (dx != nullptr) {
    Tensor dx2 = Rows(*dx, rows, w.dim(1), x.dtype(), x, "dx");
    Matmul(dy2, false, w, false, dx2, 1.0, accumulate_dx ? 1.0 : 0.0, stream);
  }
  Matmul(dy2, /*trans_a=*/true, x.Reshape({rows, w.dim(1)}), /*trans_b=*/false, dw, 1.0, /*beta=*/1.0, stream);
}

}  // namespace loom::ops::cuda
