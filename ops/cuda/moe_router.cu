// CUDA MoE router (math in ops/moe_router.h, the same as ops/cpu/moe_router.cc).
//
// Forward, one thread a token t (E is small):
//   lse_t = m + log Σ_e exp(z_te − m);  s_te = exp(z_te − lse_t) or σ(z_te)
//   top-k by repeated arg-max under the strict order (s + b desc, index asc):
//   pass j takes the largest key below pass j−1's, so no chosen flags
//   gates g_tj = s_t,e(j) (/ Σ_l s_t,e(l) with normalize_top_k)
// Statistics, one block an expert e (and one more for the z-loss), each
// thread summing a fixed stride of tokens in f64, then a fixed tree:
//   load_e = #{(t, j): e(t, j) = e},  Σ_t p_te,  Σ_t lse_t²
// Backward, one thread a token, ds_te recomputed on the fly (no [E] array a
// thread): ds_te = dp'_te + Σ_j [e(j) = e] dg'_tj, then
//   softmax dz_te = s_te (ds_te − Σ_e' ds_te' s_te'), sigmoid ds_te s_te (1 − s_te)
//   + dz · 2 lse_t softmax(z_t)_e / T.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>

#include "ops/cuda/elementwise.cuh"
#include "ops/moe_router.h"

namespace loom::ops::cuda {
namespace {

constexpr int kThreads = 256;

struct RouterArgs {
  int64_t tokens;
  int experts, top_k;
  bool sigmoid, normalize;
};

template <typename T>
__global__ void RouterForwardKernel(const T* __restrict__ logits, const double* __restrict__ bias, RouterArgs a,
                                    float* __restrict__ scores, float* __restrict__ probs, int32_t* __restrict__ chosen,
                                    float* __restrict__ gates, float* __restrict__ lse_out) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  const int e_count = a.experts, k = a.top_k;
  const T* z = logits + t * e_count;
  float* s = scores + t * e_count;
  float m = -FLT_MAX;
  for (int i = 0; i < e_count; ++i) m = fmaxf(m, ToF32(z[i]));
  float sum = 0;
  for (int i = 0; i < e_count; ++i) sum += expf(ToF32(z[i]) - m);
  const float lse = m + logf(sum);
  lse_out[t] = lse;
  if (a.sigmoid) {
    float ssum = 0;
    for (int i = 0; i < e_count; ++i) ssum += s[i] = 1.0f / (1.0f + expf(-ToF32(z[i])));
    for (int i = 0; i < e_count; ++i) probs[t * e_count + i] = s[i] / ssum;
  } else {
    for (int i = 0; i < e_count; ++i) s[i] = expf(ToF32(z[i]) - lse);
  }
  // Top-k: pass j picks the greatest (key, −index) strictly below the last pick.
  double last_key = 0;
  int last = -1;
  float gsum = 0;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    double best_key = 0;
    for (int i = 0; i < e_count; ++i) {
      const double key = double(s[i]) + (bias != nullptr ? bias[i] : 0.0);
      const bool below_last = last < 0 || key < last_key || (key == last_key && i > last);
      if (below_last && (best < 0 || key > best_key)) {  // ties keep the lower index
        best = i;
        best_key = key;
      }
    }
    chosen[t * k + j] = best;
    gsum += s[best];
    last = best;
    last_key = best_key;
  }
  for (int j = 0; j < k; ++j) {
    const float sj = s[chosen[t * k + j]];
    gates[t * k + j] = a.normalize ? sj / gsum : sj;
  }
}

// Block reduction of one f64 value per thread, in a fixed order.
__device__ double BlockSum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// Routing statistics [2E + 1]: load_e, Σ_t p_te (e < E) and Σ_t lse_t², in
// two passes with a fixed order (so the same bits every run): block b sums
// its token slice [b·n/B, (b+1)·n/B) into partials [b][2E + 1], then one
// block adds the partials in block order. kStatBlocks slices keep the whole
// GPU reading (one block an expert took 0.22 ms at 65,536 tokens).
constexpr int kStatBlocks = 256;

__global__ void RouterStatsPartialKernel(const float* __restrict__ probs, const int32_t* __restrict__ chosen,
                                         const float* __restrict__ lse, RouterArgs a, double* __restrict__ partial) {
  __shared__ double shared[kThreads];
  const int e_count = a.experts, width = 2 * e_count + 1;
  const int64_t begin = a.tokens * blockIdx.x / gridDim.x, end = a.tokens * (blockIdx.x + 1) / gridDim.x;
  double* out = partial + int64_t{blockIdx.x} * width;
  for (int e = 0; e < e_count; ++e) {
    double load = 0, prob = 0;
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) {
      prob += double(probs[t * e_count + e]);
      for (int j = 0; j < a.top_k; ++j) load += chosen[t * a.top_k + j] == e ? 1.0 : 0.0;
    }
    load = BlockSum(load, shared);
    prob = BlockSum(prob, shared);
    if (threadIdx.x == 0) out[e] = load, out[e_count + e] = prob;
  }
  double z = 0;
  for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) z += double(lse[t]) * double(lse[t]);
  z = BlockSum(z, shared);
  if (threadIdx.x == 0) out[2 * e_count] = z;
}

