// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/rope.h"

namespace loom::ops::cuda {

void RopeForward(const Tensor&, const Tensor&, const RopeTable&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[rope] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void RopeBackward(const Tensor&, const Tensor&, const RopeTable&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[rope] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

void RopeQkvForward(const Tensor&, const Tensor&, const RopeTable&, Tensor&, Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[rope] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void RopeQkvBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const RopeTable&, Tensor&,
                     CudaStream) {
  LOOM_CHECK(false, "[rope] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
