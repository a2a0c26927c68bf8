// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "optim/adamw.h"

namespace loom::cuda {
namespace {
[[noreturn]] void NoCuda() {
  LOOM_CHECK(false, "[adamw] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  std::abort();
}
}  // namespace

void AdamWUpdate(Tensor&, const Tensor&, Tensor&, Tensor&, double, double, int64_t, const AdamWOptions&, double,
                 CudaStream) {
  NoCuda();
}
void MultiTensorAdamW(AdamWTable&, const std::vector<AdamWTensor>&, double, int64_t, const AdamWOptions&, double,
                      CudaStream) {
  NoCuda();
}
double SumSquares(const std::vector<const Tensor*>&, CudaStream) { NoCuda(); }
void ScaleInPlace(Tensor&, double, CudaStream) { NoCuda(); }

}  // namespace loom::cuda
