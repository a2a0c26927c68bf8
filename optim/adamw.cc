#include "optim/adamw.h"

#include <cmath>

namespace loom {
namespace {

template <typename T>
void AdamWKernel(T* p, const T* g, T* m, T* v, int64_t n, double lr, double b1, double b2, double eps,
                 double wd, double bias1, double bias2) {
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    m[i] = static_cast<T>(b1 * m[i] + (1 - b1) * g[i]);
    v[i] = static_cast<T>(b2 * v[i] + (1 - b2) * double(g[i]) * g[i]);
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
    m_.push_back(Tensor::Zeros(p->value.shape(), p->value.dtype()));
    v_.push_back(Tensor::Zeros(p->value.shape(), p->value.dtype()));
  }
}

void AdamW::Step(double lr) {
  ++steps_;
  const double bias1 = 1 - std::pow(options_.beta1, steps_);
  const double bias2 = 1 - std::pow(options_.beta2, steps_);
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = *params_[i];
    const double wd = p.weight_decay ? options_.weight_decay : 0.0;
    LOOM_DISPATCH_FLOAT(p.value.dtype(), T, [&] {
      AdamWKernel(p.value.data<T>(), p.grad.data<T>(), m_[i].data<T>(), v_[i].data<T>(), p.value.numel(), lr,
                  options_.beta1, options_.beta2, options_.eps, wd, bias1, bias2);
    });
  }
}

double GlobalGradNorm(const ParamList& params) {
  double s = 0;
  for (const Param* p : params)
    s += LOOM_DISPATCH_FLOAT(p->grad.dtype(), T, [&] { return SumSquares(p->grad.data<T>(), p->grad.numel()); });
  return std::sqrt(s);
}

double ClipGradNorm(const ParamList& params, double max_norm) {
  const double norm = GlobalGradNorm(params);
  if (max_norm > 0 && norm > max_norm) {
    const double f = max_norm / (norm + 1e-6);
    for (Param* p : params)
      LOOM_DISPATCH_FLOAT(p->grad.dtype(), T, [&] { Scale(p->grad.data<T>(), p->grad.numel(), f); });
  }
  return norm;
}

}  // namespace loom
