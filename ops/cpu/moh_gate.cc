// CPU MoH gates, mask and head gating (math in ops/moh_gate.h): the
// reference ops/cuda/moh_gate.cu is tested against.
#include "ops/moh_gate.h"

#include <algorithm>
#include <cmath>

namespace loom::ops {
namespace {

// In place, each row of x [T, n]: x ← softmax(x).
template <typename T>
void SoftmaxRows(Tensor& x) {
  const int64_t t = x.dim(0), n = x.dim(1);
  T* p = x.data<T>();
  for (int64_t r = 0; r < t; ++r) {
    T* row = p + r * n;
    const T m = *std::max_element(row, row + n);
    T sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += row[i] = std::exp(row[i] - m);
    for (int64_t i = 0; i < n; ++i) row[i] /= sum;
  }
}

// Softmax backward of one row: dz = s ⊙ (ds − Σ ds·s) (written).
template <typename T>
void SoftmaxRowBackward(const T* s, const T* ds, int64_t n, T* dz) {
  T dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += ds[i] * s[i];
  for (int64_t i = 0; i < n; ++i) dz[i] = s[i] * (ds[i] - dot);
}

void CheckCpu(const Tensor& t, const char* name) {
  LOOM_CHECK(!t.defined() || t.device().is_cpu(), "[moh_gate] ", name, " is on ", t.device().ToString(),
             " beside CPU tensors");
}

int Routed(const MohGateOptions& o) { return o.heads - o.shared; }

}  // namespace

void MohGatesForward(const Tensor& shared_logits, const Tensor& alpha_logits, const Tensor& experts,
                     const Tensor& routed_gates, const MohGateOptions& options, Tensor& shared_scores, Tensor& alpha,
                     Tensor& gates) {
  if (!gates.device().is_cpu())
    return cuda::MohGatesForward(shared_logits, alpha_logits, experts, routed_gates, options, shared_scores, alpha,
                                 gates);
  for (const auto& [t, name] : {std::pair{&shared_logits, "shared_logits"}, {&alpha_logits, "alpha_logits"},
                                {&experts, "experts"}, {&routed_gates, "routed_gates"}})
    CheckCpu(*t, name);
  const int64_t tokens = gates.dim(0);
  const int h = options.heads, s = options.shared, k = options.top_k;
  const DType dt = gates.dtype();
  LOOM_CHECK(gates.shape() == (Shape{tokens, h}), "[moh_gate] gates ", ShapeString(gates.shape()), " for ", h,
             " heads");
  shared_scores = shared_logits.defined() ? shared_logits.Clone() : Tensor();
  alpha = alpha_logits.defined() ? alpha_logits.Clone() : Tensor();
  gates.Zero();
  LOOM_DISPATCH_FLOAT(dt, T, [&] {
    if (shared_scores.defined()) SoftmaxRows<T>(shared_scores);
    if (alpha.defined()) SoftmaxRows<T>(alpha);
    T* g = gates.data<T>();
    for (int64_t r = 0; r < tokens; ++r) {
      const T a1 = alpha.defined() ? alpha.data<T>()[r * 2] : T(1);
      const T a2 = alpha.defined() ? alpha.data<T>()[r * 2 + 1] : T(1);
      for (int i = 0; i < s; ++i)
        g[r * h + i] = options.fixed_gates ? T(1) : a1 * shared_scores.data<T>()[r * s + i];
      for (int j = 0; Routed(options) > 0 && j < k; ++j) {
        const int head = s + experts.data<int32_t>()[r * k + j];
        g[r * h + head] = options.fixed_gates ? T(1) : a2 * routed_gates.data<T>()[r * k + j];
      }
    }
  });
}

void MohGatesBackward(const Tensor& shared_scores, const Tensor& alpha, const Tensor& experts,
                      const Tensor& routed_gates, const Tensor& dgates, const MohGateOptions& options,
                      Tensor& dshared_logits, Tensor& dalpha_logits, Tensor& drouted_gates) {
  LOOM_CHECK(!options.fixed_gates, "[moh_gate] fixed gates have no gradient");
  if (!dgates.device().is_cpu())
    return cuda::MohGatesBackward(shared_scores, alpha, experts, routed_gates, dgates, options, dshared_logits,
                                  dalpha_logits, drouted_gates);
  for (const auto& [t, name] : {std::pair{&shared_scores, "shared_scores"}, {&alpha, "alpha"},
                                {&experts, "experts"}, {&routed_gates, "routed_gates"}})
    CheckCpu(*t, name);
  const int64_t tokens = dgates.dim(0);
  const int h = options.heads, s = options.shared, k = options.top_k, routed = Routed(options);
  const DType dt = dgates.dtype();
  if (shared_scores.defined() && !dshared_logits.defined()) dshared_logits = Tensor::Empty({tokens, s}, dt);
  if (alpha.defined() && !dalpha_logits.defined()) dalpha_logits = Tensor::Empty({tokens, 2}, dt);
  if (routed > 0 && !drouted_gates.defined()) drouted_gates = Tensor::Empty({tokens, k}, dt);
  LOOM_DISPATCH_FLOAT(dt, T, [&] {
    const T* dg = dgates.data<T>();
    std::vector<T> ds(s);
    for (int64_t r = 0; r < tokens; ++r) {
      const T* dgr = dg + r * h;
      const T a1 = alpha.defined() ? alpha.data<T>()[r * 2] : T(1);
      const T a2 = alpha.defined() ? alpha.data<T>()[r * 2 + 1] : T(1);
      T dalpha[2] = {0, 0};
      if (shared_scores.defined()) {
        const T* sc = shared_scores.data<T>() + r * s;
        for (int i = 0; i < s; ++i) {
          dalpha[0] += dgr[i] * sc[i];
          ds[i] = a1 * dgr[i];
        }
        SoftmaxRowBackward(sc, ds.data(), s, dshared_logits.data<T>() + r * s);
      }
      for (int j = 0; routed > 0 && j < k; ++j) {
        const int head = s + experts.data<int32_t>()[r * k + j];
        dalpha[1] += dgr[head] * routed_gates.data<T>()[r * k + j];
        drouted_gates.data<T>()[r * k + j] = a2 * dgr[head];
      }
      if (alpha.defined()) SoftmaxRowBackward(alpha.data<T>() + r * 2, dalpha, 2, dalpha_logits.data<T>() + r * 2);
    }
  });
}

void MohActiveMask(const Tensor& experts, const MohGateOptions& options, int64_t tokens, int64_t block,
                   Tensor& active) {
  LOOM_CHECK(block >= 1, "[moh_gate] mask block must be >= 1, got ", block);
  if (experts.defined() && !experts.device().is_cpu())
    return cuda::MohActiveMask(experts, options, tokens, block, active);
  const int64_t blocks = (tokens + block - 1) / block;
  active = Tensor::Zeros({options.heads, blocks}, DType::kI32);
  int32_t* a = active.data<int32_t>();
  std::fill_n(a, options.shared * blocks, 1);
  const int k = options.top_k;
  for (int64_t r = 0; experts.defined() && r < tokens; ++r)
    for (int j = 0; j < k; ++j) a[(options.shared + experts.data<int32_t>()[r * k + j]) * blocks + r / block] = 1;
}

void ApplyHeadGates(const Tensor& o, const Tensor& gates, Tensor& out) {
  if (!o.device().is_cpu()) return cuda::ApplyHeadGates(o, gates, out);
  const int64_t t = gates.dim(0), h = gates.dim(1), d = o.numel() / (t * h);
  LOOM_CHECK(o.numel() == t * h * d && out.numel() == o.numel() && gates.device().is_cpu(), "[moh_gate] gates ",
             ShapeString(gates.shape()), " do not fit o ", ShapeString(o.shape()));
  LOOM_DISPATCH_FLOAT(o.dtype(), T, [&] {
    const T* src = o.data<T>();
    const T* g = gates.data<T>();
    T* dst = out.data<T>();
    for (int64_t th = 0; th < t * h; ++th)
      for (int64_t i = 0; i < d; ++i) dst[th * d + i] = g[th] * src[th * d + i];
  });
}

void HeadGatesBackward(const Tensor& o, const Tensor& gates, const Tensor& dout, Tensor& d_o, Tensor& dgates) {
  if (!o.device().is_cpu()) return cuda::HeadGatesBackward(o, gates, dout, d_o, dgates);
  const int64_t t = gates.dim(0), h = gates.dim(1), d = o.numel() / (t * h);
  LOOM_CHECK(o.numel() == t * h * d && dout.numel() == o.numel() && d_o.numel() == o.numel() &&
                 dgates.numel() == t * h,
             "[moh_gate] gates ", ShapeString(gates.shape()), " do not fit o ", ShapeString(o.shape()));
  LOOM_DISPATCH_FLOAT(o.dtype(), T, [&] {
    const T* src = o.data<T>();
    const T* g = gates.data<T>();
    const T* dy = dout.data<T>();
    T* dx = d_o.data<T>();
    T* dg = dgates.data<T>();
    for (int64_t th = 0; th < t * h; ++th) {
      T dot = 0;
      for (int64_t i = 0; i < d; ++i) {
        dot += dy[th * d + i] * src[th * d + i];
        dx[th * d + i] = g[th] * dy[th * d + i];
      }
      dg[th] = dot;
    }
  });
}

void ZeroInactiveHeads(const Tensor& active, int64_t block, Tensor& x) {
  if (!x.device().is_cpu()) return cuda::ZeroInactiveHeads(active, block, x);
  const int64_t t = x.dim(0), h = x.dim(1), d = x.numel() / (t * h);
  const int64_t blocks = (t + block - 1) / block;
  LOOM_CHECK(active.device().is_cpu() && active.dtype() == DType::kI32 && active.shape() == (Shape{h, blocks}),
             "[moh_gate] active must be i32 [", h, ", ", blocks, "] beside x ", ShapeString(x.shape()));
  const int32_t* a = active.data<int32_t>();
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] {
    T* p = x.data<T>();
    for (int64_t r = 0; r < t; ++r)
      for (int64_t i = 0; i < h; ++i)
        if (a[i * blocks + r / block] == 0) std::fill_n(p + (r * h + i) * d, d, T(0));
  });
}

}  // namespace loom::ops
