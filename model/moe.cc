#include "model/moe.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/grouped_linear.h"
#include "ops/linear.h"
#include "ops/swiglu.h"
#include "parallel/communicator.h"

namespace loom {
namespace {

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
  const int64_t c = dims.hidden, f = moe_.ffn;
  experts_.resize(owned);  // never resized again: CollectParams hands out pointers
  for (int i = 0; i < owned; ++i) {
    const std::string name = absl::StrCat(prefix, "experts.", first_expert_ + i, ".");
    experts_[i].w_gate.Init(name + "w_gate", {f, c}, dims.dtype, dims.seed, dims.init_std);
    experts_[i].w_up.Init(name + "w_up", {f, c}, dims.dtype, dims.seed, dims.init_std);
    experts_[i].w_down.Init(name + "w_down", {c, f}, dims.dtype, dims.seed, dims.init_std / std::sqrt(2.0 * dims.layers));
  }
  for (int s = 0; s < moe_.shared_experts; ++s)
    shared_.push_back(std::make_unique<SwigluMlp>(expert_dims_, TensorParallel{}, absl::StrCat(prefix, "shared.", s, ".")));
  bias_.assign(moe_.experts, 0.0);
  pending_load_.assign(moe_.experts, 0);
}

void MoeLayer::CollectParams(ParamList& out) {
  out.push_back(&router_);
  for (Expert& e : experts_) out.insert(out.end(), {&e.w_gate, &e.w_up, &e.w_down});
  for (auto& s : shared_) s->CollectParams(out);
}

std::vector<const Tensor*> MoeLayer::ExpertWeights(Param Expert::*which) const {
  std::vector<const Tensor*> out;
  for (const Expert& e : experts_) out.push_back(&(e.*which).weight());
  return out;
}

std::vector<Tensor*> MoeLayer::ExpertGrads(Param Expert::*which) {
  std::vector<Tensor*> out;
  for (Expert& e : experts_) out.push_back(&(e.*which).grad);
  return out;
}

void MoeLayer::Forward(const Tensor& x, Tensor& y, const Tensor* residual) {
  const int64_t t = x.dim(0), c = x.dim(1);
  const int e_count = moe_.experts, k = moe_.top_k;
  const DType dt = x.dtype();
  const Device dev = x.device();
  // Route.
  logits_ = Tensor::Empty({t, e_count}, dt, dev);
  ops::LinearForward(x, router_.weight(), logits_);
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
  // Permute: each expert's assignments in token order, cut at the capacity
  // (in global token order: the lower ranks' assignments come first).
  std::vector<int64_t> kept = routing_.load;
  int64_t dropped = 0;
  if (moe_.capacity_factor > 0) {
    const auto capacity =
        static_cast<int64_t>(std::ceil(moe_.capacity_factor * double(global_tokens_ * k) / e_count));
    for (int e = 0; e < e_count; ++e) {
      dropped += std::max<int64_t>(global_load_[e] - capacity, 0);
      kept[e] = std::clamp<int64_t>(capacity - before[e], 0, routing_.load[e]);
    }
  }
  ops::MoePermuteIndex(routing_.experts, kept, perm_);
  const int64_t s = perm_.size();
  Tensor sent = Tensor::Empty({s, c}, dt, dev);
  ops::MoeGather(x, perm_.rows, sent);
  // Each kept assignment's gate g_tj, in row order: its expert scales the
  // row's SwiGLU output by it, so the combine is a plain sum and its backward
  // a plain gather (the gate's gradient comes from the SwiGLU backward).
  Tensor sent_gates = Tensor::Empty({s, 1}, routing_.gates.dtype(), dev);
  ops::MoeGather(routing_.gates.Reshape({t * k, 1}), perm_.rows.Reshape({t * k, 1}), sent_gates);
  // Dispatch the kept rows to their experts, run the local experts as one
  // grouped SwiGLU, combine, then y[t] = Σ_j expert_j(x[t]) · g_tj + shared(x[t]).
  exchange_ = std::make_unique<ExpertExchange>(ep_, e_count, perm_.counts);
  expert_x_ = exchange_->Dispatch(sent);
  expert_gates_ = exchange_->Dispatch(sent_gates);
  const std::vector<int64_t>& rows = exchange_->local_rows();
  const int64_t r = expert_x_.dim(0), f = moe_.ffn;
  gate_ = Tensor::Empty({r, f}, dt, dev);
  up_ = Tensor::Empty({r, f}, dt, dev);
  h_ = Tensor::Empty({r, f}, dt, dev);
  Tensor expert_y = Tensor::Empty({r, c}, dt, dev);
  if (r > 0) {  // an expert without rows: its weights get no gradient
    ops::GroupedLinearForward(expert_x_, ExpertWeights(&Expert::w_gate), rows, gate_);
    ops::GroupedLinearForward(expert_x_, ExpertWeights(&Expert::w_up), rows, up_);
    ops::SwigluForward(gate_, up_, h_, &expert_gates_);
    ops::GroupedLinearForward(h_, ExpertWeights(&Expert::w_down), rows, expert_y);
  }
  const Tensor returned_y = exchange_->Combine(expert_y);
  // Σ_s Shared_s(x) + residual: each shared expert's output GEMM adds the
  // sum so far (the residual first); the residual alone without shared ones.
  Tensor shared_y;
  const Tensor* sum = residual;
  for (auto& sh : shared_) {
    Tensor out = Tensor::Empty(x.shape(), dt, dev);
    sh->Forward(x, out, sum);
    shared_y = out;
    sum = &shared_y;
  }
  ops::MoeCombine(returned_y, perm_.rows, sum, y);
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
  const int64_t t = x.dim(0);
  const int e_count = moe_.experts, k = moe_.top_k;
  const DType dt = x.dtype();
  const Device dev = x.device();
  // The mirror of Forward: dy to the experts, the grouped SwiGLU's backward
  // (with each row's dg), their input gradients back, each token's summed.
  Tensor dsent = Tensor::Empty({perm_.size(), x.dim(1)}, dt, dev);
  ops::MoeGather(dy, perm_.rows, dsent);
  const Tensor dye = exchange_->Dispatch(dsent);
  const std::vector<int64_t>& rows = exchange_->local_rows();
  const int64_t r = expert_x_.dim(0);
  Tensor dxe = Tensor::Empty(expert_x_.shape(), dt, dev);
  Tensor dexpert_gates = Tensor::Empty(expert_gates_.shape(), expert_gates_.dtype(), dev);
  if (r > 0) {
    // dgu [R, 2F]: each row's [dgate | dup], so dxe = dgu · [W_gate; W_up] is
    // one GEMM where the pair's compute copies are adjacent (model/param.h).
    Tensor dh = Tensor::Empty(h_.shape(), dt, dev), dgu = Tensor::Empty({r, 2 * moe_.ffn}, dt, dev);
    ops::GroupedLinearBackward(h_, ExpertWeights(&Expert::w_down), rows, dye, &dh, ExpertGrads(&Expert::w_down));
    ops::SwigluBackward(gate_, up_, dh, dgu, &expert_gates_, &dexpert_gates);
    ops::GroupedLinearPairBackward(expert_x_, ExpertWeights(&Expert::w_gate), ExpertWeights(&Expert::w_up), rows, dgu,
                                   dxe, ExpertGrads(&Expert::w_gate), ExpertGrads(&Expert::w_up));
  }
  const Tensor dreturned = exchange_->Combine(dxe);
  Tensor dgates = Tensor::Empty({t, k}, expert_gates_.dtype(), dev);  // 0 where dropped
  {
    Tensor dgates_by_id = dgates.Reshape({t * k, 1});
    ops::MoeCombine(exchange_->Combine(dexpert_gates), perm_.rows.Reshape({t * k, 1}), nullptr, dgates_by_id);
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
  Tensor dlogits = Tensor::Empty({t, e_count}, dt, dev);
  ops::MoeRouterBackward(logits_, routing_, dgates, aux_seed, z_seed, options_, dlogits);
  // dx = Σ_j dreturned[rows_tj] + Σ_s shared_s's dx + dlogits · W_router,
  // written once, by the combine: the shared experts' GEMMs sum into
  // `rest`, and the router's input gradient (E columns) is the combine's
  // thin product instead of a GEMM of depth E that writes all of dx.
  ops::LinearBackward(x, router_.weight(), dlogits, /*dx=*/nullptr, router_.grad);
  Tensor rest;
  for (size_t i = 0; i < shared_.size(); ++i) {
    if (i == 0) rest = Tensor::Empty(x.shape(), dt, dev);
    shared_[i]->Backward(x, dy, rest, /*accumulate_dx=*/i > 0);
  }
  ops::MoeCombine(dreturned, perm_.rows, rest.defined() ? &rest : nullptr, dx, &dlogits, &router_.weight());
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
  perm_ = ops::MoePermutation();
  exchange_.reset();
  expert_x_ = expert_gates_ = gate_ = up_ = h_ = Tensor();
  for (auto& s : shared_) s->ReleaseActivations();
}

}  // namespace loom
