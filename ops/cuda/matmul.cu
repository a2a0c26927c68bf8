// CUDA Matmul on cuBLASLt (see ops/matmul.h).
//
// Loom is row-major and cuBLASLt column-major: a row-major [M, N] matrix is
// the column-major [N, M] one, so c = op(a)·op(b) is computed as
//   cᵀ [N, M] = op(b)ᵀ · op(a)ᵀ
// i.e. cuBLASLt's A is our b (transposed when trans_b), its B our a. Every
// stored matrix keeps its row length as leading dimension.
//
// Precision: A, B f32 → CUBLAS_COMPUTE_32F (pedantic f32, no TF32), or
// A, B bf16 → CUBLAS_COMPUTE_32F accumulation with C, D bf16 or f32. The f32
// C of a bf16 product is how weight gradients accumulate: D = C = dW, β = 1.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "ops/matmul.h"
#include "runtime/cuda_check.h"

#define LOOM_CUBLAS_CHECK(expr)                                                           \
  do {                                                                                    \
    cublasStatus_t loom_st_ = (expr);                                                     \
    LOOM_CHECK(loom_st_ == CUBLAS_STATUS_SUCCESS, "[matmul] ", #expr, " failed: ",       \
               cublasLtGetStatusName(loom_st_), " (", cublasLtGetStatusString(loom_st_), ")"); \
  } while (0)

namespace loom::ops::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr int kMaxDevices = 16;

// What the heuristic's answer depends on.
struct PlanKey {
  int device;
  int64_t m, n, k, lda, ldb, ldc;
  DType ab, c;
  bool trans_a, trans_b;      // cuBLASLt's A and B
  int align_a, align_b, align_c;  // bytes, powers of two up to 256
  auto Tie() const {
    return std::tie(device, m, n, k, lda, ldb, ldc, ab, c, trans_a, trans_b, align_a, align_b, align_c);
  }
  bool operator<(const PlanKey& o) const { return Tie() < o.Tie(); }
};

// Descriptors and the chosen algorithm of one PlanKey, made once.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct DeviceContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

std::mutex g_mutex;
std::array<DeviceContext, kMaxDevices> g_devices;

DeviceContext& Context(int device) {
  LOOM_CHECK(device >= 0 && device < kMaxDevices, "[matmul] device ", device, " out of range");
  DeviceContext& ctx = g_devices[device];
  if (ctx.handle == nullptr) {
    LOOM_CUBLAS_CHECK(cublasLtCreate(&ctx.handle));
    LOOM_CUDA_CHECK(cudaMalloc(&ctx.workspace, kWorkspaceBytes));
  }
  return ctx;
}

cudaDataType_t CudaType(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

int Alignment(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && u % align != 0) align /= 2;
  return align;
}

std::unique_ptr<Plan> MakePlan(cublasLtHandle_t handle, const PlanKey& key) {
  auto plan = std::make_unique<Plan>();
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  // Stored (column-major) shapes: A is m×k, or k×m when transposed; B k×n or n×k.
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CudaType(key.ab), key.trans_a ? key.k : key.m,
                                               key.trans_a ? key.m : key.k, key.lda));
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CudaType(key.ab), key.trans_b ? key.n : key.k,
                                               key.trans_b ? key.k : key.n, key.ldb));
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, CudaType(key.c), key.m, key.n, key.ldc));

  cublasLtMatmulPreference_t pref;
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t workspace = kWorkspaceBytes;
  const uint32_t align_a = key.align_a, align_b = key.align_b, align_c = key.align_c;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle, plan->op, plan->a, plan->b, plan->c, plan->c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  LOOM_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0, "[matmul] cuBLASLt has no algorithm for m ", key.m, " n ",
             key.n, " k ", key.k, " ", DTypeName(key.ab), " -> ", DTypeName(key.c), " (",
             cublasLtGetStatusName(st), ")");
  plan->algo = result.algo;
  return plan;
}

