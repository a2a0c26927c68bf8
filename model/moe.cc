#include "model/moe.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/add.h"
#include "ops/linear.h"
#include "parallel/communicator.h"

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

// The dp (× cp) group when it has other ranks, else null.
Communicator* StatsGroup(const MoeDims& moe) {
  return moe.parallel != nullptr && moe.parallel->stats != nullptr && moe.parallel->stats->size() > 1
             ? moe.parallel->stats
             : nullptr;
}

}  // namespace

MoeLayer::MoeLayer(const ModelDims& dims, const std::string& prefix) : expert_dims_(dims), moe_(dims.moe) {
  LOOM_CHECK(moe_.experts > 0 && moe_.top_k >= 1 && moe_.top_k <= moe_.experts, "[moe] ", moe_.top_k, " of ",
             moe_.experts, " experts");
  expert_dims_.ffn = moe_.ffn;
  options_ = {.experts = moe_.experts, .top_k = moe_.top_k, .sigmoid = moe_.sigmoid,
              .normalize_top_k = moe_.normalize_top_k};
  router_.Init(prefix + "router", {moe_.experts, dims.hidden}, dims.dtype, dims.seed, dims.init_std);
  int owned = moe_.experts;
  if (moe_.parallel != nullptr && moe_.parallel->ep != nullptr && moe_.parallel->ep->size() > 1) {
    ep_ = moe_.parallel->ep;
    LOOM_CHECK(moe_.experts % ep_->size() == 0, "[moe] ", moe_.experts, " experts do not split over ep = ",
               ep_->size());
    owned = moe_.experts / ep_->size();
    first_expert_ = ep_->rank() * owned;
  }
  for (int e = first_expert_; e < first_expert_ + owned; ++e)
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
  // Global statistics: sums over the stats group of (load_e, Σ_t p_te,
  // Σ_t lse_t², T), added in group-rank order so every rank gets the same
  // numbers; `before`: each expert's assignments on the lower ranks.
  std::vector<int64_t> before(e_count, 0);
  global_load_ = routing_.load;
  global_tokens_ = t;
  double aux = routing_.aux_loss, zl = routing_.z_loss;
  if (Communicator* group = StatsGroup(moe_)) {
    const int64_t w = 2 * e_count + 2;
    Tensor mine = Tensor::Empty({w}, DType::kF64), all = Tensor::Empty({group->size() * w}, DType::kF64);
    double* m = mine.data<double>();
    for (int e = 0; e < e_count; ++e) {
      m[e] = double(routing_.load[e]);
      m[e_count + e] = routing_.mean_prob[e] * double(t);
    }
    m[2 * e_count] = routing_.z_loss * double(t);
    m[2 * e_count + 1] = double(t);
    const absl::Status st = group->AllGather(mine, all);
    LOOM_CHECK(st.ok(), "[moe] router statistics: ", st.message());
    std::vector<double> prob(e_count, 0.0);
    double z_sum = 0;
    global_load_.assign(e_count, 0);
    global_tokens_ = 0;
    for (int r = 0; r < group->size(); ++r) {
      const double* a = all.data<double>() + r * w;
      for (int e = 0; e < e_count; ++e) {
        const auto load = static_cast<int64_t>(a[e]);
        if (r < group->rank()) before[e] += load;
        global_load_[e] += load;
        prob[e] += a[e_count + e];
      }
      z_sum += a[2 * e_count];
      global_tokens_ += static_cast<int64_t>(a[2 * e_count + 1]);
    }
    const double n = double(global_tokens_);
    aux = 0;
    for (int e = 0; e < e_count; ++e)
      aux += n > 0 ? double(global_load_[e]) / (n * k) * (prob[e] / n) : 0.0;
    aux *= e_count;
    zl = n > 0 ? z_sum / n : 0.0;
  }
  router_loss_ = moe_.aux_loss_coef * aux + moe_.z_loss_coef * zl;
  // Permute: assignment ids per expert in token order, then the capacity cut
  // (in global token order: the lower ranks' assignments come first).
  kept_.assign(e_count, {});
  const int32_t* chosen = routing_.experts.data<int32_t>();
  for (int64_t id = 0; id < t * k; ++id) kept_[chosen[id]].push_back(id);
  int64_t dropped = 0;
  if (moe_.capacity_factor > 0) {
    const auto capacity =
        static_cast<int64_t>(std::ceil(moe_.capacity_factor * double(global_tokens_ * k) / e_count));
    for (int e = 0; e < e_count; ++e) {
      dropped += std::max<int64_t>(global_load_[e] - capacity, 0);
      const int64_t keep = std::clamp<int64_t>(capacity - before[e], 0, static_cast<int64_t>(kept_[e].size()));
      kept_[e].resize(keep);
    }
  }
  // Dispatch the kept rows to their experts, run the local experts, combine,
  // then unpermute: y[t] += g · expert(x[t]), expert by expert.
  sent_ids_.clear();
  std::vector<int64_t> rows_per_expert(e_count);
  for (int e = 0; e < e_count; ++e) {
    sent_ids_.insert(sent_ids_.end(), kept_[e].begin(), kept_[e].end());
    rows_per_expert[e] = static_cast<int64_t>(kept_[e].size());
  }
  exchange_ = std::make_unique<ExpertExchange>(ep_, e_count, rows_per_expert);
  Tensor sent = Tensor::Empty({static_cast<int64_t>(sent_ids_.size()), c}, dt);
  LOOM_DISPATCH_FLOAT(dt, T, [&] { Gather<T>(x, sent_ids_, k, sent); });
  expert_x_ = exchange_->Dispatch(sent);
  std::vector<Tensor> expert_y(experts_.size());
  for (size_t i = 0; i < experts_.size(); ++i) {
    if (exchange_->local_rows(i) == 0) continue;  // no tokens: the expert's weights get no gradient
    expert_y[i] = Tensor::Empty(expert_x_[i].shape(), dt);
    experts_[i]->Forward(expert_x_[i], expert_y[i]);
  }
  returned_y_ = exchange_->Combine(expert_y, c, dt);
  y.Zero();
  LOOM_DISPATCH_FLOAT(dt, T, [&] { ScatterAdd<T>(returned_y_, sent_ids_, k, routing_.gates, y); });
  for (auto& s : shared_) {
    Tensor ys = Tensor::Empty({t, c}, dt);
    s->Forward(x, ys);
    ops::AddInPlace(y, ys);
  }
  // Statistics.
  stats_ = RoutingStats();
  stats_.assignments = global_tokens_ * k;
  stats_.dropped = dropped;
  const auto [lo, hi] = std::minmax_element(global_load_.begin(), global_load_.end());
  stats_.load_min = double(*lo);
  stats_.load_max = double(*hi);
  const double mean = double(global_tokens_ * k) / e_count;
  double var = 0;
  for (int64_t l : global_load_) var += (double(l) - mean) * (double(l) - mean);
  stats_.load_cv = mean > 0 ? std::sqrt(var / e_count) / mean : 0.0;
}

