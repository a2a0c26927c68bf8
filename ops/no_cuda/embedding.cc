// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/embedding.h"

namespace loom::ops::cuda {

void EmbeddingForward(const Tensor&, const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[embedding] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void EmbeddingBackward(const Tensor&, const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[embedding] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void EmbeddingForwardSlice(const Tensor&, const Tensor&, int64_t, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[embedding] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void EmbeddingBackwardSlice(const Tensor&, const Tensor&, int64_t, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[embedding] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
