// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/lightning_attention.h"

namespace loom::ops::cuda {
namespace {

[[noreturn]] void BuiltWithoutCuda(const char* op) {
  LOOM_CHECK(false, "[lightning_attention] ", op, ": CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  __builtin_unreachable();
}

}  // namespace

void LightningAttentionForward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const TokenRows&,
                               const Tensor&, Tensor&, Tensor&, LightningWorkspace&, CudaStream, const Tensor&,
                               int64_t) {
  BuiltWithoutCuda("LightningAttentionForward");
}
void LightningAttentionBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const TokenRows&,
                                const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&, Tensor&,
                                LightningWorkspace&, CudaStream, const Tensor&, int64_t) {
  BuiltWithoutCuda("LightningAttentionBackward");
}
bool LightningChunkState(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, LightningWorkspace&,
                         CudaStream) {
  BuiltWithoutCuda("LightningChunkState");
}
void LightningChunkStateBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                                 Tensor&, LightningWorkspace&, CudaStream) {
  BuiltWithoutCuda("LightningChunkStateBackward");
}
void LightningIntraChunk(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                         LightningWorkspace&, CudaStream) {
  BuiltWithoutCuda("LightningIntraChunk");
}
void LightningIntraChunkBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, Tensor&, Tensor&, Tensor&, LightningWorkspace&, CudaStream) {
  BuiltWithoutCuda("LightningIntraChunkBackward");
}
void LightningInterChunk(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningInterChunk");
}
void LightningInterChunkBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                                 Tensor&, LightningWorkspace&, CudaStream) {
  BuiltWithoutCuda("LightningInterChunkBackward");
}

}  // namespace loom::ops::cuda
