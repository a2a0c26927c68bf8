// CPU SwiGLU, element-wise (see ops/swiglu.h). With s = sigmoid(gate):
//   dgate = dh · up · s · (1 + gate (1 − s)),   dup = dh · gate · s,
// each times the row's scale when there is one; a row's ds is summed over
// its columns in order.
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

// Columns F and rows N of the [N, F] operands (F the last dimension); a
// scale has N elements.
int64_t Cols(const Tensor& gate) { return gate.ndim() == 0 ? 1 : gate.dim(-1); }
int64_t Rows(const Tensor& gate) { return gate.numel() / std::max<int64_t>(Cols(gate), 1); }

void CheckScale(const Tensor* s, const Tensor& gate, const char* name) {
  if (s == nullptr) return;
  LOOM_CHECK(s->device().is_cpu() && s->numel() == Rows(gate) && s->dtype() == gate.dtype(), "[swiglu] ", name, " ",
             ShapeString(s->shape()), " ", DTypeName(s->dtype()), " must hold one ", DTypeName(gate.dtype()),
             " per row of gate ", ShapeString(gate.shape()));
}

template <typename T>
void Forward(const T* gate, const T* up, int64_t rows, int64_t f, const T* scale, T* h) {
#pragma omp parallel for if (rows * f >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const T s = scale != nullptr ? scale[r] : T(1);
    for (int64_t i = r * f; i < (r + 1) * f; ++i) {
      const T a = gate[i] / (T(1) + std::exp(-gate[i])) * up[i];
      h[i] = scale != nullptr ? s * a : a;
    }
  }
}

// Row r's [dgate | dup] goes to dgu + r·2F; dscale, when given, gets the
// row's Σ dh · SiLU(gate) · up.
template <typename T>
void Backward(const T* gate, const T* up, const T* dh, int64_t rows, int64_t f, const T* scale, T* dgu, T* dscale) {
#pragma omp parallel for if (rows * f >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const T s = scale != nullptr ? scale[r] : T(1);
    T ds = 0;
    for (int64_t i = 0; i < f; ++i) {
      const int64_t at = r * f + i;
      const T g = gate[at], u = up[at], d = dh[at];
      const T sig = T(1) / (T(1) + std::exp(-g));
      if (dscale != nullptr) ds += d * g * sig * u;
      const T sd = scale != nullptr ? s * d : d;
      dgu[2 * r * f + i] = sd * u * sig * (T(1) + g * (T(1) - sig));
      dgu[2 * r * f + f + i] = sd * g * sig;
    }
    if (dscale != nullptr) dscale[r] = ds;
  }
}

}  // namespace

void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, const Tensor* scale) {
  if (!gate.device().is_cpu()) return cuda::SwigluForward(gate, up, h, scale);
  CheckLike(up, gate, "up");
  CheckLike(h, gate, "h");
  CheckScale(scale, gate, "scale");
  LOOM_DISPATCH_FLOAT(gate.dtype(), T, [&] {
    Forward(gate.data<T>(), up.data<T>(), Rows(gate), Cols(gate), scale != nullptr ? scale->data<T>() : nullptr,
            h.data<T>());
  });
}

void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgu, const Tensor* scale,
                    Tensor* dscale) {
  if (!gate.device().is_cpu()) return cuda::SwigluBackward(gate, up, dh, dgu, scale, dscale);
  CheckLike(up, gate, "up");
  CheckLike(dh, gate, "dh");
  LOOM_CHECK((scale == nullptr) == (dscale == nullptr), "[swiglu] a row scale and its gradient go together");
  CheckScale(scale, gate, "scale");
  CheckScale(dscale, gate, "dscale");
  const int64_t rows = Rows(gate), f = Cols(gate);
  LOOM_CHECK(dgu.device().is_cpu() && dgu.dtype() == gate.dtype() && dgu.ndim() == 2 && dgu.dim(0) == rows &&
                 dgu.dim(1) == 2 * f,
             "[swiglu] dgu ", ShapeString(dgu.shape()), " ", DTypeName(dgu.dtype()), " must be [", rows, ", ", 2 * f,
             "] ", DTypeName(gate.dtype()));
  LOOM_DISPATCH_FLOAT(gate.dtype(), T, [&] {
    Backward(gate.data<T>(), up.data<T>(), dh.data<T>(), rows, f, scale != nullptr ? scale->data<T>() : nullptr,
             dgu.data<T>(), dscale != nullptr ? dscale->data<T>() : nullptr);
  });
}

}  // namespace loom::ops
