// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/sigmoid_gate.h"

namespace loom::ops::cuda {

void SigmoidGateForward(const Tensor&, const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[sigmoid_gate] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void SigmoidGateBackward(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[sigmoid_gate] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
