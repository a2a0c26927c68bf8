// CUDA MoH gates, mask and head gating (math in ops/moh_gate.h, the same as
// ops/cpu/moh_gate.cc).
//   gates, their backward: one thread a token (S, k and H are small); the
//     softmaxes in f32 from logits in the activations' dtype.
//   mask: zero-filled, then every kept (token, head) writes a 1 into its
//     block (all writers store the same value, so the races are benign).
//   gating: element-wise, 8 elements a thread; its backward one warp a
//     (token, head), dg the warp's f32 sum.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "ops/cuda/elementwise.cuh"
#include "ops/moh_gate.h"

namespace loom::ops::cuda {
namespace {

constexpr int kThreads = 256;

struct GateArgs {
  int64_t tokens;
  int heads, shared, top_k;
  bool fixed;
};

// In place over n values: softmax, in f32.
__device__ void SoftmaxInPlace(float* x, int n) {
  float m = -FLT_MAX;
  for (int i = 0; i < n; ++i) m = fmaxf(m, x[i]);
  float sum = 0;
  for (int i = 0; i < n; ++i) sum += x[i] = expf(x[i] - m);
  for (int i = 0; i < n; ++i) x[i] /= sum;
}

template <typename T>
__global__ void GatesForwardKernel(const T* __restrict__ zs, const T* __restrict__ zh, const int32_t* __restrict__ experts,
                                   const float* __restrict__ p, GateArgs a, float* __restrict__ s,
                                   float* __restrict__ alpha, float* __restrict__ g) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  float a1 = 1.f, a2 = 1.f;
  if (zh != nullptr) {
    float* at = alpha + t * 2;
    at[0] = ToF32(zh[t * 2]);
    at[1] = ToF32(zh[t * 2 + 1]);
    SoftmaxInPlace(at, 2);
    a1 = at[0];
    a2 = at[1];
  }
  float* st = zs != nullptr ? s + t * a.shared : nullptr;
  if (st != nullptr) {
    for (int i = 0; i < a.shared; ++i) st[i] = ToF32(zs[t * a.shared + i]);
    SoftmaxInPlace(st, a.shared);
  }
  float* gt = g + t * a.heads;
  for (int i = 0; i < a.heads; ++i) gt[i] = 0.f;
  for (int i = 0; i < a.shared; ++i) gt[i] = a.fixed ? 1.f : a1 * st[i];
  for (int j = 0; experts != nullptr && j < a.top_k; ++j)
    gt[a.shared + experts[t * a.top_k + j]] = a.fixed ? 1.f : a2 * p[t * a.top_k + j];
}

// Softmax backward of a 2-vector, in registers: dz = α ⊙ (dα − Σ dα α).
template <typename T>
__global__ void GatesBackwardKernel(const float* __restrict__ s, const float* __restrict__ alpha,
                                    const int32_t* __restrict__ experts, const float* __restrict__ p,
                                    const float* __restrict__ dg, GateArgs a, T* __restrict__ dzs, T* __restrict__ dzh,
                                    float* __restrict__ dp) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  const float* dgt = dg + t * a.heads;
  const float a1 = alpha != nullptr ? alpha[t * 2] : 1.f, a2 = alpha != nullptr ? alpha[t * 2 + 1] : 1.f;
  float da1 = 0, da2 = 0;
  if (s != nullptr) {
    const float* st = s + t * a.shared;
    float dot = 0;  // Σ_i ds_i s_i, ds_i = α1 dg_i
    for (int i = 0; i < a.shared; ++i) {
      da1 += dgt[i] * st[i];
      dot += a1 * dgt[i] * st[i];
    }
    for (int i = 0; i < a.shared; ++i) dzs[t * a.shared + i] = FromF32<T>(st[i] * (a1 * dgt[i] - dot));
  }
  for (int j = 0; experts != nullptr && j < a.top_k; ++j) {
    const float d = dgt[a.shared + experts[t * a.top_k + j]];
    da2 += d * p[t * a.top_k + j];
    dp[t * a.top_k + j] = a2 * d;
  }
  if (alpha != nullptr) {
    const float dot = da1 * a1 + da2 * a2;
    dzh[t * 2] = FromF32<T>(a1 * (da1 - dot));
    dzh[t * 2 + 1] = FromF32<T>(a2 * (da2 - dot));
  }
}

