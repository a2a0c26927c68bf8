#include "model/moe.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/add.h"
#include "ops/linear.h"

namespace loom {
namespace {

// xe[r] = x[id_r / k]
template <typename T>
void Gather(const Tensor& x, const std::vector<int64_t>& ids, int k, Tensor& xe) {
  const int64_t c = x.dim(1);
  for (size_t r = 0; r < ids.size(); ++r)
    std::copy_n(x.data<T>() + ids[r] / k * c, c, xe.data<T>() + r * c);
}

// y[id_r / k] += g[id_r] · ye[r]
template <typename T>
void ScatterAdd(const Tensor& ye, const std::vector<int64_t>& ids, int k, const Tensor& gates, Tensor& y) {
  const int64_t c = y.dim(1);
  for (size_t r = 0; r < ids.size(); ++r) {
    const T g = gates.data<T>()[ids[r]];
    const T* src = ye.data<T>() + r * c;
    T* dst = y.data<T>() + ids[r] / k * c;
    for (int64_t i = 0; i < c; ++i) dst[i] += g * src[i];
  }
}

// dye[r] = g[id_r] · dy[t],  dg[id_r] = dy[t] · ye[r]   (t = id_r / k)
template <typename T>
void GateBackward(const Tensor& dy, const Tensor& ye, const std::vector<int64_t>& ids, int k, const Tensor& gates,
                  Tensor& dye, Tensor& dgates) {
  const int64_t c = dy.dim(1);
  for (size_t r = 0; r < ids.size(); ++r) {
    const T g = gates.data<T>()[ids[r]];
    const T* d = dy.data<T>() + ids[r] / k * c;
    const T* o = ye.data<T>() + r * c;
    T* out = dye.data<T>() + r * c;
    T dot = 0;
    for (int64_t i = 0; i < c; ++i) {
      out[i] = g * d[i];
      dot += d[i] * o[i];
    }
    dgates.data<T>()[ids[r]] = dot;
  }
}

// dx[id_r / k] += dxe[r]
template <typename T>
void ScatterAddRows(const Tensor& dxe, const std::vector<int64_t>& ids, int k, Tensor& dx) {
  const int64_t c = dx.dim(1);
  for (size_t r = 0; r < ids.size(); ++r) {
    const T* src = dxe.data<T>() + r * c;
    T* dst = dx.data<T>() + ids[r] / k * c;
    for (int64_t i = 0; i < c; ++i) dst[i] += src[i];
  }
}

}  // namespace

MoeLayer::MoeLayer(const ModelDims& dims, const std::string& prefix) : expert_dims_(dims), moe_(dims.moe) {
  LOOM_CHECK(moe_.experts > 0 && moe_.top_k >= 1 && moe_.top_k <= moe_.experts, "[moe] ", moe_.top_k, " of ",
             moe_.experts, " experts");
  expert_dims_.ffn = moe_.ffn;
  options_ = {.experts = moe_.experts, .top_k = moe_.top_k, .sigmoid = moe_.sigmoid,
              .normalize_top_k = moe_.normalize_top_k};
  router_.Init(prefix + "router", {moe_.experts, dims.hidden}, dims.dtype, dims.seed, dims.init_std);
  for (int e = 0; e < moe_.experts; ++e)
    experts_.push_back(std::make_unique<SwigluMlp>(expert_dims_, TensorParallel{}, absl::StrCat(prefix, "experts.", e, ".")));
  for (int s = 0; s < moe_.shared_experts; ++s)
    shared_.push_back(std::make_unique<SwigluMlp>(expert_dims_, TensorParallel{}, absl::StrCat(prefix, "shared.", s, ".")));
  bias_.assign(moe_.experts, 0.0);
  pending_load_.assign(moe_.experts, 0);
}

void MoeLayer::CollectParams(ParamList& out) {
  out.push_back(&router_);
  for (auto& e : experts_) e->CollectParams(out);
  for (auto& s : shared_) s->CollectParams(out);
}

void MoeLayer::Forward(const Tensor& x, Tensor& y) {
  const int64_t t = x.dim(0), c = x.dim(1);
  const int e_count = moe_.experts, k = moe_.top_k;
  const DType dt = x.dtype();
  // Route.
  logits_ = Tensor::Empty({t, e_count}, dt);
  ops::LinearForward(x, router_.value, logits_);
  static const std::vector<double> kNoBias;
  ops::MoeRouterForward(logits_, moe_.bias_balancing ? bias_ : kNoBias, options_, routing_);
  router_loss_ = moe_.aux_loss_coef * routing_.aux_loss + moe_.z_loss_coef * routing_.z_loss;
  // Permute: assignment ids per expert in token order, then the capacity cut.
  kept_.assign(e_count, {});
  const int32_t* chosen = routing_.experts.data<int32_t>();
  for (int64_t id = 0; id < t * k; ++id) kept_[chosen[id]].push_back(id);
  int64_t dropped = 0;
  if (moe_.capacity_factor > 0) {
    const auto capacity = static_cast<int64_t>(std::ceil(moe_.capacity_factor * double(t * k) / e_count));
    for (auto& ids : kept_) {
      if (static_cast<int64_t>(ids.size()) > capacity) {
        dropped += static_cast<int64_t>(ids.size()) - capacity;
        ids.resize(capacity);
      }
    }
  }
  // Experts, then unpermute: y[t] += g · expert(x[t]), expert by expert.
  y.Zero();
  expert_x_.assign(e_count, Tensor());
  expert_y_.assign(e_count, Tensor());
  for (int e = 0; e < e_count; ++e) {
    const auto n = static_cast<int64_t>(kept_[e].size());
    if (n == 0) continue;  // no tokens: the expert's weights get no gradient
    expert_x_[e] = Tensor::Empty({n, c}, dt);
    expert_y_[e] = Tensor::Empty({n, c}, dt);
    LOOM_DISPATCH_FLOAT(dt, T, [&] { Gather<T>(x, kept_[e], k, expert_x_[e]); });
    experts_[e]->Forward(expert_x_[e], expert_y_[e]);
    LOOM_DISPATCH_FLOAT(dt, T, [&] { ScatterAdd<T>(expert_y_[e], kept_[e], k, routing_.gates, y); });
  }
  for (auto& s : shared_) {
    Tensor ys = Tensor::Empty({t, c}, dt);
    s->Forward(x, ys);
    ops::AddInPlace(y, ys);
  }
  // Statistics.
  stats_ = RoutingStats();
  stats_.assignments = t * k;
  stats_.dropped = dropped;
  const auto [lo, hi] = std::minmax_element(routing_.load.begin(), routing_.load.end());
  stats_.load_min = double(*lo);
  stats_.load_max = double(*hi);
  const double mean = double(t * k) / e_count;
  double var = 0;
  for (int64_t l : routing_.load) var += (double(l) - mean) * (double(l) - mean);
  stats_.load_cv = mean > 0 ? std::sqrt(var / e_count) / mean : 0.0;
}

void MoeLayer::Backward(const Tensor& x, const Tensor& dy, Tensor& dx, double loss_scale) {
  const int64_t t = x.dim(0), c = x.dim(1);
  const int e_count = moe_.experts, k = moe_.top_k;
  const DType dt = x.dtype();
  dx.Zero();
  Tensor dgates = Tensor::Zeros({t, k}, dt);  // dropped assignments keep 0
  for (int e = 0; e < e_count; ++e) {
    const auto n = static_cast<int64_t>(kept_[e].size());
    if (n == 0) continue;
    Tensor dye = Tensor::Empty({n, c}, dt), dxe = Tensor::Empty({n, c}, dt);
    LOOM_DISPATCH_FLOAT(dt, T, [&] {
      GateBackward<T>(dy, expert_y_[e], kept_[e], k, routing_.gates, dye, dgates);
    });
    experts_[e]->Backward(expert_x_[e], dye, dxe);
    LOOM_DISPATCH_FLOAT(dt, T, [&] { ScatterAddRows<T>(dxe, kept_[e], k, dx); });
  }
  for (auto& s : shared_) {
    Tensor dxs = Tensor::Empty({t, c}, dt);
    s->Backward(x, dy, dxs);
    ops::AddInPlace(dx, dxs);
  }
  Tensor dlogits = Tensor::Empty({t, e_count}, dt);
  ops::MoeRouterBackward(logits_, routing_, dgates, loss_scale * moe_.aux_loss_coef, loss_scale * moe_.z_loss_coef,
                         options_, dlogits);
  ops::LinearBackward(x, router_.value, dlogits, &dx, router_.grad, /*accumulate_dx=*/true);
  for (int e = 0; e < e_count; ++e) pending_load_[e] += routing_.load[e];
}

void MoeLayer::UpdateBias() {
  if (moe_.bias_balancing) ops::MoeBiasUpdate(pending_load_, moe_.bias_update_rate, bias_);
  std::fill(pending_load_.begin(), pending_load_.end(), 0);
}

void MoeLayer::ReleaseActivations() {
  logits_ = Tensor();
  routing_ = ops::MoeRouting();
  kept_.clear();
  expert_x_.clear();
  expert_y_.clear();
  for (auto& e : experts_) e->ReleaseActivations();
  for (auto& s : shared_) s->ReleaseActivations();
}

}  // namespace loom