__global__ void RouterStatsSumKernel(const double* __restrict__ partial, int blocks, int width,
                                     double* __restrict__ stats) {
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    double sum = 0;
    for (int b = 0; b < blocks; ++b) sum += partial[int64_t{b} * width + i];
    stats[i] = sum;
  }
}

// ds_te of ops/moe_router.h for one expert e of token t: through P (dp [E],
// sigmoid: (dp_e − dot) / ssum) and through the gates.
__device__ float ScoreGrad(int e, const float* s, const double* dp, bool sigmoid, float ssum, float pdot,
                           const int32_t* chosen, const float* dg, float gsum, float gdot, int k, bool normalize) {
  float ds = sigmoid ? float((dp[e] - pdot) / ssum) : float(dp[e]);
  for (int j = 0; j < k; ++j)
    if (chosen[j] == e) ds += normalize ? (dg[j] - gdot) / gsum : dg[j];
  return ds;
}

template <typename T>
__global__ void RouterBackwardKernel(const T* __restrict__ logits, const float* __restrict__ scores,
                                     const int32_t* __restrict__ chosen_all, const float* __restrict__ gates,
                                     const float* __restrict__ lse, const float* __restrict__ dgates,
                                     const double* __restrict__ dp, double dz, RouterArgs a, T* __restrict__ dlogits) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  const int e_count = a.experts, k = a.top_k;
  const float* s = scores + t * e_count;
  const int32_t* chosen = chosen_all + t * k;
  const float* dg = dgates + t * k;
  float ssum = 0, pdot = 0;
  if (a.sigmoid) {
    for (int i = 0; i < e_count; ++i) ssum += s[i];
    for (int i = 0; i < e_count; ++i) pdot += float(dp[i]) * s[i] / ssum;
  }
  float gsum = 0, gdot = 0;
  if (a.normalize)
    for (int j = 0; j < k; ++j) {
      gsum += s[chosen[j]];
      gdot += dg[j] * gates[t * k + j];
    }
  float dot = 0;
  if (!a.sigmoid)
    for (int i = 0; i < e_count; ++i)
      dot += ScoreGrad(i, s, dp, false, ssum, pdot, chosen, dg, gsum, gdot, k, a.normalize) * s[i];
  const float zc = float(dz * 2.0 * double(lse[t]) / double(a.tokens));
  for (int i = 0; i < e_count; ++i) {
    const float ds = ScoreGrad(i, s, dp, a.sigmoid, ssum, pdot, chosen, dg, gsum, gdot, k, a.normalize);
    float d = a.sigmoid ? ds * s[i] * (1.0f - s[i]) : s[i] * (ds - dot);
    if (dz != 0) d += zc * expf(ToF32(logits[t * e_count + i]) - lse[t]);
    dlogits[t * e_count + i] = FromF32<T>(d);
  }
}

void CheckLogits(const Tensor& logits, const MoeRouterOptions& o) {
  LOOM_CHECK(!logits.device().is_cpu() && logits.ndim() == 2 &&
                 (logits.dtype() == DType::kF32 || logits.dtype() == DType::kBF16),
             "[moe_router] CUDA logits must be [T, E] f32 or bf16 on a GPU, got ", ShapeString(logits.shape()), " ",
             DTypeName(logits.dtype()), " on ", logits.device().ToString());
  LOOM_CHECK(logits.dim(1) == o.experts, "[moe_router] logits have ", logits.dim(1), " experts, options ", o.experts);
  LOOM_CHECK(o.top_k >= 1 && o.top_k <= o.experts, "[moe_router] top_k ", o.top_k, " outside [1, ", o.experts, "]");
}

int Blocks(int64_t tokens) { return static_cast<int>((tokens + kThreads - 1) / kThreads); }

}  // namespace

