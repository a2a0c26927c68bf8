// The CPU-only build: CUDA tensors cannot exist, so reaching this is a bug.
#include "ops/matmul.h"

namespace loom::ops::cuda {

void Matmul(const Tensor&, bool, const Tensor&, bool, Tensor&, double, double, CudaStream, const Tensor*) {
  LOOM_CHECK(false, "[matmul] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