// c = beta · c (an empty inner dimension).
__global__ void ScaleKernel(float* c, int64_t n, float beta) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    c[i] *= beta;
}
__global__ void ScaleKernel(__nv_bfloat16* c, int64_t n, float beta) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    c[i] = __float2bfloat16(__bfloat162float(c[i]) * beta);
}

}  // namespace

void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta,
            CudaStream stream, const Tensor* c_in) {
  LOOM_CHECK(!a.device().is_cpu() && b.device() == a.device() && c.device() == a.device(),
             "[matmul] CUDA path takes tensors on one GPU, got ", a.device().ToString(), ", ", b.device().ToString(),
             ", ", c.device().ToString());
  LOOM_CHECK(a.dtype() == b.dtype() && (a.dtype() == DType::kF32 || a.dtype() == DType::kBF16) &&
                 (c.dtype() == a.dtype() || c.dtype() == DType::kF32),
             "[matmul] CUDA takes f32 or bf16 a and b of one dtype and c in it or f32, got a ", DTypeName(a.dtype()),
             ", b ", DTypeName(b.dtype()), ", c ", DTypeName(c.dtype()));
  const auto [m, n, k] = CheckMatmulShape(a, trans_a, b, trans_b, c);
  LOOM_CHECK(c_in == nullptr || (c_in->numel() == c.numel() && c_in->dtype() == c.dtype() &&
                                 c_in->device() == c.device() && (c.numel() == 0 || (c_in->raw() != a.raw() &&
                                                                                    c_in->raw() != b.raw()))),
             "[matmul] c_in must be like c (", c.numel(), " ", DTypeName(c.dtype()), ") and not alias a or b");
  if (m == 0 || n == 0) return;
  const void* c_read = c_in != nullptr ? c_in->raw() : c.raw();
  const int device = a.device().index;
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (k == 0) {  // an empty sum: c = beta · c, with beta = 0 clearing whatever c held
    if (c_read != c.raw() && beta != 0)
      LOOM_CUDA_CHECK(cudaMemcpyAsync(c.raw(), c_read, c.nbytes(), cudaMemcpyDeviceToDevice, s));
    if (beta == 0) {
      LOOM_CUDA_CHECK(cudaMemsetAsync(c.raw(), 0, c.nbytes(), s));
    } else if (c.dtype() == DType::kF32) {
      ScaleKernel<<<256, 256, 0, s>>>(c.data<float>(), c.numel(), static_cast<float>(beta));
    } else {
      ScaleKernel<<<256, 256, 0, s>>>(static_cast<__nv_bfloat16*>(c.raw()), c.numel(), static_cast<float>(beta));
    }
    LOOM_CUDA_CHECK(cudaGetLastError());
    return;
  }

  // cuBLASLt's view: D [n, m] col-major = op(b)ᵀ-side · op(a)ᵀ-side.
  PlanKey key{device,
              /*m=*/n,
              /*n=*/m,
              k,
              /*lda=*/std::max<int64_t>(1, b.dim(-1)),
              /*ldb=*/std::max<int64_t>(1, a.dim(-1)),
              /*ldc=*/std::max<int64_t>(1, n),
              a.dtype(),
              c.dtype(),
              /*trans_a=*/trans_b,
              /*trans_b=*/trans_a,
              Alignment(b.raw()),
              Alignment(a.raw()),
              std::min(Alignment(c.raw()), Alignment(c_read))};
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceContext& ctx = Context(device);
  auto it = ctx.plans.find(key);
  if (it == ctx.plans.end()) it = ctx.plans.emplace(key, MakePlan(ctx.handle, key)).first;
  const Plan& plan = *it->second;
  LOOM_CUBLAS_CHECK(cublasLtMatmul(ctx.handle, plan.op, &alpha_f, b.raw(), plan.a, a.raw(), plan.b, &beta_f, c_read,
                                   plan.c, c.raw(), plan.c, &plan.algo, ctx.workspace, kWorkspaceBytes, s));
}

}  // namespace loom::ops::cuda
