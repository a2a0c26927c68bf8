// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/silu.h"

namespace loom::ops::cuda {

void SiluForward(const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[silu] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void SiluBackward(const Tensor&, const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[silu] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
