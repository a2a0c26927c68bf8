// CPU SwiGLU, element-wise (see ops/swiglu.h). With s = sigmoid(gate):
//   dgate = dh · up · s · (1 + gate (1 − s)),   dup = dh · gate · s.
#include "ops/swiglu.h"

#include <cmath>

namespace loom::ops {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

void CheckLike(const Tensor& t, const Tensor& gate, const char* name) {
  LOOM_CHECK(gate.device().is_cpu() && t.device().is_cpu(), "[swiglu] CPU tensors only");
  LOOM_CHECK(t.numel() == gate.numel() && t.dtype() == gate.dtype(), "[swiglu] ", name, " ",
             ShapeString(t.shape()), " ", DTypeName(t.dtype()), " must match gate ", ShapeString(gate.shape()),
             " ", DTypeName(gate.dtype()));
}

template <typename T>
void Forward(const T* gate, const T* up, int64_t n, T* h) {
#pragma omp parallel for if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) h[i] = gate[i] / (T(1) + std::exp(-gate[i])) * up[i];
}

template <typename T>
void Backward(const T* gate, const T* up, const T* dh, int64_t n, T* dgate, T* dup) {
#pragma omp parallel for if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i], u = up[i], d = dh[i];  // read before writing: the outputs may overwrite the inputs
    const T s = T(1) / (T(1) + std::exp(-g));
    dgate[i] = d * u * s * (T(1) + g * (T(1) - s));
    dup[i] = d * g * s;
  }
}

}  // namespace

void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h) {
  if (!gate.device().is_cpu()) return cuda::SwigluForward(gate, up, h);
  CheckLike(up, gate, "up");
  CheckLike(h, gate, "h");
  LOOM_DISPATCH_FLOAT(gate.dtype(), T,
                      [&] { Forward(gate.data<T>(), up.data<T>(), gate.numel(), h.data<T>()); });
}

void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup) {
  if (!gate.device().is_cpu()) return cuda::SwigluBackward(gate, up, dh, dgate, dup);
  CheckLike(up, gate, "up");
  CheckLike(dh, gate, "dh");
  CheckLike(dgate, gate, "dgate");
  CheckLike(dup, gate, "dup");
  LOOM_DISPATCH_FLOAT(gate.dtype(), T, [&] {
    Backward(gate.data<T>(), up.data<T>(), dh.data<T>(), gate.numel(), dgate.data<T>(), dup.data<T>());
  });
}

}  // namespace loom::ops
