// The CPU-only build: CUDA tensors cannot exist, so reaching this is a bug.
#include "ops/cross_entropy.h"

namespace loom::ops::cuda {

CrossEntropyResult CrossEntropy(const Tensor&, const Tensor&, const Tensor&, const CrossEntropyOptions&, Tensor*,
                                Tensor*, Tensor*, CudaStream) {
  LOOM_CHECK(false, "[cross_entropy] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  return {};
}
void SetCrossEntropyChunkRowsForTesting(int64_t) {}

}  // namespace loom::ops::cuda
