// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/softmax_attention.h"

namespace loom::ops::cuda {

std::string CudnnAttentionUnsupported(const Tensor&, const Tensor&, const Tensor&, const CudaTokenRows&,
                                      const CudaTokenRows&, const AttentionOptions&, bool) {
  return "built without CUDA";
}
void CudnnAttentionForward(const Tensor&, const Tensor&, const Tensor&, const CudaTokenRows&, const CudaTokenRows&,
                           const AttentionOptions&, Tensor&, Tensor&, CudaStream) {
  LOOM_CHECK(false, "[cudnn_attention] cuDNN attention in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}
void CudnnAttentionBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const CudaTokenRows&, const CudaTokenRows&, const AttentionOptions&, Tensor&, Tensor&,
                            Tensor&, CudaStream) {
  LOOM_CHECK(false, "[cudnn_attention] cuDNN attention in a build without CUDA (configure with -DLOOM_CUDA=ON)");
}

}  // namespace loom::ops::cuda
