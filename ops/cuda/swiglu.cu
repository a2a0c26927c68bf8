// CUDA SwiGLU, f32 or bf16 (see ops/swiglu.h), computed in f32 with
// s = σ(gate):
//   h = gate · s · up,   dgate = dh · up · s · (1 + gate (1 − s)),   dup = dh · gate · s.
#include "ops/cuda/elementwise.cuh"
#include "ops/swiglu.h"

namespace loom::ops::cuda {
namespace {

struct SwigluFwd {  // in: gate, up
  __device__ void operator()(const float (&in)[2], float (&out)[1]) const {
    out[0] = in[0] * Sigmoid(in[0]) * in[1];
  }
};
struct SwigluBwd {  // in: gate, up, dh; out: dgate, dup
  __device__ void operator()(const float (&in)[3], float (&out)[2]) const {
    const float g = in[0], u = in[1], d = in[2], s = Sigmoid(g), one_minus_s = Sigmoid(-g);
    out[0] = d * u * s * (1.0f + g * one_minus_s);
    out[1] = d * g * s;
  }
};

}  // namespace

void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, CudaStream stream) {
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", h, gate, "h", "gate");
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T,
                           [&] { LaunchMap<T>("SwigluForward", {&gate, &up}, {&h}, SwigluFwd{}, stream); });
}

void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
                    CudaStream stream) {
  CheckLike("swiglu", gate, gate, "gate", "gate");
  CheckLike("swiglu", up, gate, "up", "gate");
  CheckLike("swiglu", dh, gate, "dh", "gate");
  CheckLike("swiglu", dgate, gate, "dgate", "gate");
  CheckLike("swiglu", dup, gate, "dup", "gate");
  LOOM_DISPATCH_ACTIVATION("swiglu", gate.dtype(), T, [&] {
    LaunchMap<T>("SwigluBackward", {&gate, &up, &dh}, {&dgate, &dup}, SwigluBwd{}, stream);
  });
}

}  // namespace loom::ops::cuda