// The shared heads' rows of the mask are 1; each kept (token, head) marks its block.
__global__ void MaskKernel(const int32_t* __restrict__ experts, int64_t tokens, int shared, int top_k, int64_t blocks,
                           int64_t block, int32_t* __restrict__ active) {
  const int64_t fill = int64_t{shared} * blocks, marks = experts != nullptr ? tokens * top_k : 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < fill + marks;
       i += int64_t{gridDim.x} * blockDim.x) {
    if (i < fill) {
      active[i] = 1;
    } else {
      const int64_t m = i - fill, t = m / top_k;
      active[(shared + experts[m]) * blocks + t / block] = 1;
    }
  }
}

// out = g ⊙ o, kVec elements a thread (d a multiple of kVec), else one.
template <typename T>
__global__ void ApplyGatesKernel(const T* o, const float* __restrict__ g, int64_t n, int64_t d, bool vectorized,
                                 T* out) {
  const int64_t step = vectorized ? kVec : 1;
  for (int64_t i = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) * step; i < n;
       i += int64_t{gridDim.x} * blockDim.x * step) {
    const float gi = g[i / d];
    if (vectorized) {
      float v[kVec];
      LoadVec(o + i, v);
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] *= gi;
      StoreVec(out + i, v);
    } else {
      out[i] = FromF32<T>(gi * ToF32(o[i]));
    }
  }
}

// One warp a (token, head) th: dg_th = Σ dout·o (f32), d_o = g dout.
template <typename T>
__global__ void GatesGradKernel(const T* __restrict__ o, const float* __restrict__ g, const T* dout, int64_t pairs,
                                int64_t d, T* d_o, float* __restrict__ dg) {
  const int64_t th = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (th >= pairs) return;
  const float gi = g[th];
  const int64_t base = th * d;
  float dot = 0;
  for (int64_t i = lane; i < d; i += 32) {
    const float y = ToF32(dout[base + i]);
    dot += y * ToF32(o[base + i]);
    d_o[base + i] = FromF32<T>(gi * y);
  }
  dot = WarpSum(dot);
  if (lane == 0) dg[th] = dot;
}

template <typename T>
__global__ void ZeroInactiveKernel(const int32_t* __restrict__ active, int64_t tokens, int64_t heads, int64_t d,
                                   int64_t blocks, int64_t block, T* x) {
  const int64_t n = tokens * heads * d;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t th = i / d, t = th / heads, h = th % heads;
    if (active[h * blocks + t / block] == 0) x[i] = FromF32<T>(0.f);
  }
}

void CheckDevice(const Tensor& t, const Tensor& like, DType dtype, const Shape& shape, const char* name) {
  LOOM_CHECK(t.defined() && t.device() == like.device() && t.dtype() == dtype && t.shape() == shape, "[moh_gate] CUDA: ",
             name, " must be ", DTypeName(dtype), " ", ShapeString(shape), " on ", like.device().ToString(), ", got ",
             t.defined() ? DTypeName(t.dtype()) + std::string(" ") + ShapeString(t.shape()) + " on " +
                               t.device().ToString()
                         : std::string("undefined"));
}

template <typename T>
const T* Ptr(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.raw()) : nullptr;
}
template <typename T>
T* MutPtr(Tensor& t) {
  return t.defined() ? static_cast<T*>(t.raw()) : nullptr;
}

int Blocks(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

}  // namespace

