// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/swiglu.h"

namespace loom::ops::cuda {

void SwigluForward(const Tensor&, const Tensor&, Tensor&, const Tensor*, CudaStream) {
  LOOM_CHECK(false, "[swiglu] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void SwigluBackward(const Tensor&, const Tensor&, const Tensor&, Tensor&, const Tensor*, Tensor*, CudaStream) {
  LOOM_CHECK(false, "[swiglu] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
