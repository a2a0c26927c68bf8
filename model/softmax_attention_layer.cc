#include "model/softmax_attention_layer.h"

#include <cmath>

#include "ops/linear.h"
#include "ops/rope.h"
#include "ops/softmax_attention.h"
#include "ops/stacked_linear.h"
#include "parallel/mpi_communicator.h"

namespace loom {

SoftmaxAttentionLayer::SoftmaxAttentionLayer(const ModelDims& dims, const TensorParallel& tp,
                                             const ContextParallel& cp, const std::string& prefix, bool moh)
    : dims_(dims), tp_(tp), cp_(cp), hq_(dims.heads / tp.size), hk_(dims.kv_heads / tp.size) {
  const int64_t c = dims.hidden, qd = int64_t{dims.heads} * dims.head_dim,
                kvd = int64_t{dims.kv_heads} * dims.head_dim;
  const double out_std = dims.init_std / std::sqrt(2.0 * dims.layers);
  wq_.InitSharded(prefix + "wq", {qd, c}, 0, tp.size, tp.rank, dims.dtype, dims.seed, dims.init_std);
  wk_.InitSharded(prefix + "wk", {kvd, c}, 0, tp.size, tp.rank, dims.dtype, dims.seed, dims.init_std);
  wv_.InitSharded(prefix + "wv", {kvd, c}, 0, tp.size, tp.rank, dims.dtype, dims.seed, dims.init_std);
  wo_.InitSharded(prefix + "wo", {c, qd}, 1, tp.size, tp.rank, dims.dtype, dims.seed, out_std);
  if (moh) moh_ = std::make_unique<MohRouter>(dims, tp, prefix + "moh.");
}

void SoftmaxAttentionLayer::CollectParams(ParamList& out) {
  out.insert(out.end(), {&wq_, &wk_, &wv_, &wo_});
  if (moh_) moh_->CollectParams(out);
}

namespace {
// active: MoH's mask, or undefined.
ops::AttentionOptions Options(const ModelDims& d, const Tensor& active) {
  ops::AttentionOptions o;
  o.causal = true;
  o.sigmoid = d.sigmoid_attention;
  o.sigmoid_bias = d.sigmoid_bias;
  o.backend = d.attention_backend;
  o.deterministic = d.deterministic;
  o.active = active;
  o.active_block = SoftmaxAttentionLayer::kMohBlock;
  return o;
}
}  // namespace

void SoftmaxAttentionLayer::Forward(const Tensor& x, const Batch& batch, Tensor& y, const Tensor* residual) {
  const int64_t t = x.dim(0), hq = hq_, hk = hk_, d = dims_.head_dim;
  q_ = dims_.Act({t, hq, d});
  k_ = dims_.Act({t, hk, d});
  v_ = dims_.Act({t, hk, d});
  {
    Tensor qkv = dims_.Act({t, hq + 2 * hk, d});
    ops::StackedLinearForward(x, {&wq_.weight(), &wk_.weight(), &wv_.weight()}, qkv);
    ops::RopeQkvForward(qkv, batch.positions, dims_.rope, q_, k_, v_);
  }
  o_ = dims_.Act({t, hq, d});
  lse_ = dims_.Stat({t, hq});
  if (moh_) {
    moh_->Forward(x);
    // Where the attention kernels take no mask (the GPU's f32 kernels,
    // cuDNN) every head is computed and the gates multiply the unkept ones
    // by 0: the same result.
    if (cp_.size == 1 && skip_inactive_ && ops::SoftmaxAttentionSkipsInactive(q_, Options(dims_, Tensor())))
      active_ = moh_->ActiveMask(kMohBlock);
  }
  if (cp_.size == 1) {
    ops::SoftmaxAttentionForward(q_, k_, v_, batch.token_rows, batch.token_rows, Options(dims_, active_), o_, lse_);
  } else {
    CheckComm(CpAttentionForward(*cp_.comm, cp_.softmax, *batch.cp_chunks, q_, k_, v_, batch.token_rows,
                                 Options(dims_, active_), o_, lse_, &cp_saved_));
  }
  if (moh_) {
    gated_ = moh_->Gate(o_);
  } else {
    gated_ = o_;
  }
  tp_.ProjectOutput(gated_, wo_.weight(), y, residual);
}

void SoftmaxAttentionLayer::Backward(const Tensor& x, const Batch& batch, const Tensor& dy, Tensor& dx,
                                     double router_loss_scale) {
  const int64_t t = x.dim(0);
  Tensor d_o = dims_.Act(o_.shape());
  ops::LinearBackward(gated_, wo_.weight(), dy, &d_o, wo_.grad);
  if (moh_) moh_->GateBackward(o_, d_o);
  Tensor dq = dims_.Act(q_.shape());
  Tensor dk = dims_.Act(k_.shape());
  Tensor dv = dims_.Act(v_.shape());
  if (cp_.size == 1) {
    ops::SoftmaxAttentionBackward(q_, k_, v_, o_, lse_, d_o, batch.token_rows, batch.token_rows,
                                  Options(dims_, active_), dq, dk, dv);
  } else {
    CheckComm(CpAttentionBackward(*cp_.comm, cp_.softmax, *batch.cp_chunks, q_, k_, v_, o_, lse_, d_o,
                                  batch.token_rows, Options(dims_, active_), &cp_saved_, dq, dk, dv));
  }
  d_o = Tensor();
  Tensor dqkv = dims_.Act({t, hq_ + 2 * hk_, dims_.head_dim});
  ops::RopeQkvBackward(dq, dk, dv, batch.positions, dims_.rope, dqkv);
  dq = dk = dv = Tensor();
  // dx = dq W_q + dk W_k + dv W_v.
  ops::StackedLinearBackward(x, {&wq_.weight(), &wk_.weight(), &wv_.weight()}, dqkv, &dx,
                             {&wq_.grad, &wk_.grad, &wv_.grad});
  if (moh_) moh_->Backward(x, dx, router_loss_scale);
  tp_.ReduceOutput(dx);
}

void SoftmaxAttentionLayer::ReleaseActivations() {
  q_ = k_ = v_ = o_ = lse_ = active_ = gated_ = Tensor();
  if (moh_) moh_->ReleaseActivations();
  cp_saved_.Release(cp_.softmax.ledger);
}

}  // namespace loom
