// The CPU-only build: CUDA tensors cannot exist, so reaching this is a bug.
#include "ops/convert.h"

namespace loom::ops::cuda {

void Convert(const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[convert] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