void MoeLayer::Backward(const Tensor& x, const Tensor& dy, Tensor& dx, double loss_scale) {
  const int64_t t = x.dim(0), c = x.dim(1);
  const int e_count = moe_.experts, k = moe_.top_k;
  const DType dt = x.dtype();
  dx.Zero();
  Tensor dgates = Tensor::Zeros({t, k}, dt);  // dropped assignments keep 0
  // The mirror of Forward: dispatch g·dy, run the experts' backward, combine dx.
  Tensor dsent = Tensor::Empty(returned_y_.shape(), dt);
  LOOM_DISPATCH_FLOAT(dt, T, [&] { GateBackward<T>(dy, returned_y_, sent_ids_, k, routing_.gates, dsent, dgates); });
  std::vector<Tensor> dye = exchange_->Dispatch(dsent), dxe(experts_.size());
  for (size_t i = 0; i < experts_.size(); ++i) {
    if (exchange_->local_rows(i) == 0) continue;
    dxe[i] = Tensor::Empty(expert_x_[i].shape(), dt);
    experts_[i]->Backward(expert_x_[i], dye[i], dxe[i]);
  }
  const Tensor dreturned = exchange_->Combine(dxe, c, dt);
  LOOM_DISPATCH_FLOAT(dt, T, [&] { ScatterAddRows<T>(dreturned, sent_ids_, k, dx); });
  for (auto& s : shared_) {
    Tensor dxs = Tensor::Empty({t, c}, dt);
    s->Backward(x, dy, dxs);
    ops::AddInPlace(dx, dxs);
  }
  // Router: the local part of the global losses' gradient. The router's
  // backward reads f_e from routing_.load over this call's t tokens:
  //   daux·E·(load_e/(t k))/t with load = global loads and daux scaled by
  //   (t/N)² is daux·E·(load_e/(N k))/N;  dz·2 lse/t with dz·t/N is dz·2 lse/N.
  double aux_seed = loss_scale * moe_.aux_loss_coef, z_seed = loss_scale * moe_.z_loss_coef;
  if (Communicator* group = StatsGroup(moe_)) {
    Tensor scale = Tensor::FromVector<double>({loss_scale}, {1});
    const absl::Status st = group->AllReduce(scale);
    LOOM_CHECK(st.ok(), "[moe] router loss scale: ", st.message());
    const double share = global_tokens_ > 0 ? double(t) / double(global_tokens_) : 0.0;
    aux_seed = scale.data<double>()[0] * moe_.aux_loss_coef * share * share;
    z_seed = scale.data<double>()[0] * moe_.z_loss_coef * share;
    routing_.load = global_load_;
  }
  Tensor dlogits = Tensor::Empty({t, e_count}, dt);
  ops::MoeRouterBackward(logits_, routing_, dgates, aux_seed, z_seed, options_, dlogits);
  ops::LinearBackward(x, router_.value, dlogits, &dx, router_.grad, /*accumulate_dx=*/true);
  for (int e = 0; e < e_count; ++e) pending_load_[e] += global_load_[e];
}

void MoeLayer::UpdateBias() {
  if (moe_.bias_balancing) ops::MoeBiasUpdate(pending_load_, moe_.bias_update_rate, bias_);
  std::fill(pending_load_.begin(), pending_load_.end(), 0);
}

void MoeLayer::set_bias(const std::vector<double>& bias) {
  LOOM_CHECK(bias.size() == bias_.size(), "[moe] a bias of ", bias.size(), " values for ", bias_.size(), " experts");
  bias_ = bias;
}

void MoeLayer::ReleaseActivations() {
  logits_ = Tensor();
  routing_ = ops::MoeRouting();
  kept_.clear();
  sent_ids_.clear();
  exchange_.reset();
  expert_x_.clear();
  returned_y_ = Tensor();
  for (auto& e : experts_) e->ReleaseActivations();
  for (auto& s : shared_) s->ReleaseActivations();
}

}  // namespace loom
