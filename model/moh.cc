#include "model/moh.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/linear.h"
#include "parallel/communicator.h"

namespace loom {
namespace {

// The dp × cp group when it has other ranks, else null.
Communicator* StatsGroup(const MohDims& moh) {
  return moh.stats != nullptr && moh.stats->size() > 1 ? moh.stats : nullptr;
}

// Gates, scores and their gradients: x's dtype on the CPU, f32 on the GPU.
DType GateDType(const Tensor& x) { return x.device().is_cpu() ? x.dtype() : DType::kF32; }

}  // namespace

MohRouter::MohRouter(const ModelDims& dims, const TensorParallel& tp, const std::string& prefix)
    : moh_(dims.moh),
      tp_(tp),
      heads_(dims.heads),
      shared_(dims.moh.shared_heads),
      routed_(dims.heads - dims.moh.shared_heads) {
  LOOM_CHECK(heads_ % tp_.size == 0, "[moh] ", heads_, " heads over tp ", tp_.size);
  LOOM_CHECK(shared_ >= 0 && routed_ >= 0, "[moh] ", shared_, " shared heads of ", heads_);
  LOOM_CHECK(routed_ == 0 || (moh_.top_k >= 1 && moh_.top_k <= routed_), "[moh] top_k ", moh_.top_k,
             " outside [1, routed heads = ", routed_, "]");
  mix_ = !moh_.fixed_gates && shared_ > 0 && routed_ > 0;
  const int64_t c = dims.hidden;
  if (shared_ > 0 && !moh_.fixed_gates) ws_.Init(prefix + "w_s", {shared_, c}, dims.dtype, dims.seed, dims.init_std);
  if (routed_ > 0) {
    options_ = {.experts = routed_, .top_k = moh_.top_k, .sigmoid = false, .normalize_top_k = false};
    wr_.Init(prefix + "w_r", {routed_, c}, dims.dtype, dims.seed, dims.init_std);
  }
  if (mix_) wh_.Init(prefix + "w_h", {2, c}, dims.dtype, dims.seed, dims.init_std);
  gate_options_ = {.heads = heads_, .shared = shared_, .top_k = moh_.top_k, .fixed_gates = moh_.fixed_gates};
}

void MohRouter::CollectParams(ParamList& out) {
  if (ws_.value.defined()) out.push_back(&ws_);
  if (wr_.value.defined()) out.push_back(&wr_);
  if (wh_.value.defined()) out.push_back(&wh_);
}

const Tensor& MohRouter::Forward(const Tensor& x) {
  const int64_t t = x.dim(0);
  const DType dt = x.dtype();
  const Device dev = x.device();
  tokens_ = t;
  Tensor shared_logits, alpha_logits;
  if (ws_.value.defined()) {
    shared_logits = Tensor::Empty({t, shared_}, dt, dev);
    ops::LinearForward(x, ws_.weight(), shared_logits);
  }
  if (mix_) {
    alpha_logits = Tensor::Empty({t, 2}, dt, dev);
    ops::LinearForward(x, wh_.weight(), alpha_logits);
  }
  global_load_.assign(routed_, 0);
  global_tokens_ = t;
  double lb = 0;  // L_b
  if (routed_ > 0) {
    routed_logits_ = Tensor::Empty({t, routed_}, dt, dev);
    ops::LinearForward(x, wr_.weight(), routed_logits_);
    static const std::vector<double> kNoBias;
    ops::MoeRouterForward(routed_logits_, kNoBias, options_, routing_);  // [R] statistics on the host
    global_load_ = routing_.load;
    std::vector<double> prob_sum(routed_);
    for (int i = 0; i < routed_; ++i) prob_sum[i] = routing_.mean_prob[i] * double(t);
    // Global statistics: (load_i, Σ_t p_ti, T) summed over the group in
    // group-rank order, so every rank gets the same numbers.
    if (Communicator* group = StatsGroup(moh_)) {
      const int64_t w = 2 * routed_ + 1;
      Tensor mine = Tensor::Empty({w}, DType::kF64), all = Tensor::Empty({group->size() * w}, DType::kF64);
      double* m = mine.data<double>();
      for (int i = 0; i < routed_; ++i) {
        m[i] = double(routing_.load[i]);
        m[routed_ + i] = prob_sum[i];
      }
      m[2 * routed_] = double(t);
      const absl::Status st = group->AllGather(mine, all);
      LOOM_CHECK(st.ok(), "[moh] router statistics: ", st.message());
      global_load_.assign(routed_, 0);
      prob_sum.assign(routed_, 0.0);
      global_tokens_ = 0;
      for (int r = 0; r < group->size(); ++r) {
        const double* a = all.data<double>() + r * w;
        for (int i = 0; i < routed_; ++i) {
          global_load_[i] += static_cast<int64_t>(a[i]);
          prob_sum[i] += a[routed_ + i];
        }
        global_tokens_ += static_cast<int64_t>(a[2 * routed_]);
      }
    }
    const double n = double(global_tokens_);
    for (int i = 0; i < routed_; ++i) lb += n > 0 ? double(global_load_[i]) / n * (prob_sum[i] / n) : 0.0;
  }
  router_loss_ = moh_.aux_loss_coef * lb;
  Tensor all = Tensor::Empty({t, heads_}, GateDType(x), dev);
  ops::MohGatesForward(shared_logits, alpha_logits, routing_.experts, routing_.gates, gate_options_, shared_scores_,
                       alpha_, all);
  if (tp_.size == 1) {
    gates_ = all;
  } else {  // this rank's heads
    const int64_t local = heads_ / tp_.size;
    gates_ = Tensor::Empty({t, local}, all.dtype(), dev);
    CopyColumns(all, tp_.rank * local, gates_, 0, local);
  }
  // Statistics of the routed heads.
  stats_ = RoutingStats();
  if (routed_ > 0) {
    stats_.assignments = global_tokens_ * moh_.top_k;
    const auto [lo, hi] = std::minmax_element(global_load_.begin(), global_load_.end());
    stats_.load_min = double(*lo);
    stats_.load_max = double(*hi);
    const double mean = double(stats_.assignments) / routed_;
    double var = 0;
    for (int64_t l : global_load_) var += (double(l) - mean) * (double(l) - mean);
    stats_.load_cv = mean > 0 ? std::sqrt(var / routed_) / mean : 0.0;
  }
  return gates_;
}

Tensor MohRouter::ActiveMask(int64_t block) const {
  Tensor active;
  ops::MohActiveMask(routing_.experts, gate_options_, tokens_, block, active);
  const int64_t local = heads_ / tp_.size;
  return tp_.size == 1 ? active : active.Slice(tp_.rank * local, local);
}

Tensor MohRouter::Gate(const Tensor& heads) const {
  Tensor gated = Tensor::Empty(heads.shape(), heads.dtype(), heads.device());
  ops::ApplyHeadGates(heads, gates_, gated);
  return gated;
}

void MohRouter::GateBackward(const Tensor& heads, Tensor& d_gated) {
  dgates_ = Tensor::Empty(gates_.shape(), gates_.dtype(), gates_.device());
  ops::HeadGatesBackward(heads, gates_, d_gated, d_gated, dgates_);
}

void MohRouter::Backward(const Tensor& x, Tensor& dx, double loss_scale) {
  const Tensor& local_dgates = dgates_;
  const int64_t t = x.dim(0);
  const DType dt = x.dtype();
  const Device dev = x.device();
  const int k = moh_.top_k;
  // Under TP: the whole [T, H] from every rank's columns; the router's dx
  // once (TP rank 0), as the layer sums dx over the group.
  Tensor dgates = local_dgates;
  if (tp_.size > 1) {
    const int64_t local = heads_ / tp_.size;
    dgates = Tensor::Zeros({t, heads_}, local_dgates.dtype(), dev);
    CopyColumns(local_dgates, 0, dgates, tp_.rank * local, local);
    tp_.AllReduce(dgates);
  }
  Tensor* dxp = tp_.rank == 0 ? &dx : nullptr;
  // Gradients of the logits of the three routers; dgr = dL/d(p of the kept
  // heads), 0 with fixed gates (the balance loss still reaches W_r).
  Tensor dzs = shared_scores_.defined() ? Tensor::Empty({t, shared_}, dt, dev) : Tensor();
  Tensor dzh = mix_ ? Tensor::Empty({t, 2}, dt, dev) : Tensor();
  Tensor dgr;
  if (moh_.fixed_gates) {
    if (routed_ > 0) dgr = Tensor::Zeros({t, k}, GateDType(x), dev);
  } else {
    if (routed_ > 0) dgr = Tensor::Empty({t, k}, GateDType(x), dev);
    ops::MohGatesBackward(shared_scores_, alpha_, routing_.experts, routing_.gates, dgates, gate_options_, dzs, dzh,
                          dgr);
  }
  if (dzs.defined()) ops::LinearBackward(x, ws_.weight(), dzs, dxp, ws_.grad, /*accumulate_dx=*/true);
  if (dzh.defined()) ops::LinearBackward(x, wh_.weight(), dzh, dxp, wh_.grad, /*accumulate_dx=*/true);
  if (routed_ > 0) {
    // L_b = (k/R)·aux; the router's backward reads f from routing_.load over
    // this call's t tokens, so with the global loads and the seed scaled by
    // (t/N)² it gives the global loss's gradient (as model/moe.cc does).
    double seed = loss_scale * moh_.aux_loss_coef * double(k) / double(routed_);
    if (Communicator* group = StatsGroup(moh_)) {
      Tensor scale = Tensor::FromVector<double>({loss_scale}, {1});
      const absl::Status st = group->AllReduce(scale);
      LOOM_CHECK(st.ok(), "[moh] router loss scale: ", st.message());
      const double share = global_tokens_ > 0 ? double(t) / double(global_tokens_) : 0.0;
      seed = scale.data<double>()[0] * moh_.aux_loss_coef * double(k) / double(routed_) * share * share;
      routing_.load = global_load_;
    }
    Tensor dzr = Tensor::Empty({t, routed_}, dt, dev);
    ops::MoeRouterBackward(routed_logits_, routing_, dgr, seed, 0.0, options_, dzr);
    ops::LinearBackward(x, wr_.weight(), dzr, dxp, wr_.grad, /*accumulate_dx=*/true);
  }
}

void MohRouter::ReleaseActivations() {
  shared_scores_ = routed_logits_ = alpha_ = gates_ = dgates_ = Tensor();
  routing_ = ops::MoeRouting();
}

}  // namespace loom
