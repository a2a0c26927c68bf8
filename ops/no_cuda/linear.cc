// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/linear.h"

namespace loom::ops::cuda {

void LinearForward(const Tensor&, const Tensor&, Tensor&, const Tensor*, CudaStream) {
  LOOM_CHECK(false, "[linear] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void LinearBackward(const Tensor&, const Tensor&, const Tensor&, Tensor*, Tensor&, bool, CudaStream) {
  LOOM_CHECK(false, "[linear] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
