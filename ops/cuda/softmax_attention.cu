// Loom's flash attention for Hopper (sm_90a), FA2 design: bf16 tiles in
// shared memory fed by cp.async, mma.sync m16n8k16 tensor-core products with
// f32 accumulators, ldmatrix fragments, the online softmax kept in
// registers. The math is ops/softmax_attention.h's; shapes:
//   q, o, d_o, dq [Tq, Hq, D] bf16    k, v, dk, dv [Tk, Hk, D] bf16
//   lse [Tq, Hq] f32 (natural log)    query head h reads KV head h / (Hq/Hk)
//
// Forward, one block = kBlockM queries of one row and one query head,
// 4 warps of 32 query rows each, walking kBlockN keys at a time:
//   S = Q Kᵀ (f32), m' = max(m, rowmax(S·c)), c = scale·log2(e),
//   P = 2^(S·c − m'), l' = 2^(m − m') l + rowsum(P), O' = 2^(m − m') O + P V,
//   at the end O /= l, lse = (m + log2 l) · ln 2.
//   Sigmoid: P = σ(scale·S + b) on visible entries, O = Σ P V, no m, l, lse.
//   K of tile j+1 loads while tile j's P V runs, V of tile j while its Q Kᵀ
//   runs (two cp.async groups in flight, FA2's schedule).
//
// Backward: ops/cuda/flash_attention_backward.cu. Shared pieces (masks,
// PTX, tile layout): ops/cuda/flash_common.cuh.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops/cuda/flash_common.cuh"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

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
  const int64_t d = q.dim(2);
  LOOM_CHECK(d == 64 || d == 128, "[", op, "] head dim ", d, " not compiled: 64 or 128");
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
  p.hq = q.dim(1);
  p.hk = k.dim(1);
  p.group = q.dim(1) / k.dim(1);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.bias = static_cast<float>(options.sigmoid_bias);
  p.causal = options.causal;
  p.sigmoid = options.sigmoid;
  p.shift = static_cast<int>(shift);
  LOOM_CUDA_CHECK(cudaSetDevice(q.device().index));
  return p;
}


}  // namespace flash

namespace {

using namespace flash;

// ------------------------------------------------------------------ forward

template <int D>
struct FwdTile {
  static constexpr int kM = 128, kN = D == 128 ? 32 : 64, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kSmem = (kM + 2 * kN) * D * 2;
};

template <int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads, 2) FlashForwardKernel(const Params p) {
  using T = FwdTile<D>;
  constexpr int kM = T::kM, kN = T::kN, kChunks = D / 8, kDt = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sq = SmemAddr(smem), sk = sq + kM * D * 2, sv = sk + kN * D * 2;

  const int tile = gridDim.x - 1 - blockIdx.x;  // heavy causal tiles first
  const int h = blockIdx.y, row = blockIdx.z, kvh = h / p.group;
  const int q0 = p.cu_q[row], nq = p.cu_q[row + 1] - q0;
  const int k0 = p.cu_k[row], nk = p.cu_k[row + 1] - k0;
  const int i0 = tile * kM;
  if (i0 >= nq) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const MaskArgs mask{p.causal, p.shift, p.doc_q ? p.doc_q + q0 : nullptr, p.doc_k ? p.doc_k + k0 : nullptr, nq, nk};

  int n_end = nk;
  if (p.causal) n_end = max(0, min(nk, i0 + kM - p.shift));
  const int n_tiles = (n_end + kN - 1) / kN;

  const int64_t ldq = p.hq * D, ldk = p.hk * D;
  const __nv_bfloat16* qbase = p.q + (q0 + i0) * ldq + h * D;
  const __nv_bfloat16* kbase = p.k + k0 * ldk + kvh * D;
  const __nv_bfloat16* vbase = p.v + k0 * ldk + kvh * D;

  // A operand rows (Q), B operand rows (K), transposed B (V).
  const FragAddr<kChunks> fq(sq, lane % 16, lane / 16);
  const FragAddr<kChunks> fk(sk, lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
  const FragAddr<kChunks> fv(sv, lane % 8 + 8 * ((lane / 8) % 2), lane / 16);

  float acc[2][kDt][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][dt][e] = 0.f;
  float m[2][2], l[2][2];  // [m-tile][row g / g+8], m in the log2 domain
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) m[mt][r] = -INFINITY, l[mt][r] = 0.f;

  if (n_tiles > 0) {
    LoadTile<kM, D, T::kThreads>(sq, qbase, ldq, nq - i0, tid);
    LoadTile<kN, D, T::kThreads>(sk, kbase, ldk, nk, tid);
    CpAsyncCommit();
  }
  for (int jt = 0; jt < n_tiles; ++jt) {
    const int j0 = jt * kN;
    CpAsyncWait<0>();
    __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
    LoadTile<kN, D, T::kThreads>(sv, vbase + j0 * ldk, ldk, nk - j0, tid);
    CpAsyncCommit();

    // S = Q K_jᵀ: 32 query rows (2 m-tiles) x 64 keys (8 n-tiles) a warp.
    float s[2][kN / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) LdMatrixX4(a[mt], fq.at(warp * 2 + mt, kk));
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        LdMatrixX4(b, fk.at(np, kk));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma(s[mt][2 * np], a[mt], b[0], b[1]);
          Mma(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    const bool need_mask = (p.causal && i0 - p.shift < j0 + kN - 1) || j0 + kN > nk || mask.qdoc != nullptr;
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = i0 + warp * 32 + mt * 16 + g + 8 * (e / 2), j = j0 + nt * 8 + 2 * t + (e % 2);
            // Rows past nq see nothing: m stays −∞, P = 0, nothing stored.
            if (!mask.Visible(i, j)) s[mt][nt][e] = -INFINITY;
          }
    }

    if (p.sigmoid) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = s[mt][nt][e];
            // σ(z) with z = −∞ (masked) is 0: 1/(1+e^∞) = 0.
            s[mt][nt][e] = 1.f / (1.f + exp2f(-(x * p.scale + p.bias) * kLog2e));
          }
    } else {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m[mt][r], mx * p.scale_log2);
          // A row with nothing visible yet keeps m = −∞; subtract 0 then so
          // that 2^(−∞ − (−∞)) never appears.
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m[mt][r] - m_use);
          m[mt][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const float e = exp2f(fmaf(s[mt][nt][2 * r + c], p.scale_log2, -m_use));
              s[mt][nt][2 * r + c] = e;
              sum += e;
            }
          l[mt][r] = l[mt][r] * alpha + sum;
