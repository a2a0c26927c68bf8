// SwiGLU MLP: y = (SiLU(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ
// W_gate, W_up [F, C], W_down [C, F].
// Tensor parallel: each rank holds F/tp of the hidden units (rows of W_gate,
// W_up; columns of W_down); y and dx are summed over the TP group.
// Gradient rule: parameter gradients accumulate, dx is written (or added
// when accumulate_dx, without tp: MoE's shared experts).
#pragma once

#include <string>

#include "model/dims.h"
#include "model/param.h"
#include "parallel/tensor_parallel.h"

namespace loom {

class SwigluMlp {
 public:
  SwigluMlp(const ModelDims& dims, const TensorParallel& tp, const std::string& prefix);
  // y = MLP(x), plus residual when given (TensorParallel::ProjectOutput).
  void Forward(const Tensor& x, Tensor& y, const Tensor* residual = nullptr);
  void Backward(const Tensor& x, const Tensor& dy, Tensor& dx, bool accumulate_dx = false);
  void ReleaseActivations() { gate_ = up_ = h_ = Tensor(); }
  void CollectParams(ParamList& out) { out.insert(out.end(), {&w_gate_, &w_up_, &w_down_}); }

 private:
  const ModelDims& dims_;
  TensorParallel tp_;
  int64_t f_;  // local hidden units
  Param w_gate_, w_up_, w_down_;
  Tensor gate_, up_, h_;  // [T, F]
};

}  // namespace loom
