// CUDA sigmoid output gate, f32 or bf16 (see ops/sigmoid_gate.h), computed
// in f32 with s = σ(g):
//   y = x · s,   dx = dy · s,   dg = dy · x · s (1 − s).
#include "ops/cuda/elementwise.cuh"
#include "ops/sigmoid_gate.h"

namespace loom::ops::cuda {
namespace {

struct GateFwd {  // in: x, g
  __device__ void operator()(const float (&in)[2], float (&out)[1]) const { out[0] = in[0] * Sigmoid(in[1]); }
};
struct GateBwd {  // in: x, g, dy; out: dx, dg
  __device__ void operator()(const float (&in)[3], float (&out)[2]) const {
    const float x = in[0], s = Sigmoid(in[1]), one_minus_s = Sigmoid(-in[1]), d = in[2];
    out[0] = d * s;
    out[1] = d * x * s * one_minus_s;
  }
};

}  // namespace

void SigmoidGateForward(const Tensor& x, const Tensor& g, Tensor& y, CudaStream stream) {
  CheckLike("sigmoid_gate", x, x, "x", "x");
  CheckLike("sigmoid_gate", g, x, "g", "x");
  CheckLike("sigmoid_gate", y, x, "y", "x");
  LOOM_DISPATCH_ACTIVATION("sigmoid_gate", x.dtype(), T,
                           [&] { LaunchMap<T>("SigmoidGateForward", {&x, &g}, {&y}, GateFwd{}, stream); });
}

void SigmoidGateBackward(const Tensor& x, const Tensor& g, const Tensor& dy, Tensor& dx, Tensor& dg,
                         CudaStream stream) {
  CheckLike("sigmoid_gate", x, x, "x", "x");
  CheckLike("sigmoid_gate", g, x, "g", "x");
  CheckLike("sigmoid_gate", dy, x, "dy", "x");
  CheckLike("sigmoid_gate", dx, x, "dx", "x");
  CheckLike("sigmoid_gate", dg, x, "dg", "x");
  LOOM_DISPATCH_ACTIVATION("sigmoid_gate", x.dtype(), T, [&] {
    LaunchMap<T>("SigmoidGateBackward", {&x, &g, &dy}, {&dx, &dg}, GateBwd{}, stream);
  });
}

}  // namespace loom::ops::cuda
