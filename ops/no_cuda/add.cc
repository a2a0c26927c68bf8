// The CPU-only build: CUDA tensors cannot exist, so reaching this is a bug.
#include "ops/add.h"

namespace loom::ops::cuda {

void AddInPlace(Tensor&, const Tensor&, CudaStream) {
  LOOM_CHECK(false, "[add] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