#pragma unroll
          for (int dt = 0; dt < kDt; ++dt) acc[mt][dt][2 * r] *= alpha, acc[mt][dt][2 * r + 1] *= alpha;
        }
    }

    CpAsyncWait<0>();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (jt + 1 < n_tiles) {
      LoadTile<kN, D, T::kThreads>(sk, kbase + (j0 + kN) * ldk, ldk, nk - j0 - kN, tid);
      CpAsyncCommit();
    }

    // O += P V_j: P (C fragments of S) is the A operand as it stands.
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        a[mt][0] = PackBf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = PackBf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = PackBf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = PackBf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        LdMatrixX4Trans(b, fv.at(kk, dp));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma(acc[mt][2 * dp], a[mt], b[0], b[1]);
          Mma(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // O /= l, lse = (m + log2 l) ln 2; straight from the C fragments to global.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = i0 + warp * 32 + mt * 16 + g + 8 * r;
      float inv = 1.f;
      if (!p.sigmoid) {
        float sum = l[mt][r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv = sum > 0.f ? 1.f / sum : 0.f;
        if (t == 0 && i < nq)
          p.lse[(q0 + i) * p.hq + h] = sum > 0.f ? (m[mt][r] + log2f(sum)) * kLn2 : -INFINITY;
      }
      if (i < nq) {
        __nv_bfloat16* orow = p.out + (q0 + i) * ldq + h * D;
#pragma unroll
        for (int dt = 0; dt < kDt; ++dt)
          *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) =
              PackBf16(acc[mt][dt][2 * r] * inv, acc[mt][dt][2 * r + 1] * inv);
      }
    }
}

__global__ void FillKernel(float* x, int64_t n, float value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = value;
}

template <int D>
void LaunchForward(const Params& p, int64_t max_q, int64_t rows, cudaStream_t stream) {
  using T = FwdTile<D>;
  static bool configured = [] {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(FlashForwardKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         T::kSmem));
    return true;
  }();
  (void)configured;
  const dim3 grid((max_q + T::kM - 1) / T::kM, p.hq, rows);
  if (grid.x == 0 || rows == 0) return;
  FlashForwardKernel<D><<<grid, T::kThreads, T::kSmem, stream>>>(p);
  LOOM_CUDA_CHECK(cudaGetLastError());
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
}

CudaTokenRows ToDevice(const TokenRows& rows, int device) {
  LOOM_CHECK(rows.cu_seqlens.defined() && rows.cu_seqlens.device().is_cpu() &&
                 rows.cu_seqlens.dtype() == DType::kI32 && rows.cu_seqlens.numel() >= 1,
             "[flash_attention] ToDevice takes CPU rows with an i32 cu_seqlens [R+1]");
  CudaTokenRows out;
  out.cu_seqlens = Tensor::Empty(rows.cu_seqlens.shape(), DType::kI32, Device::Cuda(device));
  out.cu_seqlens.CopyFrom(rows.cu_seqlens);
  bool uniform = rows.rows() > 0 && rows.begin(0) == 0;
  for (int64_t r = 0; r < rows.rows(); ++r) {
    const int64_t len = rows.end(r) - rows.begin(r);
    LOOM_CHECK(len >= 0, "[flash_attention] row ", r, " has negative length");
    if (r > 0 && (len != out.max_len || rows.begin(r) != rows.end(r - 1))) uniform = false;
    out.max_len = std::max(out.max_len, len);
  }
  out.uniform = uniform;
  if (rows.has_docs()) {
    out.doc_ids = Tensor::Empty(rows.doc_ids.shape(), DType::kI32, Device::Cuda(device));
    out.doc_ids.CopyFrom(rows.doc_ids);
  }
  return out;
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
  if (q.dim(2) == 64) LaunchForward<64>(p, q_rows.max_len, q_rows.rows(), s);
  else LaunchForward<128>(p, q_rows.max_len, q_rows.rows(), s);
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
