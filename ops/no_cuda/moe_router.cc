// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/moe_router.h"

namespace loom::ops::cuda {

void MoeRouterForward(const Tensor&, const std::vector<double>&, const MoeRouterOptions&, MoeRouting&, CudaStream) {
  LOOM_CHECK(false, "[moe_router] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void MoeRouterBackward(const Tensor&, const MoeRouting&, const Tensor&, double, double, const MoeRouterOptions&,
                       Tensor&, CudaStream) {
  LOOM_CHECK(false, "[moe_router] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
