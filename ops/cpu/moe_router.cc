// CPU MoE router (math in ops/moe_router.h). Per-token loops; the router is
// [T, E] with E small, so clarity wins over speed here.
#include "ops/moe_router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace loom::ops {
namespace {

void CheckOptions(const Tensor& logits, const MoeRouterOptions& o) {
  LOOM_CHECK(logits.device().is_cpu() && logits.ndim() == 2, "[moe_router] logits must be a CPU [T, E] tensor, got ",
             ShapeString(logits.shape()));
  LOOM_CHECK(logits.dim(1) == o.experts, "[moe_router] logits have ", logits.dim(1), " experts, options ", o.experts);
  LOOM_CHECK(o.top_k >= 1 && o.top_k <= o.experts, "[moe_router] top_k ", o.top_k, " outside [1, ", o.experts, "]");
}

template <typename T>
void Forward(const Tensor& logits_t, const std::vector<double>& bias, const MoeRouterOptions& o, MoeRouting& out) {
  const int64_t n = logits_t.dim(0), e = o.experts, k = o.top_k;
  const T* z = logits_t.data<T>();
  T* s = out.scores.data<T>();
  T* g = out.gates.data<T>();
  T* lse = out.lse.data<T>();
  int32_t* chosen = out.experts.data<int32_t>();
  std::vector<double> prob_sum(e, 0.0);
  std::vector<int> order(e);
  double z_sum = 0;
  for (int64_t t = 0; t < n; ++t) {
    const T* zt = z + t * e;
    T* st = s + t * e;
    const T m = *std::max_element(zt, zt + e);
    T sum = 0;
    for (int64_t i = 0; i < e; ++i) sum += std::exp(zt[i] - m);
    lse[t] = m + std::log(sum);
    z_sum += double(lse[t]) * double(lse[t]);
    if (o.sigmoid) {
      T ssum = 0;
      for (int64_t i = 0; i < e; ++i) ssum += st[i] = T(1) / (T(1) + std::exp(-zt[i]));
      for (int64_t i = 0; i < e; ++i) prob_sum[i] += double(st[i] / ssum);
    } else {
      for (int64_t i = 0; i < e; ++i) prob_sum[i] += double(st[i] = std::exp(zt[i] - lse[t]));
    }
    // Top-k of s + b; ties to the lower index (a strict order on (value, index)).
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int i) { return double(st[i]) + (bias.empty() ? 0.0 : bias[i]); };
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
      const double ka = key(a), kb = key(b);
      return ka > kb || (ka == kb && a < b);
    });
    T gsum = 0;
    for (int64_t j = 0; j < k; ++j) gsum += st[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      chosen[t * k + j] = order[j];
      g[t * k + j] = o.normalize_top_k ? st[order[j]] / gsum : st[order[j]];
      ++out.load[order[j]];
    }
  }
  double aux = 0;
  for (int64_t i = 0; i < e; ++i) {
    out.mean_prob[i] = n > 0 ? prob_sum[i] / double(n) : 0.0;
    const double f = n > 0 ? double(out.load[i]) / double(n * k) : 0.0;
    aux += f * out.mean_prob[i];
  }
  out.aux_loss = double(e) * aux;
  out.z_loss = n > 0 ? z_sum / double(n) : 0.0;
}

