// CUDA grouped linear (see ops/grouped_linear.h): each group's three GEMMs
// through cublasGemmEx, one call a group on the caller's stream.
//
// Why not cublasGemmGroupedBatchedEx (tried, docs/gpu.md): in cuBLAS 13.1
// on the H100 it runs a CUTLASS sm80 mma.sync kernel, 2.25 ms for the 8
// experts' forward GEMMs that take 1.04 ms as 8 cublasGemmEx (nvjet sm90
// kernels), and it does not take the weight gradient's bf16·bf16 → f32 C
// (CUBLAS_STATUS_NOT_SUPPORTED).
// Why not cuBLASLt (ops/cuda/matmul.cu): its plans are cached per shape, and
// the experts' row counts change every step; cublasGemmEx chooses its kernel
// per call.
//
// Row-major to column-major as in matmul.cu (a row-major [r, c] matrix is
// the column-major [c, r] one, leading dimension c):
//   y  [R, out]  = x · Wᵀ     as  yᵀ [out, R]  = op_T(W [in, out]) · xᵀ [in, R]
//   dx [R, in]   = dy · W     as  dxᵀ [in, R]  = Wᵀ [in, out] · dyᵀ [out, R]
//   dW [out, in] += dyᵀ · x   as  dWᵀ [in, out] += xᵀ [in, R] · op_T(dyᵀ [out, R])
// The pair form reads dy2 [R, 2·out] as the column-major dy2ᵀ [2·out, R]
// (leading dimension 2·out), whose halves are dyaᵀ and dybᵀ at offsets 0
// and out with that leading dimension. Where Wb follows Wa in memory,
// [Wa; Wb] [2·out, in] is the column-major [in, 2·out], and
//   dxᵀ [in, R] = [Wa; Wb] (as [in, 2·out]) · dy2ᵀ [2·out, R]   (depth 2·out).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <mutex>
#include <numeric>

#include "ops/cuda/elementwise.cuh"
#include "ops/grouped_linear.h"

#define LOOM_CUBLAS_CALL(expr)                                                                          \
  do {                                                                                                  \
    cublasStatus_t loom_st_ = (expr);                                                                   \
    LOOM_CHECK(loom_st_ == CUBLAS_STATUS_SUCCESS, "[grouped_linear] ", #expr, " failed: ",             \
               cublasGetStatusName(loom_st_), " (", cublasGetStatusString(loom_st_), ")");             \
  } while (0)

