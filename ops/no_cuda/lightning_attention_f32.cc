// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/lightning_attention.h"

namespace loom::ops::cuda {
namespace {

[[noreturn]] void BuiltWithoutCuda(const char* op) {
  LOOM_CHECK(false, "[lightning_attention_f32] ", op,
             ": CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  __builtin_unreachable();
}

}  // namespace

void LightningAttentionF32Forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const TokenRows&,
                                  const Tensor&, Tensor&, Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningAttentionF32Forward");
}
void LightningAttentionF32Backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const TokenRows&,
                                   const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&, Tensor&,
                                   CudaStream) {
  BuiltWithoutCuda("LightningAttentionF32Backward");
}

}  // namespace loom::ops::cuda
