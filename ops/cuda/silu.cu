// CUDA SiLU, f32 or bf16 (see ops/silu.h), computed in f32 with s = σ(x):
//   y = x · s,   dx = dy · s · (1 + x (1 − s)).
#include "ops/cuda/elementwise.cuh"
#include "ops/silu.h"

namespace loom::ops::cuda {
namespace {

struct SiluFwd {
  __device__ void operator()(const float (&in)[1], float (&out)[1]) const { out[0] = in[0] * Sigmoid(in[0]); }
};
struct SiluBwd {  // in: x, dy
  __device__ void operator()(const float (&in)[2], float (&out)[1]) const {
    const float s = Sigmoid(in[0]), one_minus_s = Sigmoid(-in[0]);
    out[0] = in[1] * s * (1.0f + in[0] * one_minus_s);
  }
};

}  // namespace

void SiluForward(const Tensor& x, Tensor& y, CudaStream stream) {
  CheckLike("silu", y, x, "y", "x");
  LOOM_DISPATCH_ACTIVATION("silu", x.dtype(), T, [&] { LaunchMap<T>("SiluForward", {&x}, {&y}, SiluFwd{}, stream); });
}

void SiluBackward(const Tensor& x, const Tensor& dy, Tensor& dx, CudaStream stream) {
  CheckLike("silu", x, x, "x", "x");
  CheckLike("silu", dy, x, "dy", "x");
  CheckLike("silu", dx, x, "dx", "x");
  LOOM_DISPATCH_ACTIVATION("silu", x.dtype(), T,
                           [&] { LaunchMap<T>("SiluBackward", {&x, &dy}, {&dx}, SiluBwd{}, stream); });
}

}  // namespace loom::ops::cuda
