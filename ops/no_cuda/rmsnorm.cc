// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/rmsnorm.h"

namespace loom::ops::cuda {

void RmsNormForward(const Tensor&, const Tensor&, double, Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[rmsnorm] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void RmsNormBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor*,
                     CudaStream) {
  LOOM_CHECK(false, "[rmsnorm] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
