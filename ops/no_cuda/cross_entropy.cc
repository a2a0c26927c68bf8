// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/cross_entropy.h"

namespace loom::ops::cuda {
namespace {
[[noreturn]] void NoCuda() {
  LOOM_CHECK(false, "[cross_entropy] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  std::abort();
}
}  // namespace

CrossEntropyResult CrossEntropy(const Tensor&, const Tensor&, const Tensor&, const CrossEntropyOptions&, Tensor*,
                                Tensor*, Tensor*, CudaStream) {
  NoCuda();
}
void SetCrossEntropyChunkRowsForTesting(int64_t) {}
void VocabShardRowMax(const Tensor&, int64_t, int64_t, Tensor&, Tensor&, CudaStream) { NoCuda(); }
void VocabShardSumExp(const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      int32_t, Tensor&, Tensor&, Tensor&, CudaStream) {
  NoCuda();
}
void VocabShardSoftmaxGrad(const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, int32_t, double, Tensor&, Tensor*, Tensor&, CudaStream) {
  NoCuda();
}
CrossEntropyResult SumRowLosses(const Tensor&, const Tensor&, int64_t, int32_t, double, CudaStream) { NoCuda(); }

}  // namespace loom::ops::cuda
