// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/softmax_attention.h"

namespace loom::ops::cuda {
namespace {
[[noreturn]] void NoCuda() {
  LOOM_CHECK(false, "[flash_attention] CUDA attention in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  std::abort();
}
}  // namespace

CudaTokenRows ToDevice(const TokenRows&, int) { NoCuda(); }
bool FlashAttentionRuns(int) { return false; }
AttentionBackend ParseAttentionBackend(const std::string& name) {
  if (name == "loom") return AttentionBackend::kLoom;
  if (name == "cudnn") return AttentionBackend::kCudnn;
  LOOM_CHECK(false, "[attention] model.attention_backend must be \"loom\" or \"cudnn\", got \"", name, "\"");
  return AttentionBackend::kLoom;
}
void FlashAttentionForward(const Tensor&, const Tensor&, const Tensor&, const CudaTokenRows&, const CudaTokenRows&,
                           const AttentionOptions&, Tensor&, Tensor&, CudaStream) {
  NoCuda();
}
void FlashAttentionBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const CudaTokenRows&, const CudaTokenRows&, const AttentionOptions&, Tensor&, Tensor&,
                            Tensor&, CudaStream) {
  NoCuda();
}
void AttentionForward(AttentionBackend, const Tensor&, const Tensor&, const Tensor&, const CudaTokenRows&,
                      const CudaTokenRows&, const AttentionOptions&, Tensor&, Tensor&, CudaStream) {
  NoCuda();
}
void AttentionBackward(AttentionBackend, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const CudaTokenRows&, const CudaTokenRows&, const AttentionOptions&, Tensor&,
                       Tensor&, Tensor&, CudaStream) {
  NoCuda();
}

}  // namespace loom::ops::cuda
