#include "model/lightning_attention_layer.h"

#include <cmath>

#include "ops/lightning_attention.h"
#include "ops/add.h"
#include "ops/linear.h"
#include "ops/rmsnorm.h"
#include "ops/sigmoid_gate.h"
#include "ops/silu.h"

namespace loom {

LightningAttentionLayer::LightningAttentionLayer(const ModelDims& dims, const TensorParallel& tp,
                                                 const ContextParallel& cp, int layer, const std::string& prefix,
                                                 bool moh)
    : dims_(dims), tp_(tp), cp_(cp), h_(dims.heads / tp.size) {
  const int64_t c = dims.hidden, hd = int64_t{dims.heads} * dims.head_dim;
  std::vector<double> decay(dims.heads, 1.0);
  if (dims.lightning_decay) decay = ops::LightningDecay(dims.heads, layer, dims.layers);
  // This rank's heads keep their global decays.
  decay.assign(decay.begin() + tp.rank * h_, decay.begin() + (tp.rank + 1) * h_);
  decay_ = Tensor::Empty({h_}, dims.stat_dtype(), dims.device);
  decay_.CopyFrom(Tensor::FromVector<double>(decay, {h_}).To(dims.stat_dtype()));
  const double out_std = dims.init_std / std::sqrt(2.0 * dims.layers);
  const int n = tp.size, r = tp.rank;
  wq_.InitSharded(prefix + "wq", {hd, c}, 0, n, r, dims.dtype, dims.seed, dims.init_std);
  wk_.InitSharded(prefix + "wk", {hd, c}, 0, n, r, dims.dtype, dims.seed, dims.init_std);
  wv_.InitSharded(prefix + "wv", {hd, c}, 0, n, r, dims.dtype, dims.seed, dims.init_std);
  wg_.InitSharded(prefix + "wg", {hd, c}, 0, n, r, dims.dtype, dims.seed, dims.init_std);
  wo_.InitSharded(prefix + "wo", {c, hd}, 1, n, r, dims.dtype, dims.seed, out_std);
  norm_.Init(prefix + "norm", {dims.head_dim}, dims.dtype, dims.seed, 0, 1.0, /*decay=*/false);
  if (moh) moh_ = std::make_unique<MohRouter>(dims, tp, prefix + "moh.");
}

void LightningAttentionLayer::CollectParams(ParamList& out) {
  out.insert(out.end(), {&wq_, &wk_, &wv_});
  if (dims_.lightning_gate) out.push_back(&wg_);
  out.push_back(&wo_);
  if (dims_.lightning_norm) out.push_back(&norm_);
  if (moh_) moh_->CollectParams(out);
}

void LightningAttentionLayer::Forward(const Tensor& x, const Batch& batch, Tensor& y, const Tensor* residual) {
  const int64_t t = x.dim(0), h = h_, d = dims_.head_dim;
  qa_ = dims_.Act({t, h, d});
  ka_ = dims_.Act({t, h, d});
  va_ = dims_.Act({t, h, d});
  ops::LinearForward(x, wq_.weight(), qa_);
  ops::LinearForward(x, wk_.weight(), ka_);
  ops::LinearForward(x, wv_.weight(), va_);
  if (dims_.lightning_silu) {
    q_ = dims_.Act(qa_.shape());
    k_ = dims_.Act(ka_.shape());
    v_ = dims_.Act(va_.shape());
    ops::SiluForward(qa_, q_);
    ops::SiluForward(ka_, k_);
    ops::SiluForward(va_, v_);
  } else {
    q_ = qa_, k_ = ka_, v_ = va_;
  }
  a_ = dims_.Act({t, h, d});
  Tensor state_out = dims_.Stat({batch.token_rows.rows(), h, d, d});
  ops::LightningOptions options;
  options.block = dims_.lightning_block;
  if (moh_) {
    moh_->Forward(x);
    if (cp_.size == 1 && skip_inactive_) active_ = moh_->ActiveMask(dims_.lightning_block);
  }
  options.active = active_;
  if (cp_.size == 1) {
    ops::LightningAttentionForward(q_, k_, v_, decay_, batch.token_rows, options, Tensor(), a_, state_out);
  } else {
    CheckComm(CpLightningForward(*cp_.comm, cp_.linear, *batch.cp_chunks, q_, k_, v_, decay_, batch.token_rows, a_,
                                 &cp_saved_));
  }
  if (dims_.lightning_norm) {
    n_ = dims_.Act({t * h, d});
    rstd_ = dims_.Stat({t * h});
    ops::RmsNormForward(a_.Reshape({t * h, d}), norm_.value, dims_.lightning_norm_eps, n_, rstd_);
  } else {
    n_ = a_;
  }
  if (dims_.lightning_gate) {
    g_ = dims_.Act({t, h * d});
    ops::LinearForward(x, wg_.weight(), g_);
    y_ = dims_.Act({t, h * d});
    ops::SigmoidGateForward(n_.Reshape({t, h * d}), g_, y_);
  } else {
    y_ = n_.Reshape({t, h * d});
  }
  if (moh_) {
    yg_ = moh_->Gate(y_);
  } else {
    yg_ = y_;
  }
  tp_.ProjectOutput(yg_, wo_.weight(), y, residual);
}

void LightningAttentionLayer::Backward(const Tensor& x, const Batch& batch, const Tensor& dy, Tensor& dx,
                                       double router_loss_scale) {
  const int64_t t = x.dim(0), h = h_, d = dims_.head_dim;
  Tensor d_y = dims_.Act({t, h * d});
  ops::LinearBackward(yg_, wo_.weight(), dy, &d_y, wo_.grad);
  if (moh_) moh_->GateBackward(y_, d_y);
  // Each branch below adds its input gradient into dx: the first writes.
  bool dx_written = false;
  auto add_input_grad = [&](const Tensor& dproj, Param& w) {
    ops::LinearBackward(x, w.weight(), dproj, &dx, w.grad, /*accumulate_dx=*/dx_written);
    dx_written = true;
  };
  Tensor dn = d_y;
  if (dims_.lightning_gate) {
    dn = dims_.Act({t, h * d});
    Tensor dg = dims_.Act({t, h * d});
    ops::SigmoidGateBackward(n_.Reshape({t, h * d}), g_, d_y, dn, dg);
    add_input_grad(dg, wg_);
  }
  Tensor da = dn;
  if (dims_.lightning_norm) {
    da = dims_.Act({t * h, d});
    if (tp_.size == 1) {
      ops::RmsNormBackward(a_.Reshape({t * h, d}), norm_.value, rstd_, dn.Reshape({t * h, d}), da, norm_.grad);
    } else {
      // The shared norm weight sees only this rank's heads: sum the
      // micro-batch's contribution over the TP group.
      Tensor dw = Tensor::Zeros(norm_.grad.shape(), norm_.grad.dtype(), norm_.grad.device());
      ops::RmsNormBackward(a_.Reshape({t * h, d}), norm_.value, rstd_, dn.Reshape({t * h, d}), da, dw);
      tp_.AllReduce(dw);
      ops::AddInPlace(norm_.grad, dw);
    }
  }
  Tensor dq = dims_.Act({t, h, d}), dk = dims_.Act({t, h, d}), dv = dims_.Act({t, h, d});
  ops::LightningOptions options;
  options.block = dims_.lightning_block;
  options.active = active_;
  Tensor no_state;
  if (cp_.size == 1) {
    ops::LightningAttentionBackward(q_, k_, v_, decay_, batch.token_rows, options, Tensor(), da.Reshape({t, h, d}),
                                    Tensor(), dq, dk, dv, no_state);
  } else {
    CheckComm(CpLightningBackward(*cp_.comm, cp_.linear, *batch.cp_chunks, q_, k_, v_, decay_, batch.token_rows,
                                  da.Reshape({t, h, d}), &cp_saved_, dq, dk, dv));
  }
  if (dims_.lightning_silu) {
    ops::SiluBackward(qa_, dq, dq);
    ops::SiluBackward(ka_, dk, dk);
    ops::SiluBackward(va_, dv, dv);
  }
  add_input_grad(dq.Reshape({t, h * d}), wq_);
  add_input_grad(dk.Reshape({t, h * d}), wk_);
  add_input_grad(dv.Reshape({t, h * d}), wv_);
  if (moh_) moh_->Backward(x, dx, router_loss_scale);
  tp_.ReduceOutput(dx);
}

void LightningAttentionLayer::ReleaseActivations() {
  qa_ = ka_ = va_ = q_ = k_ = v_ = a_ = rstd_ = n_ = g_ = y_ = active_ = yg_ = Tensor();
  if (moh_) moh_->ReleaseActivations();
  cp_saved_.Release(cp_.linear.ledger);
}

}  // namespace loom
