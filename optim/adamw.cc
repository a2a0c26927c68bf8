#include "optim/adamw.h"

#include <cmath>

namespace loom {
namespace {

template <typename T>
void AdamWKernel(T* p, const T* g, T* m, T* v, int64_t n, double lr, double b1, double b2, double eps,
                 double wd, double bias1, double bias2, double grad_scale) {
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = static_cast<T>(g[i] * grad_scale);  // Scale's rounding, as if g had been scaled in place
    m[i] = static_cast<T>(b1 * m[i] + (1 - b1) * gi);
    v[i] = static_cast<T>(b2 * v[i] + (1 - b2) * double(gi) * gi);
    const double update = (m[i] / bias1) / (std::sqrt(v[i] / bias2) + eps) + wd * p[i];
    p[i] = static_cast<T>(p[i] - lr * update);
  }
}

// Serial on purpose: an OpenMP reduction combines partial sums in whatever
// order threads finish, and resumed runs must match bit for bit.
template <typename T>
double SumSquares(const T* g, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(g[i]) * g[i];
  return s;
}

template <typename T>
void Scale(T* g, int64_t n, double f) {
  for (int64_t i = 0; i < n; ++i) g[i] = static_cast<T>(g[i] * f);
}

}  // namespace

AdamW::AdamW(const ParamList& params, const AdamWOptions& options) : params_(params), options_(options) {
  for (Param* p : params_) {
    m_.push_back(Tensor::Zeros(p->value.shape(), p->value.dtype(), p->value.device()));
    v_.push_back(Tensor::Zeros(p->value.shape(), p->value.dtype(), p->value.device()));
  }
}

void AdamWUpdate(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double wd, int64_t step,
                 const AdamWOptions& options, double grad_scale) {
  LOOM_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel() &&
                 g.dtype() == p.dtype() && m.dtype() == p.dtype() && v.dtype() == p.dtype(),
             "[adamw] p, g, m, v must have the same size and dtype");
  if (!p.device().is_cpu()) return cuda::AdamWUpdate(p, g, m, v, lr, wd, step, options, grad_scale);
  const double bias1 = 1 - std::pow(options.beta1, step);
  const double bias2 = 1 - std::pow(options.beta2, step);
  LOOM_DISPATCH_FLOAT(p.dtype(), T, [&] {
    AdamWKernel(p.data<T>(), g.data<T>(), m.data<T>(), v.data<T>(), p.numel(), lr, options.beta1, options.beta2,
                options.eps, wd, bias1, bias2, grad_scale);
  });
}

double SumSquares(const Tensor& g) {
  if (!g.device().is_cpu()) return cuda::SumSquares({&g});
  return LOOM_DISPATCH_FLOAT(g.dtype(), T, [&] { return SumSquares(g.data<T>(), g.numel()); });
}

double SumSquares(const std::vector<const Tensor*>& tensors) {
  if (!tensors.empty() && !tensors[0]->device().is_cpu()) return cuda::SumSquares(tensors);
  double s = 0;
  for (const Tensor* g : tensors) s += SumSquares(*g);
  return s;
}

void ScaleInPlace(Tensor& g, double f) {
  if (!g.device().is_cpu()) return cuda::ScaleInPlace(g, f);
  LOOM_DISPATCH_FLOAT(g.dtype(), T, [&] { Scale(g.data<T>(), g.numel(), f); });
}

void AdamW::Step(double lr, double grad_scale) {
  ++steps_;
  if (!params_.empty() && !params_[0]->value.device().is_cpu()) {
    std::vector<cuda::AdamWTensor> tensors;
    for (size_t i = 0; i < params_.size(); ++i) {
      Param& p = *params_[i];
      const Device dev = p.value.device();
      LOOM_CHECK(dev == params_[0]->value.device() && p.grad.device() == dev && m_[i].device() == dev &&
                     p.value.dtype() == DType::kF32 && p.grad.dtype() == DType::kF32 &&
                     m_[i].dtype() == DType::kF32 && p.grad.numel() == p.value.numel(),
                 "[adamw] ", p.name, ": parameters on a GPU need f32 value, grad and moments on ",
                 params_[0]->value.device().ToString());
      LOOM_CHECK(!p.compute.defined() || (p.compute.device() == dev && p.compute.dtype() == DType::kBF16 &&
                                          p.compute.numel() == p.value.numel()),
                 "[adamw] ", p.name, ": the compute copy must be bf16 ", ShapeString(p.value.shape()), " on ",
                 dev.ToString());
      tensors.push_back({p.value.data<float>(), p.grad.data<float>(), m_[i].data<float>(), v_[i].data<float>(),
                         p.compute.defined() ? p.compute.data<bf16>() : nullptr, p.value.numel(),
                         p.weight_decay ? options_.weight_decay : 0.0});
    }
    return cuda::MultiTensorAdamW(device_table_, tensors, lr, steps_, options_, grad_scale);
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = *params_[i];
    AdamWUpdate(p.value, p.grad, m_[i], v_[i], lr, p.weight_decay ? options_.weight_decay : 0.0, steps_, options_,
                grad_scale);
  }
}

double GlobalGradNorm(const ParamList& params) {
  std::vector<const Tensor*> grads;
  for (const Param* p : params) grads.push_back(&p->grad);
  return std::sqrt(SumSquares(grads));
}

double ClipFactor(double norm, double max_norm) {
  return max_norm > 0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1;
}

double ClipGradNorm(const ParamList& params, double max_norm) {
  const double norm = GlobalGradNorm(params);
  if (const double f = ClipFactor(norm, max_norm); f != 1)
    for (Param* p : params) ScaleInPlace(p->grad, f);
  return norm;
}

}  // namespace loom