void MoeRouterForward(const Tensor& logits, const std::vector<double>& bias, const MoeRouterOptions& options,
                      MoeRouting& out, CudaStream stream) {
  NvtxRange range("MoeRouterForward");
  CheckLogits(logits, options);
  LOOM_CHECK(bias.empty() || static_cast<int>(bias.size()) == options.experts, "[moe_router] bias has ",
             bias.size(), " values for ", options.experts, " experts");
  const Device dev = logits.device();
  const int64_t n = logits.dim(0);
  const int e_count = options.experts;
  out.scores = Tensor::Empty(logits.shape(), DType::kF32, dev);
  out.experts = Tensor::Empty({n, options.top_k}, DType::kI32, dev);
  out.gates = Tensor::Empty({n, options.top_k}, DType::kF32, dev);
  out.lse = Tensor::Empty({n}, DType::kF32, dev);
  // Sigmoid scores are normalised for P; softmax scores are P.
  Tensor probs = options.sigmoid ? Tensor::Empty(logits.shape(), DType::kF32, dev) : out.scores;
  Tensor bias_dev;
  if (!bias.empty()) bias_dev = Tensor::FromVector<double>(bias, {e_count}).To(dev);
  const RouterArgs a{n, e_count, options.top_k, options.sigmoid, options.normalize_top_k};
  cudaStream_t s = Native(stream);
  if (n > 0) {
    LOOM_DISPATCH_ACTIVATION("moe_router", logits.dtype(), T, [&] {
      RouterForwardKernel<T><<<Blocks(n), kThreads, 0, s>>>(
          static_cast<const T*>(logits.raw()), bias.empty() ? nullptr : bias_dev.data<double>(), a,
          out.scores.data<float>(), probs.data<float>(), out.experts.data<int32_t>(), out.gates.data<float>(),
          out.lse.data<float>());
    });
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  Tensor stats = Tensor::Zeros({2 * e_count + 1}, DType::kF64, dev);
  if (n > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>(kStatBlocks, n));
    Tensor partial = Tensor::Empty({blocks, 2 * e_count + 1}, DType::kF64, dev);
    RouterStatsPartialKernel<<<blocks, kThreads, 0, s>>>(probs.data<float>(), out.experts.data<int32_t>(),
                                                         out.lse.data<float>(), a, partial.data<double>());
    LOOM_CUDA_CHECK(cudaGetLastError());
    RouterStatsSumKernel<<<1, kThreads, 0, s>>>(partial.data<double>(), blocks, 2 * e_count + 1,
                                                stats.data<double>());
    LOOM_CUDA_CHECK(cudaGetLastError());
  }
  const Tensor host = stats.To(Device::Cpu());  // waits for the kernels
  const double* h = host.data<double>();
  out.load.assign(e_count, 0);
  out.mean_prob.assign(e_count, 0.0);
  double aux = 0;
  for (int e = 0; e < e_count; ++e) {
    out.load[e] = static_cast<int64_t>(h[e]);
    out.mean_prob[e] = n > 0 ? h[e_count + e] / double(n) : 0.0;
    aux += n > 0 ? double(out.load[e]) / double(n * options.top_k) * out.mean_prob[e] : 0.0;
  }
  out.aux_loss = double(e_count) * aux;
  out.z_loss = n > 0 ? h[2 * e_count] / double(n) : 0.0;
}

void MoeRouterBackward(const Tensor& logits, const MoeRouting& routing, const Tensor& dgates, double daux,
                       double dz, const MoeRouterOptions& options, Tensor& dlogits, CudaStream stream) {
  NvtxRange range("MoeRouterBackward");
  CheckLogits(logits, options);
  const int64_t n = logits.dim(0);
  const int e_count = options.experts, k = options.top_k;
  LOOM_CHECK(dgates.numel() == n * k && dgates.dtype() == DType::kF32 && dgates.device() == logits.device() &&
                 routing.gates.dtype() == DType::kF32 && routing.scores.numel() == logits.numel(),
             "[moe_router] CUDA dgates must be [T, k] f32 beside f32 routing of the same logits, got ",
             ShapeString(dgates.shape()), " ", DTypeName(dgates.dtype()));
  LOOM_CHECK(dlogits.numel() == logits.numel() && dlogits.dtype() == logits.dtype() &&
                 dlogits.device() == logits.device(),
             "[moe_router] dlogits ", ShapeString(dlogits.shape()), " ", DTypeName(dlogits.dtype()),
             " must match logits ", ShapeString(logits.shape()), " ", DTypeName(logits.dtype()));
  LOOM_CHECK(static_cast<int>(routing.load.size()) == e_count, "[moe_router] routing holds ", routing.load.size(),
             " loads for ", e_count, " experts");
  if (n == 0) return;
  // dp_e = daux · E f_e / T (d aux / d p_te).
  std::vector<double> dp(e_count);
  for (int e = 0; e < e_count; ++e)
    dp[e] = daux * double(e_count) * (double(routing.load[e]) / double(n * k)) / double(n);
  const Tensor dp_dev = Tensor::FromVector<double>(dp, {e_count}).To(logits.device());
  const RouterArgs a{n, e_count, k, options.sigmoid, options.normalize_top_k};
  LOOM_DISPATCH_ACTIVATION("moe_router", logits.dtype(), T, [&] {
    RouterBackwardKernel<T><<<Blocks(n), kThreads, 0, Native(stream)>>>(
        static_cast<const T*>(logits.raw()), routing.scores.data<float>(), routing.experts.data<int32_t>(),
        routing.gates.data<float>(), routing.lse.data<float>(), dgates.data<float>(), dp_dev.data<double>(), dz, a,
        static_cast<T*>(dlogits.raw()));
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::ops::cuda