template <typename T>
void Backward(const Tensor& logits_t, const MoeRouting& r, const Tensor& dgates_t, double daux, double dzl,
              const MoeRouterOptions& o, Tensor& dlogits_t) {
  const int64_t n = logits_t.dim(0), e = o.experts, k = o.top_k;
  const T* z = logits_t.data<T>();
  const T* s = r.scores.data<T>();
  const T* g = r.gates.data<T>();
  const T* lse = r.lse.data<T>();
  const T* dg = dgates_t.data<T>();
  const int32_t* chosen = r.experts.data<int32_t>();
  T* dl = dlogits_t.data<T>();
  // d aux / d P_e = E f_e, d P_e / d p_te = 1/T.
  std::vector<double> dp(e);
  for (int64_t i = 0; i < e; ++i)
    dp[i] = n > 0 ? daux * double(e) * (double(r.load[i]) / double(n * k)) / double(n) : 0.0;
  std::vector<double> ds(e);
  for (int64_t t = 0; t < n; ++t) {
    const T* st = s + t * e;
    // Through P: softmax p = s; sigmoid p = s / S, so ds_e = (dp_e − Σ dp p) / S.
    if (o.sigmoid) {
      double ssum = 0, dot = 0;
      for (int64_t i = 0; i < e; ++i) ssum += st[i];
      for (int64_t i = 0; i < e; ++i) dot += dp[i] * st[i] / ssum;
      for (int64_t i = 0; i < e; ++i) ds[i] = (dp[i] - dot) / ssum;
    } else {
      for (int64_t i = 0; i < e; ++i) ds[i] = dp[i];
    }
    // Through the gates.
    if (o.normalize_top_k) {
      double gsum = 0, dot = 0;
      for (int64_t j = 0; j < k; ++j) {
        gsum += st[chosen[t * k + j]];
        dot += double(dg[t * k + j]) * g[t * k + j];
      }
      for (int64_t j = 0; j < k; ++j) ds[chosen[t * k + j]] += (dg[t * k + j] - dot) / gsum;
    } else {
      for (int64_t j = 0; j < k; ++j) ds[chosen[t * k + j]] += dg[t * k + j];
    }
    // Through the score function, then the z-loss.
    T* dlt = dl + t * e;
    if (o.sigmoid) {
      for (int64_t i = 0; i < e; ++i) dlt[i] = T(ds[i] * st[i] * (1 - st[i]));
    } else {
      double dot = 0;
      for (int64_t i = 0; i < e; ++i) dot += ds[i] * st[i];
      for (int64_t i = 0; i < e; ++i) dlt[i] = T(st[i] * (ds[i] - dot));
    }
    if (dzl != 0) {
      const double c = dzl * 2.0 * double(lse[t]) / double(n);
      for (int64_t i = 0; i < e; ++i) dlt[i] += T(c * std::exp(double(z[t * e + i] - lse[t])));
    }
  }
}

}  // namespace

void MoeRouterForward(const Tensor& logits, const std::vector<double>& bias, const MoeRouterOptions& options,
                      MoeRouting& out) {
  if (!logits.device().is_cpu()) return cuda::MoeRouterForward(logits, bias, options, out);
  CheckOptions(logits, options);
  LOOM_CHECK(bias.empty() || static_cast<int>(bias.size()) == options.experts, "[moe_router] bias has ",
             bias.size(), " values for ", options.experts, " experts");
  const int64_t n = logits.dim(0);
  out.scores = Tensor::Empty(logits.shape(), logits.dtype());
  out.experts = Tensor::Empty({n, options.top_k}, DType::kI32);
  out.gates = Tensor::Empty({n, options.top_k}, logits.dtype());
  out.lse = Tensor::Empty({n}, logits.dtype());
  out.load.assign(options.experts, 0);
  out.mean_prob.assign(options.experts, 0.0);
  LOOM_DISPATCH_FLOAT(logits.dtype(), T, [&] { Forward<T>(logits, bias, options, out); });
}

void MoeRouterBackward(const Tensor& logits, const MoeRouting& routing, const Tensor& dgates, double daux,
                       double dz, const MoeRouterOptions& options, Tensor& dlogits) {
  if (!logits.device().is_cpu()) return cuda::MoeRouterBackward(logits, routing, dgates, daux, dz, options, dlogits);
  CheckOptions(logits, options);
  LOOM_CHECK(dgates.numel() == routing.gates.numel() && dgates.dtype() == logits.dtype(),
             "[moe_router] dgates ", ShapeString(dgates.shape()), " must match gates ",
             ShapeString(routing.gates.shape()));
  LOOM_CHECK(dlogits.numel() == logits.numel() && dlogits.dtype() == logits.dtype(), "[moe_router] dlogits ",
             ShapeString(dlogits.shape()), " must match logits ", ShapeString(logits.shape()));
  LOOM_DISPATCH_FLOAT(logits.dtype(), T, [&] { Backward<T>(logits, routing, dgates, daux, dz, options, dlogits); });
}

void MoeBiasUpdate(const std::vector<int64_t>& load, double rate, std::vector<double>& bias) {
  LOOM_CHECK(load.size() == bias.size(), "[moe_router] bias update: ", load.size(), " loads for ", bias.size(),
             " biases");
  if (load.empty()) return;
  const double mean = std::accumulate(load.begin(), load.end(), 0.0) / double(load.size());
  for (size_t i = 0; i < load.size(); ++i) {
    const double diff = mean - double(load[i]);
    bias[i] += rate * double((diff > 0) - (diff < 0));
  }
}

}  // namespace loom::ops
