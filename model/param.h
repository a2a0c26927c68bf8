// A trainable tensor and its gradient. Parameter gradients accumulate (+=)
// over micro-batches; the optimizer zeroes them after each step.
#pragma once

#include <string>
#include <vector>

#include "runtime/rng.h"
#include "runtime/tensor.h"

namespace loom {

struct Param {
  std::string name;          // "layers.3.attn.wq": also the init RNG stream
  Tensor value;
  Tensor grad;
  bool weight_decay = true;  // false for norms and biases

  // Allocates value and grad ([shape], dtype), normal(0, std) from the
  // (seed, name) stream, or `fill` when std == 0.
  void Init(std::string param_name, const Shape& shape, DType dtype, uint64_t seed, double std, double fill = 0,
            bool decay = true) {
    name = std::move(param_name);
    value = Tensor::Empty(shape, dtype);
    if (std > 0) {
      FillNormal(value, RngKey(seed, name), std);
    } else {
      value.Fill(fill);
    }
    grad = Tensor::Zeros(shape, dtype);
    weight_decay = decay;
  }
};

using ParamList = std::vector<Param*>;

}  // namespace loom
