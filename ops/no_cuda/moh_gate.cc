// The CPU-only build: CUDA tensors cannot exist, so reaching these is a bug.
#include "ops/moh_gate.h"

namespace loom::ops::cuda {
namespace {
[[noreturn]] void NoCuda() {
  LOOM_CHECK(false, "[moh_gate] CUDA tensor in a build without CUDA (configure with -DLOOM_CUDA=ON)");
  __builtin_unreachable();
}
}  // namespace

void MohGatesForward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const MohGateOptions&, Tensor&,
                     Tensor&, Tensor&, CudaStream) {
  NoCuda();
}
void MohGatesBackward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const MohGateOptions&, Tensor&, Tensor&, Tensor&, CudaStream) {
  NoCuda();
}
void MohActiveMask(const Tensor&, const MohGateOptions&, int64_t, int64_t, Tensor&, CudaStream) { NoCuda(); }
void ApplyHeadGates(const Tensor&, const Tensor&, Tensor&, CudaStream) { NoCuda(); }
void HeadGatesBackward(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&, CudaStream) { NoCuda(); }
void ZeroInactiveHeads(const Tensor&, int64_t, Tensor&, CudaStream) { NoCuda(); }

}  // namespace loom::ops::cuda