void MohGatesForward(const Tensor& shared_logits, const Tensor& alpha_logits, const Tensor& experts,
                     const Tensor& routed_gates, const MohGateOptions& options, Tensor& shared_scores, Tensor& alpha,
                     Tensor& gates, CudaStream stream) {
  NvtxRange range("MohGatesForward");
  const Tensor& any = gates;
  const Device dev = gates.device();
  const int64_t t = gates.dim(0);
  const int k = options.top_k, routed = options.heads - options.shared;
  CheckDevice(gates, any, DType::kF32, {t, options.heads}, "gates");
  const DType act = shared_logits.defined() ? shared_logits.dtype()
                                            : (alpha_logits.defined() ? alpha_logits.dtype() : DType::kF32);
  if (shared_logits.defined()) CheckDevice(shared_logits, any, act, {t, options.shared}, "shared_logits");
  if (alpha_logits.defined()) CheckDevice(alpha_logits, any, act, {t, 2}, "alpha_logits");
  if (routed > 0) {
    CheckDevice(experts, any, DType::kI32, {t, k}, "experts");
    CheckDevice(routed_gates, any, DType::kF32, {t, k}, "routed_gates");
  }
  shared_scores = shared_logits.defined() ? Tensor::Empty(shared_logits.shape(), DType::kF32, dev) : Tensor();
  alpha = alpha_logits.defined() ? Tensor::Empty({t, 2}, DType::kF32, dev) : Tensor();
  if (t == 0) return;
  const GateArgs a{t, options.heads, options.shared, k, options.fixed_gates};
  const bool has_routed = routed > 0;
  LOOM_DISPATCH_ACTIVATION("moh_gate", act, T, [&] {
    GatesForwardKernel<T><<<Blocks(t), kThreads, 0, Native(stream)>>>(
        Ptr<T>(shared_logits), Ptr<T>(alpha_logits), has_routed ? Ptr<int32_t>(experts) : nullptr,
        has_routed ? Ptr<float>(routed_gates) : nullptr, a, MutPtr<float>(shared_scores), MutPtr<float>(alpha),
        MutPtr<float>(gates));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MohGatesBackward(const Tensor& shared_scores, const Tensor& alpha, const Tensor& experts,
                      const Tensor& routed_gates, const Tensor& dgates, const MohGateOptions& options,
                      Tensor& dshared_logits, Tensor& dalpha_logits, Tensor& drouted_gates, CudaStream stream) {
  NvtxRange range("MohGatesBackward");
  const Device dev = dgates.device();
  const int64_t t = dgates.dim(0);
  const int k = options.top_k, routed = options.heads - options.shared;
  CheckDevice(dgates, dgates, DType::kF32, {t, options.heads}, "dgates");
  if (shared_scores.defined()) {
    CheckDevice(shared_scores, dgates, DType::kF32, {t, options.shared}, "shared_scores");
    CheckDevice(dshared_logits, dgates, dshared_logits.dtype(), {t, options.shared}, "dshared_logits");
  }
  if (alpha.defined()) {
    CheckDevice(alpha, dgates, DType::kF32, {t, 2}, "alpha");
    CheckDevice(dalpha_logits, dgates, dalpha_logits.dtype(), {t, 2}, "dalpha_logits");
  }
  if (shared_scores.defined() && alpha.defined())
    LOOM_CHECK(dshared_logits.dtype() == dalpha_logits.dtype(), "[moh_gate] CUDA: logit gradients of two dtypes");
  if (routed > 0) {
    CheckDevice(experts, dgates, DType::kI32, {t, k}, "experts");
    CheckDevice(routed_gates, dgates, DType::kF32, {t, k}, "routed_gates");
    if (!drouted_gates.defined()) drouted_gates = Tensor::Empty({t, k}, DType::kF32, dev);
    CheckDevice(drouted_gates, dgates, DType::kF32, {t, k}, "drouted_gates");
  }
  if (t == 0) return;
  const DType act = shared_scores.defined() ? dshared_logits.dtype()
                                            : (alpha.defined() ? dalpha_logits.dtype() : DType::kF32);
  const GateArgs a{t, options.heads, options.shared, k, options.fixed_gates};
  const bool has_routed = routed > 0;
  LOOM_DISPATCH_ACTIVATION("moh_gate", act, T, [&] {
    GatesBackwardKernel<T><<<Blocks(t), kThreads, 0, Native(stream)>>>(
        Ptr<float>(shared_scores), Ptr<float>(alpha), has_routed ? Ptr<int32_t>(experts) : nullptr,
        has_routed ? Ptr<float>(routed_gates) : nullptr, Ptr<float>(dgates), a, MutPtr<T>(dshared_logits),
        MutPtr<T>(dalpha_logits), has_routed ? MutPtr<float>(drouted_gates) : nullptr);
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void MohActiveMask(const Tensor& experts, const MohGateOptions& options, int64_t tokens, int64_t block,
                   Tensor& active, CudaStream stream) {
  NvtxRange range("MohActiveMask");
  const int routed = options.heads - options.shared;
  if (routed > 0) CheckDevice(experts, experts, DType::kI32, {tokens, options.top_k}, "experts");
  const int64_t blocks = (tokens + block - 1) / block;
  active = Tensor::Zeros({options.heads, blocks}, DType::kI32, experts.device());
  const int64_t work = int64_t{options.shared} * blocks + (routed > 0 ? tokens * options.top_k : 0);
  if (work == 0) return;
  MaskKernel<<<GridFor(work), kThreads, 0, Native(stream)>>>(routed > 0 ? Ptr<int32_t>(experts) : nullptr, tokens,
                                                             options.shared, options.top_k, blocks, block,
                                                             MutPtr<int32_t>(active));
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void ApplyHeadGates(const Tensor& o, const Tensor& gates, Tensor& out, CudaStream stream) {
  NvtxRange range("ApplyHeadGates");
  const int64_t t = gates.dim(0), h = gates.dim(1), n = o.numel();
  LOOM_CHECK(t * h > 0 && n % (t * h) == 0, "[moh_gate] CUDA: gates ", ShapeString(gates.shape()), " do not fit o ",
             ShapeString(o.shape()));
  CheckDevice(gates, o, DType::kF32, {t, h}, "gates");
  CheckLike("moh_gate", out, o, "out", "o");
  const int64_t d = n / (t * h);
  const bool vec = d % kVec == 0 && Aligned16(o.raw()) && Aligned16(out.raw());
  LOOM_DISPATCH_ACTIVATION("moh_gate", o.dtype(), T, [&] {
    ApplyGatesKernel<T><<<GridFor(vec ? n / kVec : n), kThreads, 0, Native(stream)>>>(
        Ptr<T>(o), Ptr<float>(gates), n, d, vec, MutPtr<T>(out));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void HeadGatesBackward(const Tensor& o, const Tensor& gates, const Tensor& dout, Tensor& d_o, Tensor& dgates,
                       CudaStream stream) {
  NvtxRange range("HeadGatesBackward");
  const int64_t t = gates.dim(0), h = gates.dim(1), n = o.numel();
  LOOM_CHECK(t * h > 0 && n % (t * h) == 0, "[moh_gate] CUDA: gates ", ShapeString(gates.shape()), " do not fit o ",
             ShapeString(o.shape()));
  CheckDevice(gates, o, DType::kF32, {t, h}, "gates");
  CheckDevice(dgates, o, DType::kF32, {t, h}, "dgates");
  CheckLike("moh_gate", dout, o, "dout", "o");
  CheckLike("moh_gate", d_o, o, "d_o", "o");
  const int64_t pairs = t * h;
  LOOM_DISPATCH_ACTIVATION("moh_gate", o.dtype(), T, [&] {
    GatesGradKernel<T><<<Blocks(pairs * 32), kThreads, 0, Native(stream)>>>(
        Ptr<T>(o), Ptr<float>(gates), Ptr<T>(dout), pairs, n / pairs, MutPtr<T>(d_o), MutPtr<float>(dgates));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

void ZeroInactiveHeads(const Tensor& active, int64_t block, Tensor& x, CudaStream stream) {
  NvtxRange range("ZeroInactiveHeads");
  const int64_t t = x.dim(0), h = x.dim(1);
  const int64_t blocks = (t + block - 1) / block;
  CheckDevice(active, x, DType::kI32, {h, blocks}, "active");
  if (x.numel() == 0) return;
  LOOM_DISPATCH_ACTIVATION("moh_gate", x.dtype(), T, [&] {
    ZeroInactiveKernel<T><<<GridFor(x.numel()), kThreads, 0, Native(stream)>>>(
        Ptr<int32_t>(active), t, h, x.numel() / (t * h), blocks, block, MutPtr<T>(x));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
