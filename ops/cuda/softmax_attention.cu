// Loom's flash attention (bf16, Hopper sm_90a): the entry points, the host
// checks that fill the kernel parameters, and the device rows. The kernels:
//   forward   ops/cuda/flash_attention_forward_sm90.cu (FA3 design: wgmma,
//             producer/consumer warpgroups, mbarriers);
//   backward  ops/cuda/flash_attention_backward*.cu;
//   shared pieces (masks, PTX, tile layout) ops/cuda/flash_common.cuh.
// Shapes: q, o, d_o, dq [Tq, Hq, D] bf16, k, v, dk, dv [Tk, Hk, D] bf16,
// lse [Tq, Hq] f32 (natural log); query head h reads KV head h / (Hq/Hk).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "ops/cuda/flash_common.cuh"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"

namespace loom::ops::cuda {
namespace flash {

void CheckTensor(const Tensor& t, const Tensor& like, const char* name, DType dtype, const Shape& shape) {
  LOOM_CHECK(t.defined() && t.dtype() == dtype && t.shape() == shape && t.device() == like.device(),
             "[flash_attention] ", name, " must be ", DTypeName(dtype), " ", ShapeString(shape), " on ",
             like.device().ToString(), ", got ", t.defined() ? DTypeName(t.dtype()) : "undefined", " ",
             ShapeString(t.shape()), " on ", t.device().ToString());
}

Params MakeParams(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                  const CudaTokenRows& k_rows, const AttentionOptions& options, const char* op) {
  LOOM_CHECK(!q.device().is_cpu() && q.dtype() == DType::kBF16 && q.ndim() == 3, "[", op,
             "] q must be bf16 [Tq, Hq, D] on a CUDA device, got ", DTypeName(q.dtype()), " ", ShapeString(q.shape()),
             " on ", q.device().ToString());
  LOOM_CHECK(FlashAttentionRuns(q.device().index), "[", op, "] ", q.device().ToString(), " is sm_",
             CudaComputeCapability(q.device().index),
             ": Loom's flash attention kernels are Hopper (sm_90a) code; use model.attention_backend=cudnn");
  const int64_t d = q.dim(2);
  LOOM_CHECK(FlashAttentionHeadDim(d), "[", op, "] head dim ", d, " not compiled: 64 or 128");
  LOOM_CHECK(k.ndim() == 3 && k.dim(2) == d && k.dim(1) > 0 && q.dim(1) % k.dim(1) == 0, "[", op, "] k ",
             ShapeString(k.shape()), " must be [Tk, Hk, D] with Hq = ", q.dim(1), " a multiple of Hk");
  CheckTensor(k, q, "k", DType::kBF16, k.shape());
  CheckTensor(v, q, "v", DType::kBF16, k.shape());
  CheckDeviceRows(q_rows, q, "flash_attention", "q_rows");
  CheckDeviceRows(k_rows, k, "flash_attention", "k_rows");
  LOOM_CHECK(q_rows.rows() == k_rows.rows(), "[", op, "] ", q_rows.rows(), " query rows but ", k_rows.rows(),
             " key rows");
  LOOM_CHECK(q_rows.doc_ids.defined() == k_rows.doc_ids.defined(), "[", op,
             "] doc_ids must be given for both q_rows and k_rows or for neither");
  LOOM_CHECK(q_rows.rows() <= 65535, "[", op, "] at most 65535 rows, got ", q_rows.rows());
  LOOM_CHECK(q.dim(0) < (int64_t{1} << 31) && k.dim(0) < (int64_t{1} << 31), "[", op, "] token counts must fit i32");
  const int64_t shift = options.k_offset - options.q_offset;
  LOOM_CHECK(shift > -(int64_t{1} << 30) && shift < (int64_t{1} << 30), "[", op, "] |k_offset − q_offset| too large");
  const double scale = options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  Params p{};
  p.q = Bf16(q);
  p.k = Bf16(k);
  p.v = Bf16(v);
  p.cu_q = q_rows.cu_seqlens.data<int32_t>();
  p.cu_k = k_rows.cu_seqlens.data<int32_t>();
  p.doc_q = q_rows.doc_ids.defined() ? q_rows.doc_ids.data<int32_t>() : nullptr;
  p.doc_k = k_rows.doc_ids.defined() ? k_rows.doc_ids.data<int32_t>() : nullptr;
  p.tq = q.dim(0);
  p.q_end = q_rows.end;
  p.k_end = k_rows.end;
  p.hq = q.dim(1);
  p.hk = k.dim(1);
  p.group = q.dim(1) / k.dim(1);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.bias = static_cast<float>(options.sigmoid_bias);
  p.causal = options.causal;
  p.sigmoid = options.sigmoid;
  p.shift = static_cast<int>(shift);
  if (options.active.defined()) {  // MoH: skipped query tiles (ops/softmax_attention.h)
    LOOM_CHECK(options.active_block >= 1, "[", op, "] active_block must be >= 1");
    const int64_t blocks = (q.dim(0) + options.active_block - 1) / options.active_block;
    CheckTensor(options.active, q, "active", DType::kI32, {q.dim(1), blocks});
    p.active = options.active.data<int32_t>();
    p.active_blocks = blocks;
    p.active_block = options.active_block;
  }
  LOOM_CUDA_CHECK(cudaSetDevice(q.device().index));
  return p;
}

// ops/cuda/flash_attention_forward_sm90.cu: the wgmma forward, D in {64, 128}.
void LaunchForwardSm90(const Params& p, int64_t d, int64_t max_q, int64_t rows, cudaStream_t stream);

}  // namespace flash

namespace {

using namespace flash;

__global__ void FillKernel(float* x, int64_t n, float value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

}  // namespace

void CheckDeviceRows(const CudaTokenRows& rows, const Tensor& like, const char* op, const char* name) {
  LOOM_CHECK(rows.cu_seqlens.defined() && rows.cu_seqlens.dtype() == DType::kI32 && rows.cu_seqlens.ndim() == 1 &&
                 rows.cu_seqlens.numel() >= 1 && rows.cu_seqlens.device() == like.device(),
             "[", op, "] ", name, ".cu_seqlens must be an i32 vector [R+1] on ", like.device().ToString(),
             " (ops::cuda::ToDevice makes one)");
  LOOM_CHECK(!rows.doc_ids.defined() || (rows.doc_ids.dtype() == DType::kI32 && rows.doc_ids.numel() == like.dim(0) &&
                                         rows.doc_ids.device() == like.device()),
             "[", op, "] ", name, ".doc_ids must be i32 [", like.dim(0), "] on ", like.device().ToString());
  LOOM_CHECK(rows.max_len >= 0 && rows.max_len <= like.dim(0), "[", op, "] ", name, ".max_len ", rows.max_len,
             " is not in [0, ", like.dim(0), "]");
  LOOM_CHECK(rows.end >= 0 && rows.end <= like.dim(0) && (rows.end > 0 || rows.max_len == 0), "[", op, "] ", name,
             ".end ", rows.end, " is not in [0, ", like.dim(0), "] (ops::cuda::ToDevice sets it)");
}

CudaTokenRows ToDevice(const TokenRows& rows, int device) {
  LOOM_CHECK(rows.cu_seqlens.defined() && rows.cu_seqlens.device().is_cpu() &&
                 rows.cu_seqlens.dtype() == DType::kI32 && rows.cu_seqlens.numel() >= 1,
             "[flash_attention] ToDevice takes CPU rows with an i32 cu_seqlens [R+1]");
  CudaTokenRows out;
  out.cu_seqlens = Tensor::Empty(rows.cu_seqlens.shape(), DType::kI32, Device::Cuda(device));
  out.cu_seqlens.CopyFrom(rows.cu_seqlens);
  // follow: the rows lie back to back from token 0; uniform: and are all
  // of one length.
  bool follow = rows.rows() > 0 && rows.begin(0) == 0, same_length = true;
  for (int64_t r = 0; r < rows.rows(); ++r) {
    const int64_t len = rows.end(r) - rows.begin(r);
    LOOM_CHECK(len >= 0, "[flash_attention] row ", r, " has negative length");
    if (r > 0 && rows.begin(r) != rows.end(r - 1)) follow = false;
    if (r > 0 && len != out.max_len) same_length = false;
    out.max_len = std::max(out.max_len, len);
  }
  out.uniform = follow && same_length;
  out.end = rows.rows() > 0 ? rows.end(rows.rows() - 1) : 0;
  if (rows.has_docs()) {
    CheckDocumentsInOrder(rows, "flash_attention", "rows");
    out.doc_ids = Tensor::Empty(rows.doc_ids.shape(), DType::kI32, Device::Cuda(device));
    out.doc_ids.CopyFrom(rows.doc_ids);
  }
  if (follow && (rows.has_docs() || !out.uniform)) {
    const TokenRows docs = SplitAtDocuments(rows).rows;
    const int32_t* cu = docs.cu_seqlens.data<int32_t>();
    out.doc_bounds.assign(cu, cu + docs.cu_seqlens.numel());
    for (int64_t i = 0; i < docs.rows(); ++i) out.doc_max_len = std::max<int64_t>(out.doc_max_len, cu[i + 1] - cu[i]);
    out.doc_cu_seqlens = Tensor::Empty(docs.cu_seqlens.shape(), DType::kI32, Device::Cuda(device));
    out.doc_cu_seqlens.CopyFrom(docs.cu_seqlens);
  }
  return out;
}

bool FlashAttentionRuns(int device) {
  // sm_90a code only: the build's other target (sm_80, CMakeLists.txt) has
  // traps in their place. Compute capabilities, 0 until asked.
  static std::atomic<int> cc[64];
  LOOM_CHECK(device >= 0 && device < 64, "[flash_attention] device ", device, " out of range");
  if (cc[device] == 0) cc[device] = CudaComputeCapability(device);
  return cc[device] == 90;
}

AttentionBackend ParseAttentionBackend(const std::string& name) {
  if (name == "loom") return AttentionBackend::kLoom;
  if (name == "cudnn") return AttentionBackend::kCudnn;
  LOOM_CHECK(false, "[attention] model.attention_backend must be \"loom\" or \"cudnn\", got \"", name, "\"");
  return AttentionBackend::kLoom;
}

void FlashAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const CudaTokenRows& q_rows,
                           const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse,
                           CudaStream stream) {
  Params p = MakeParams(q, k, v, q_rows, k_rows, options, "flash_attention");
  CheckTensor(o, q, "o", DType::kBF16, q.shape());
  if (!options.sigmoid) CheckTensor(lse, q, "lse", DType::kF32, {q.dim(0), q.dim(1)});
  p.out = Bf16Mut(o);
  p.lse = options.sigmoid ? nullptr : lse.data<float>();
  auto s = static_cast<cudaStream_t>(stream);
  if (!q_rows.uniform) {  // tokens outside every row: o = 0, lse = −∞ (as on the CPU)
    LOOM_CUDA_CHECK(cudaMemsetAsync(o.raw(), 0, o.nbytes(), s));
    if (!options.sigmoid && lse.numel() > 0) {
      FillKernel<<<(lse.numel() + 255) / 256, 256, 0, s>>>(lse.data<float>(), lse.numel(), -INFINITY);
      LOOM_CUDA_CHECK(cudaGetLastError());
    }
  }
  LaunchForwardSm90(p, q.dim(2), q_rows.max_len, q_rows.rows(), s);
}

void AttentionForward(AttentionBackend backend, const Tensor& q, const Tensor& k, const Tensor& v,
                      const CudaTokenRows& q_rows, const CudaTokenRows& k_rows, const AttentionOptions& options,
                      Tensor& o, Tensor& lse, CudaStream stream) {
  if (backend == AttentionBackend::kCudnn) return CudnnAttentionForward(q, k, v, q_rows, k_rows, options, o, lse, stream);
  FlashAttentionForward(q, k, v, q_rows, k_rows, options, o, lse, stream);
}

void AttentionBackward(AttentionBackend backend, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& o, const Tensor& lse, const Tensor& d_o, const CudaTokenRows& q_rows,
                       const CudaTokenRows& k_rows, const AttentionOptions& options, Tensor& dq, Tensor& dk,
                       Tensor& dv, CudaStream stream) {
  if (backend == AttentionBackend::kCudnn)
    return CudnnAttentionBackward(q, k, v, o, lse, d_o, q_rows, k_rows, options, dq, dk, dv, stream);
  FlashAttentionBackward(q, k, v, o, lse, d_o, q_rows, k_rows, options, dq, dk, dv, stream);
}

}  // namespace loom::ops::cuda
