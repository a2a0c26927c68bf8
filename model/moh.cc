#include "model/moh.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/linear.h"
#include "parallel/communicator.h"

namespace loom {
namespace {

// In place, each row of x [T, n]: x ← softmax(x).
template <typename T>
void SoftmaxRows(Tensor& x) {
  const int64_t t = x.dim(0), n = x.dim(1);
  T* p = x.data<T>();
  for (int64_t r = 0; r < t; ++r) {
    T* row = p + r * n;
    const T m = *std::max_element(row, row + n);
    T sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += row[i] = std::exp(row[i] - m);
    for (int64_t i = 0; i < n; ++i) row[i] /= sum;
  }
}

// Softmax backward of one row: dz = s ⊙ (ds − Σ ds·s) (written).
template <typename T>
void SoftmaxRowBackward(const T* s, const T* ds, int64_t n, T* dz) {
  T dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += ds[i] * s[i];
  for (int64_t i = 0; i < n; ++i) dz[i] = s[i] * (ds[i] - dot);
}

// The dp × cp group when it has other ranks, else null.
Communicator* StatsGroup(const MohDims& moh) {
  return moh.stats != nullptr && moh.stats->size() > 1 ? moh.stats : nullptr;
}

}  // namespace

void ApplyHeadGates(const Tensor& o, const Tensor& gates, Tensor& out) {
  const int64_t t = gates.dim(0), h = gates.dim(1), d = o.numel() / (t * h);
  LOOM_CHECK(o.numel() == t * h * d && out.numel() == o.numel(), "[moh] gates ", ShapeString(gates.shape()),
             " do not fit o ", ShapeString(o.shape()));
  LOOM_DISPATCH_FLOAT(o.dtype(), T, [&] {
    const T* src = o.data<T>();
    const T* g = gates.data<T>();
    T* dst = out.data<T>();
    for (int64_t th = 0; th < t * h; ++th)
      for (int64_t i = 0; i < d; ++i) dst[th * d + i] = g[th] * src[th * d + i];
  });
}

void HeadGatesBackward(const Tensor& o, const Tensor& gates, const Tensor& dout, Tensor& d_o, Tensor& dgates) {
  const int64_t t = gates.dim(0), h = gates.dim(1), d = o.numel() / (t * h);
  LOOM_DISPATCH_FLOAT(o.dtype(), T, [&] {
    const T* src = o.data<T>();
    const T* g = gates.data<T>();
    const T* dy = dout.data<T>();
    T* dx = d_o.data<T>();
    T* dg = dgates.data<T>();
    for (int64_t th = 0; th < t * h; ++th) {
      T dot = 0;
      for (int64_t i = 0; i < d; ++i) {
        dot += dy[th * d + i] * src[th * d + i];
        dx[th * d + i] = g[th] * dy[th * d + i];
      }
      dg[th] = dot;
    }
  });
}

MohRouter::MohRouter(const ModelDims& dims, const std::string& prefix)
    : moh_(dims.moh), heads_(dims.heads), shared_(dims.moh.shared_heads), routed_(dims.heads - dims.moh.shared_heads) {
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
}

void MohRouter::CollectParams(ParamList& out) {
  if (ws_.value.defined()) out.push_back(&ws_);
  if (wr_.value.defined()) out.push_back(&wr_);
  if (wh_.value.defined()) out.push_back(&wh_);
}

void MohRouter::Forward(const Tensor& x, Tensor& gates) {
  const int64_t t = x.dim(0);
  const DType dt = x.dtype();
  tokens_ = t;
  if (ws_.value.defined()) {
    shared_scores_ = Tensor::Empty({t, shared_}, dt);
    ops::LinearForward(x, ws_.value, shared_scores_);
    LOOM_DISPATCH_FLOAT(dt, T, [&] { SoftmaxRows<T>(shared_scores_); });
  }
  if (mix_) {
    alpha_ = Tensor::Empty({t, 2}, dt);
    ops::LinearForward(x, wh_.value, alpha_);
    LOOM_DISPATCH_FLOAT(dt, T, [&] { SoftmaxRows<T>(alpha_); });
  }
  global_load_.assign(routed_, 0);
  global_tokens_ = t;
  double lb = 0;  // L_b
  if (routed_ > 0) {
    routed_logits_ = Tensor::Empty({t, routed_}, dt);
    ops::LinearForward(x, wr_.value, routed_logits_);
    static const std::vector<double> kNoBias;
    ops::MoeRouterForward(routed_logits_, kNoBias, options_, routing_);
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
  // The gates.
  gates = Tensor::Zeros({t, heads_}, dt);
  LOOM_DISPATCH_FLOAT(dt, T, [&] {
    T* g = gates.data<T>();
    const int k = moh_.top_k;
    for (int64_t r = 0; r < t; ++r) {
      const T a1 = mix_ ? alpha_.data<T>()[r * 2] : T(1);
      const T a2 = mix_ ? alpha_.data<T>()[r * 2 + 1] : T(1);
      for (int i = 0; i < shared_; ++i)
        g[r * heads_ + i] = moh_.fixed_gates ? T(1) : a1 * shared_scores_.data<T>()[r * shared_ + i];
      for (int j = 0; routed_ > 0 && j < k; ++j) {
        const int head = shared_ + routing_.experts.data<int32_t>()[r * k + j];
        g[r * heads_ + head] = moh_.fixed_gates ? T(1) : a2 * routing_.gates.data<T>()[r * k + j];
      }
    }
  });
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
}

Tensor MohRouter::ActiveMask(int64_t block) const {
  const int64_t blocks = (tokens_ + block - 1) / block;
  Tensor active = Tensor::Zeros({heads_, blocks}, DType::kI32);
  int32_t* a = active.data<int32_t>();
  for (int h = 0; h < shared_; ++h) std::fill_n(a + h * blocks, blocks, 1);
  const int k = moh_.top_k;
  for (int64_t r = 0; routed_ > 0 && r < tokens_; ++r)
    for (int j = 0; j < k; ++j) a[(shared_ + routing_.experts.data<int32_t>()[r * k + j]) * blocks + r / block] = 1;
  return active;
}

void MohRouter::Backward(const Tensor& x, const Tensor& dgates, Tensor& dx, double loss_scale) {
  const int64_t t = x.dim(0);
  const DType dt = x.dtype();
  const int k = moh_.top_k;
  // Gradients of the logits of the three routers.
  Tensor dzs = shared_scores_.defined() ? Tensor::Empty({t, shared_}, dt) : Tensor();
  Tensor dgr = routed_ > 0 ? Tensor::Zeros({t, k}, dt) : Tensor();  // dL/d(p of the kept heads)
  Tensor dzh = mix_ ? Tensor::Empty({t, 2}, dt) : Tensor();
  if (!moh_.fixed_gates) {
    LOOM_DISPATCH_FLOAT(dt, T, [&] {
      const T* dg = dgates.data<T>();
      std::vector<T> ds(shared_);
      for (int64_t r = 0; r < t; ++r) {
        const T* dgr_t = dg + r * heads_;
        const T a1 = mix_ ? alpha_.data<T>()[r * 2] : T(1);
        const T a2 = mix_ ? alpha_.data<T>()[r * 2 + 1] : T(1);
        T dalpha[2] = {0, 0};
        if (shared_ > 0) {
          // g_i = α1 s_i: dα1 = Σ dg_i s_i, ds_i = α1 dg_i.
          const T* s = shared_scores_.data<T>() + r * shared_;
          for (int i = 0; i < shared_; ++i) {
            dalpha[0] += dgr_t[i] * s[i];
            ds[i] = a1 * dgr_t[i];
          }
          SoftmaxRowBackward(s, ds.data(), shared_, dzs.data<T>() + r * shared_);
        }
        for (int j = 0; routed_ > 0 && j < k; ++j) {
          // g = α2 p: dα2 += dg p, dp = α2 dg.
          const int head = shared_ + routing_.experts.data<int32_t>()[r * k + j];
          const T p = routing_.gates.data<T>()[r * k + j];
          dalpha[1] += dgr_t[head] * p;
          dgr.data<T>()[r * k + j] = a2 * dgr_t[head];
        }
        if (mix_) SoftmaxRowBackward(alpha_.data<T>() + r * 2, dalpha, 2, dzh.data<T>() + r * 2);
      }
    });
  }
  if (dzs.defined()) ops::LinearBackward(x, ws_.value, dzs, &dx, ws_.grad, /*accumulate_dx=*/true);
  if (dzh.defined()) ops::LinearBackward(x, wh_.value, dzh, &dx, wh_.grad, /*accumulate_dx=*/true);
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
    Tensor dzr = Tensor::Empty({t, routed_}, dt);
    ops::MoeRouterBackward(routed_logits_, routing_, dgr, seed, 0.0, options_, dzr);
    ops::LinearBackward(x, wr_.value, dzr, &dx, wr_.grad, /*accumulate_dx=*/true);
  }
}

void MohRouter::ReleaseActivations() {
  shared_scores_ = routed_logits_ = alpha_ = Tensor();
  routing_ = ops::MoeRouting();
}

}  // namespace loom
