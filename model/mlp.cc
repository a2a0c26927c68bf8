#include "model/mlp.h"

#include <cmath>

#include "ops/grouped_linear.h"
#include "ops/linear.h"
#include "ops/swiglu.h"

namespace loom {

SwigluMlp::SwigluMlp(const ModelDims& dims, const TensorParallel& tp, const std::string& prefix)
    : dims_(dims), tp_(tp), f_(dims.ffn / tp.size) {
  const int64_t c = dims.hidden, f = dims.ffn;
  const int n = tp.size, r = tp.rank;
  w_gate_.InitSharded(prefix + "w_gate", {f, c}, 0, n, r, dims.dtype, dims.seed, dims.init_std);
  w_up_.InitSharded(prefix + "w_up", {f, c}, 0, n, r, dims.dtype, dims.seed, dims.init_std);
  w_down_.InitSharded(prefix + "w_down", {c, f}, 1, n, r, dims.dtype, dims.seed,
                      dims.init_std / std::sqrt(2.0 * dims.layers));
}

void SwigluMlp::Forward(const Tensor& x, Tensor& y, const Tensor* residual) {
  const int64_t t = x.dim(0), f = f_;
  gate_ = dims_.Act({t, f});
  up_ = dims_.Act({t, f});
  h_ = dims_.Act({t, f});
  ops::LinearForward(x, w_gate_.weight(), gate_);
  ops::LinearForward(x, w_up_.weight(), up_);
  ops::SwigluForward(gate_, up_, h_);
  tp_.ProjectOutput(h_, w_down_.weight(), y, residual);
}

void SwigluMlp::Backward(const Tensor& x, const Tensor& dy, Tensor& dx, bool accumulate_dx) {
  LOOM_CHECK(!accumulate_dx || tp_.size == 1, "[mlp] adding into dx needs the whole MLP on this rank, not tp = ",
             tp_.size);
  Tensor dh = dims_.Act(h_.shape());
  ops::LinearBackward(h_, w_down_.weight(), dy, &dh, w_down_.grad);
  // dgu [T, 2F]: each row's [dgate | dup], so dx = dgu · [W_gate; W_up] is
  // one GEMM where the compute copies are adjacent (model/param.h): the
  // pair backward of one group.
  Tensor dgu = dims_.Act({h_.dim(0), 2 * f_});
  ops::SwigluBackward(gate_, up_, dh, dgu);
  ops::GroupedLinearPairBackward(x, {&w_gate_.weight()}, {&w_up_.weight()}, {x.dim(0)}, dgu, dx, {&w_gate_.grad},
                                 {&w_up_.grad}, accumulate_dx);
  tp_.ReduceOutput(dx);
}

}  // namespace loom
