#include "model/mlp.h"

#include <cmath>

#include "ops/linear.h"
#include "ops/swiglu.h"

namespace loom {

SwigluMlp::SwigluMlp(const ModelDims& dims, const std::string& prefix) : dims_(dims) {
  const int64_t c = dims.hidden, f = dims.ffn;
  w_gate_.Init(prefix + "w_gate", {f, c}, dims.dtype, dims.seed, dims.init_std);
  w_up_.Init(prefix + "w_up", {f, c}, dims.dtype, dims.seed, dims.init_std);
  w_down_.Init(prefix + "w_down", {c, f}, dims.dtype, dims.seed, dims.init_std / std::sqrt(2.0 * dims.layers));
}

void SwigluMlp::Forward(const Tensor& x, Tensor& y) {
  const int64_t t = x.dim(0), f = dims_.ffn;
  gate_ = Tensor::Empty({t, f}, x.dtype());
  up_ = Tensor::Empty({t, f}, x.dtype());
  h_ = Tensor::Empty({t, f}, x.dtype());
  ops::LinearForward(x, w_gate_.value, gate_);
  ops::LinearForward(x, w_up_.value, up_);
  ops::SwigluForward(gate_, up_, h_);
  ops::LinearForward(h_, w_down_.value, y);
}

void SwigluMlp::Backward(const Tensor& x, const Tensor& dy, Tensor& dx) {
  Tensor dh = Tensor::Empty(h_.shape(), x.dtype());
  ops::LinearBackward(h_, w_down_.value, dy, &dh, w_down_.grad);
  Tensor dgate = Tensor::Empty(gate_.shape(), x.dtype()), dup = Tensor::Empty(up_.shape(), x.dtype());
  ops::SwigluBackward(gate_, up_, dh, dgate, dup);
  ops::LinearBackward(x, w_gate_.value, dgate, &dx, w_gate_.grad);
  ops::LinearBackward(x, w_up_.value, dup, &dx, w_up_.grad, /*accumulate_dx=*/true);
}

}  // namespace loom
