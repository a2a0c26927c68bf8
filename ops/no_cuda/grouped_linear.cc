// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/grouped_linear.h"

namespace loom::ops::cuda {

void GroupedLinearForward(const Tensor&, const std::vector<const Tensor*>&, const std::vector<int64_t>&, Tensor&,
                          CudaStream) {
  LOOM_CHECK(false, "[grouped_linear] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void GroupedLinearBackward(const Tensor&, const std::vector<const Tensor*>&, const std::vector<int64_t>&,
                           const Tensor&, Tensor*, const std::vector<Tensor*>&, bool, CudaStream) {
  LOOM_CHECK(false, "[grouped_linear] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

void GroupedLinearPairBackward(const Tensor&, const std::vector<const Tensor*>&, const std::vector<const Tensor*>&,
                               const std::vector<int64_t>&, const Tensor&, Tensor&, const std::vector<Tensor*>&,
                               const std::vector<Tensor*>&, bool, CudaStream) {
  LOOM_CHECK(false, "[grouped_linear] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
