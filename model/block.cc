#include "model/block.h"

#include "ops/add.h"
#include "ops/rmsnorm.h"

namespace loom {

DecoderBlock::DecoderBlock(const ModelDims& dims, const TensorParallel& tp, const ContextParallel& cp, int layer)
    : dims_(dims),
      tp_(tp),
      kind_(dims.kinds[layer]),
      recompute_(dims.recompute[layer]) {
  const std::string prefix = absl::StrCat("layers.", layer, ".");
  if (dims.moe.experts > 0) {
    moe_ = std::make_unique<MoeLayer>(dims, prefix + "moe.");
  } else {
    mlp_ = std::make_unique<SwigluMlp>(dims, tp, prefix + "mlp.");
  }
  norm1_.Init(prefix + "norm1", {dims.hidden}, dims.dtype, dims.seed, 0, 1.0, /*decay=*/false);
  norm2_.Init(prefix + "norm2", {dims.hidden}, dims.dtype, dims.seed, 0, 1.0, /*decay=*/false);
  if (SoftmaxKind(kind_)) {
    softmax_ = std::make_unique<SoftmaxAttentionLayer>(dims, tp, cp, prefix + "attn.", MohKind(kind_));
  } else {
    lightning_ = std::make_unique<LightningAttentionLayer>(dims, tp, cp, layer, prefix + "attn.", MohKind(kind_));
  }
}

MohRouter* DecoderBlock::moh() { return softmax_ ? softmax_->moh() : lightning_->moh(); }

double DecoderBlock::router_loss() const {
  double loss = moe_ ? moe_->router_loss() : 0.0;
  const MohRouter* moh = softmax_ ? softmax_->moh() : lightning_->moh();
  return moh ? loss + moh->router_loss() : loss;
}

void DecoderBlock::CollectParams(ParamList& out) {
  out.push_back(&norm1_);
  if (softmax_) softmax_->CollectParams(out);
  if (lightning_) lightning_->CollectParams(out);
  out.push_back(&norm2_);
  if (mlp_) mlp_->CollectParams(out);
  if (moe_) moe_->CollectParams(out);
}

void DecoderBlock::Forward(const Tensor& x, const Batch& batch, Tensor& out) {
  ForwardKeepingActivations(x, batch, out);
  if (recompute_) ReleaseActivations();
}

void DecoderBlock::ForwardKeepingActivations(const Tensor& x, const Batch& batch, Tensor& out) {
  const int64_t t = x.dim(0), c = dims_.hidden;
  n1_ = dims_.Act({t, c});
  rstd1_ = dims_.Stat({t});
  ops::RmsNormForward(x, norm1_.value, dims_.norm_eps, n1_, rstd1_);
  const bool sp = tp_.sp();
  n1_full_ = sp ? tp_.GatherTokens(n1_) : n1_;
  // x1 = x + Mixer(n1), out = x1 + MLP(n2): the skip connections are added
  // in the layers' output GEMMs, or after the reduce-scatter under sp.
  Tensor mixed = dims_.Act(n1_full_.shape());
  if (softmax_) softmax_->Forward(n1_full_, batch, mixed, sp ? nullptr : &x);
  if (lightning_) lightning_->Forward(n1_full_, batch, mixed, sp ? nullptr : &x);
  x1_ = sp ? tp_.ScatterTokens(mixed) : mixed;
  if (sp) ops::AddInPlace(x1_, x);
  n2_ = dims_.Act({t, c});
  rstd2_ = dims_.Stat({t});
  ops::RmsNormForward(x1_, norm2_.value, dims_.norm_eps, n2_, rstd2_);
  n2_full_ = sp ? tp_.GatherTokens(n2_) : n2_;
  Tensor y = sp ? dims_.Act(n2_full_.shape()) : out;
  if (mlp_) mlp_->Forward(n2_full_, y, sp ? nullptr : &x1_);
  if (moe_) moe_->Forward(n2_full_, y, sp ? nullptr : &x1_);
  if (sp) {
    out.CopyFrom(tp_.ScatterTokens(y));
    ops::AddInPlace(out, x1_);
  }
}

// dx = RMSNormᵀ(dn) + residual (the gradient that skips the norm), one pass.
void DecoderBlock::NormBackward(const Tensor& x, Param& norm, const Tensor& rstd, const Tensor& dn,
                                const Tensor& residual, Tensor& dx) {
  if (!tp_.sp()) {
    ops::RmsNormBackward(x, norm.value, rstd, dn, dx, norm.grad, &residual);
    return;
  }
  Tensor dw = Tensor::Zeros(norm.grad.shape(), norm.grad.dtype(), norm.grad.device());
  ops::RmsNormBackward(x, norm.value, rstd, dn, dx, dw, &residual);
  tp_.AllReduce(dw);
  ops::AddInPlace(norm.grad, dw);
}

void DecoderBlock::Backward(const Tensor& x, const Batch& batch, const Tensor& dout, Tensor& dx,
                            double router_loss_scale) {
  const int64_t t = x.dim(0), c = dims_.hidden;
  if (recompute_) {
    Tensor scratch = dims_.Act({t, c});
    ForwardKeepingActivations(x, batch, scratch);
  }
  // Residual: dx1 = dout + RMSNorm₂ᵀ(MLPᵀ(dout)).
  const bool sp = tp_.sp();
  const Tensor dout_full = sp ? tp_.GatherTokens(dout) : dout;
  Tensor dn = dims_.Act(dout_full.shape());
  if (mlp_) mlp_->Backward(n2_full_, dout_full, dn);
  if (moe_) moe_->Backward(n2_full_, dout_full, dn, router_loss_scale);
  if (sp) dn = tp_.ScatterTokens(dn);
  Tensor dx1 = dims_.Act({t, c});
  NormBackward(x1_, norm2_, rstd2_, dn, dout, dx1);
  // dx = dx1 + RMSNorm₁ᵀ(Mixerᵀ(dx1)).
  const Tensor dx1_full = sp ? tp_.GatherTokens(dx1) : dx1;
  dn = dims_.Act(dx1_full.shape());
  if (softmax_) softmax_->Backward(n1_full_, batch, dx1_full, dn, router_loss_scale);
  if (lightning_) lightning_->Backward(n1_full_, batch, dx1_full, dn, router_loss_scale);
  if (sp) dn = tp_.ScatterTokens(dn);
  NormBackward(x, norm1_, rstd1_, dn, dx1, dx);
  ReleaseActivations();
}

void DecoderBlock::ReleaseActivations() {
  n1_ = rstd1_ = x1_ = n2_ = rstd2_ = n1_full_ = n2_full_ = Tensor();
  if (softmax_) softmax_->ReleaseActivations();
  if (lightning_) lightning_->ReleaseActivations();
  if (mlp_) mlp_->ReleaseActivations();
  if (moe_) moe_->ReleaseActivations();
}

}  // namespace loom