namespace loom::ops::cuda {
namespace {

constexpr int kMaxDevices = 16;
std::mutex g_mutex;
std::array<cublasHandle_t, kMaxDevices> g_handles{};

// The device's cuBLAS handle (made on first use) bound to `stream`; call with g_mutex held.
cublasHandle_t Handle(int device, cudaStream_t stream) {
  LOOM_CHECK(device >= 0 && device < kMaxDevices, "[grouped_linear] device ", device, " out of range");
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  if (g_handles[device] == nullptr) LOOM_CUBLAS_CALL(cublasCreate(&g_handles[device]));
  LOOM_CUBLAS_CALL(cublasSetStream(g_handles[device], stream));
  return g_handles[device];
}

cudaDataType_t CudaType(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

// C (column-major m×n, ldc) = alpha · op(A) · op(B) + beta · C.
void Gemm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
          const void* b, int64_t ldb, DType ab, float beta, void* c, int64_t ldc, DType ct) {
  const float alpha = 1.0f;
  LOOM_CHECK(m < (int64_t{1} << 31) && n < (int64_t{1} << 31) && k < (int64_t{1} << 31), "[grouped_linear] GEMM ",
             m, "x", n, "x", k, " exceeds cuBLAS's int sizes");
  LOOM_CUBLAS_CALL(cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, int(m), int(n),
                                int(k), &alpha, a, CudaType(ab), int(lda), b, CudaType(ab), int(ldb), &beta, c,
                                CudaType(ct), int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void Check(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows) {
  LOOM_CHECK(!w.empty() && w.size() == rows.size(), "[grouped_linear] ", w.size(), " weights for ", rows.size(),
             " groups");
  LOOM_CHECK(x.ndim() == 2 && !x.device().is_cpu() && (x.dtype() == DType::kF32 || x.dtype() == DType::kBF16) &&
                 x.dim(0) == std::accumulate(rows.begin(), rows.end(), int64_t{0}),
             "[grouped_linear] CUDA x must be [R, in] f32 or bf16 on a GPU with R the groups' ",
             std::accumulate(rows.begin(), rows.end(), int64_t{0}), " rows, got ", ShapeString(x.shape()), " ",
             DTypeName(x.dtype()), " on ", x.device().ToString());
  for (const Tensor* wg : w)
    LOOM_CHECK(wg->ndim() == 2 && wg->shape() == w[0]->shape() && wg->dim(1) == x.dim(1) &&
                   wg->dtype() == x.dtype() && wg->device() == x.device(),
               "[grouped_linear] W ", ShapeString(wg->shape()), " ", DTypeName(wg->dtype()), " on ",
               wg->device().ToString(), " must be [out, ", x.dim(1), "] ", DTypeName(x.dtype()), " on ",
               x.device().ToString(), " like every group's");
}

void CheckLikeRows(const Tensor& t, int64_t rows, int64_t cols, const Tensor& x, const char* name) {
  LOOM_CHECK(t.ndim() == 2 && t.dim(0) == rows && t.dim(1) == cols && t.dtype() == x.dtype() &&
                 t.device() == x.device(),
             "[grouped_linear] ", name, " ", ShapeString(t.shape()), " ", DTypeName(t.dtype()), " must be [", rows,
             ", ", cols, "] ", DTypeName(x.dtype()), " on ", x.device().ToString());
}

// One f32 gradient of each weight's shape on x's device.
void CheckGrads(const std::vector<Tensor*>& dw, const std::vector<const Tensor*>& w, const Tensor& x) {
  LOOM_CHECK(dw.size() == w.size(), "[grouped_linear] ", dw.size(), " weight gradients for ", w.size(), " groups");
  for (size_t g = 0; g < w.size(); ++g)
    LOOM_CHECK(dw[g]->shape() == w[g]->shape() && dw[g]->dtype() == DType::kF32 && dw[g]->device() == x.device(),
               "[grouped_linear] dW ", ShapeString(dw[g]->shape()), " ", DTypeName(dw[g]->dtype()), " must be f32 ",
               ShapeString(w[g]->shape()), " on ", x.device().ToString());
}

}  // namespace

void GroupedLinearForward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                          Tensor& y, CudaStream stream) {
  NvtxRange range("GroupedLinearForward");
  Check(x, w, rows);
  const int64_t in = x.dim(1), out = w[0]->dim(0);
  CheckLikeRows(y, x.dim(0), out, x, "y");
  const size_t elem = DTypeSize(x.dtype());
  std::lock_guard<std::mutex> lock(g_mutex);
  cublasHandle_t h = Handle(x.device().index, Native(stream));
  int64_t at = 0;
  for (size_t g = 0; g < w.size(); ++g) {
    if (rows[g] > 0)
      Gemm(h, true, false, out, rows[g], in, w[g]->raw(), in, static_cast<const char*>(x.raw()) + at * in * elem, in,
           x.dtype(), 0.0f, static_cast<char*>(y.raw()) + at * out * elem, out, x.dtype());
    at += rows[g];
  }
}

void GroupedLinearBackward(const Tensor& x, const std::vector<const Tensor*>& w, const std::vector<int64_t>& rows,
                           const Tensor& dy, Tensor* dx, const std::vector<Tensor*>& dw, bool accumulate_dx,
                           CudaStream stream) {
  NvtxRange range("GroupedLinearBackward");
  Check(x, w, rows);
  const int64_t in = x.dim(1), out = w[0]->dim(0);
  CheckLikeRows(dy, x.dim(0), out, x, "dy");
  if (dx != nullptr) CheckLikeRows(*dx, x.dim(0), in, x, "dx");
  CheckGrads(dw, w, x);
  const size_t elem = DTypeSize(x.dtype());
  std::lock_guard<std::mutex> lock(g_mutex);
  cublasHandle_t h = Handle(x.device().index, Native(stream));
  int64_t at = 0;
  for (size_t g = 0; g < w.size(); ++g) {
    if (rows[g] > 0) {
      const char* xg = static_cast<const char*>(x.raw()) + at * in * elem;
      const char* dyg = static_cast<const char*>(dy.raw()) + at * out * elem;
      if (dx != nullptr)
        Gemm(h, false, false, in, rows[g], out, w[g]->raw(), in, dyg, out, x.dtype(), accumulate_dx ? 1.0f : 0.0f,
             static_cast<char*>(dx->raw()) + at * in * elem, in, x.dtype());
      Gemm(h, false, true, in, out, rows[g], xg, in, dyg, out, x.dtype(), 1.0f, dw[g]->raw(), in, DType::kF32);
    }
    at += rows[g];
  }
}

void GroupedLinearPairBackward(const Tensor& x, const std::vector<const Tensor*>& wa,
                               const std::vector<const Tensor*>& wb, const std::vector<int64_t>& rows, const Tensor& dy2,
                               Tensor& dx, const std::vector<Tensor*>& dwa, const std::vector<Tensor*>& dwb,
                               bool accumulate_dx, CudaStream stream) {
  NvtxRange range("GroupedLinearPairBackward");
  Check(x, wa, rows);
  Check(x, wb, rows);
  const int64_t in = x.dim(1), out = wa[0]->dim(0);
  LOOM_CHECK(wb[0]->dim(0) == out, "[grouped_linear] pair weights of ", out, " and ", wb[0]->dim(0), " rows");
  CheckLikeRows(dy2, x.dim(0), 2 * out, x, "dy2");
  CheckLikeRows(dx, x.dim(0), in, x, "dx");
  CheckGrads(dwa, wa, x);
  CheckGrads(dwb, wb, x);
  const size_t elem = DTypeSize(x.dtype());
  std::lock_guard<std::mutex> lock(g_mutex);
  cublasHandle_t h = Handle(x.device().index, Native(stream));
  const float beta_dx = accumulate_dx ? 1.0f : 0.0f;
  int64_t at = 0;
  for (size_t g = 0; g < wa.size(); ++g) {
    if (rows[g] > 0) {
      const char* xg = static_cast<const char*>(x.raw()) + at * in * elem;
      const char* dya = static_cast<const char*>(dy2.raw()) + at * 2 * out * elem;
      const char* dyb = dya + out * elem;
      char* dxg = static_cast<char*>(dx.raw()) + at * in * elem;
      if (Tensor::Stacked({wa[g], wb[g]}).defined()) {  // dx = dy2 · [Wa; Wb], one GEMM of depth 2·out
        Gemm(h, false, false, in, rows[g], 2 * out, wa[g]->raw(), in, dya, 2 * out, x.dtype(), beta_dx, dxg, in,
             x.dtype());
      } else {
        Gemm(h, false, false, in, rows[g], out, wa[g]->raw(), in, dya, 2 * out, x.dtype(), beta_dx, dxg, in,
             x.dtype());
        Gemm(h, false, false, in, rows[g], out, wb[g]->raw(), in, dyb, 2 * out, x.dtype(), 1.0f, dxg, in, x.dtype());
      }
      if (Tensor::Stacked({dwa[g], dwb[g]}).defined()) {  // [dWa; dWb] += dy2ᵀ · x, one GEMM of 2·out rows
        Gemm(h, false, true, in, 2 * out, rows[g], xg, in, dya, 2 * out, x.dtype(), 1.0f, dwa[g]->raw(), in,
             DType::kF32);
      } else {
        Gemm(h, false, true, in, out, rows[g], xg, in, dya, 2 * out, x.dtype(), 1.0f, dwa[g]->raw(), in, DType::kF32);
        Gemm(h, false, true, in, out, rows[g], xg, in, dyb, 2 * out, x.dtype(), 1.0f, dwb[g]->raw(), in, DType::kF32);
      }
    }
    at += rows[g];
  }
}

}  // namespace loom::ops::cuda
