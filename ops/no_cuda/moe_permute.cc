// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/moe_permute.h"

namespace loom::ops::cuda {

void MoePermuteIndex(const Tensor&, const std::vector<int64_t>&, MoePermutation&, CudaStream) {
  LOOM_CHECK(false, "[moe_permute] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void MoeGather(const Tensor&, const Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[moe_permute] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void MoeCombine(const Tensor&, const Tensor&, const Tensor*, Tensor&, const Tensor*, const Tensor*, CudaStream) {
  LOOM_CHECK(false, "[moe_permute] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
