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

bool LightningF32ChunkState(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningF32ChunkState");
}
void LightningF32ChunkStateBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                                    Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningF32ChunkStateBackward");
}
void LightningF32IntraChunk(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                            CudaStream) {
  BuiltWithoutCuda("LightningF32IntraChunk");
}
void LightningF32IntraChunkBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, Tensor&, Tensor&, Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningF32IntraChunkBackward");
}
void LightningF32InterChunk(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningF32InterChunk");
}
void LightningF32InterChunkBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                                    Tensor&, CudaStream) {
  BuiltWithoutCuda("LightningF32InterChunkBackward");
}

}  // namespace loom::ops::cuda
