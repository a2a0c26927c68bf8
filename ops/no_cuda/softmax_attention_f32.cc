// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/softmax_attention.h"

namespace loom::ops::cuda {
namespace {
[[noreturn]] void NoCuda() {
  LOOM_CHECK(false, "[attention_f32] CUDA attention in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  std::abort();
}
}  // namespace

void AttentionF32Forward(const Tensor&, const Tensor&, const Tensor&, const CudaTokenRows&, const CudaTokenRows&,
                         const AttentionOptions&, Tensor&, Tensor&, CudaStream) {
  NoCuda();
}
void AttentionF32Backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const CudaTokenRows&, const CudaTokenRows&, const AttentionOptions&, Tensor&, Tensor&,
                          Tensor&, CudaStream) {
  NoCuda();
}

void MergeAttentionPartial(bool, Tensor&, Tensor&, const Tensor&, const Tensor&, CudaStream) { NoCuda(); }

}  // namespace loom::ops::cuda
