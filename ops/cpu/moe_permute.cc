// CPU MoE permutation (math in ops/moe_permute.h): one pass over the
// assignments in id order places each kept one at its expert's next row.
#include "ops/moe_permute.h"

#include <numeric>

namespace loom::ops {

int64_t MoePermutation::size() const { return std::accumulate(counts.begin(), counts.end(), int64_t{0}); }

namespace {

void CheckRows(const Tensor& rows, const Tensor& tokens, const char* name) {
  LOOM_CHECK(rows.ndim() == 2 && rows.dtype() == DType::kI32 && rows.dim(0) == tokens.dim(0), "[moe_permute] ",
             name, " must be [T, k] i32 with T = ", tokens.dim(0), ", got ", ShapeString(rows.shape()), " ",
             DTypeName(rows.dtype()));
}

template <typename T>
void Gather(const Tensor& x, const Tensor& rows, Tensor& xe) {
  const int64_t n = x.dim(0), c = x.dim(1), k = rows.dim(1);
  const int32_t* row = rows.data<int32_t>();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < k; ++j)
      if (const int32_t r = row[t * k + j]; r >= 0) std::copy_n(x.data<T>() + t * c, c, xe.data<T>() + r * c);
}

template <typename T>
void Combine(const Tensor& ye, const Tensor& rows, const Tensor* add, Tensor& y, const Tensor* a, const Tensor* w) {
  const int64_t n = y.dim(0), c = y.dim(1), k = rows.dim(1), width = a != nullptr ? a->dim(1) : 0;
  const int32_t* row = rows.data<int32_t>();
  for (int64_t t = 0; t < n; ++t) {
    T* out = y.data<T>() + t * c;
    std::fill_n(out, c, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[t * k + j];
      if (r < 0) continue;
      const T* src = ye.data<T>() + r * c;
      for (int64_t i = 0; i < c; ++i) out[i] += src[i];
    }
    if (add != nullptr)
      for (int64_t i = 0; i < c; ++i) out[i] += add->data<T>()[t * c + i];
    if (a != nullptr)
      for (int64_t i = 0; i < c; ++i) {
        T thin = 0;
        for (int64_t e = 0; e < width; ++e) thin += a->data<T>()[t * width + e] * w->data<T>()[e * c + i];
        out[i] += thin;
      }
  }
}

}  // namespace

void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out) {
  if (!experts.device().is_cpu()) return cuda::MoePermuteIndex(experts, kept, out);
  LOOM_CHECK(experts.ndim() == 2 && experts.dtype() == DType::kI32, "[moe_permute] experts must be [T, k] i32, got ",
             ShapeString(experts.shape()), " ", DTypeName(experts.dtype()));
  const int64_t e_count = static_cast<int64_t>(kept.size()), assignments = experts.numel();
  std::vector<int64_t> start(e_count + 1, 0);
  for (int64_t e = 0; e < e_count; ++e) start[e + 1] = start[e] + kept[e];
  out.counts = kept;
  out.rows = Tensor::Empty(experts.shape(), DType::kI32);
  std::vector<int64_t> seen(e_count, 0);
  const int32_t* chosen = experts.data<int32_t>();
  for (int64_t a = 0; a < assignments; ++a) {
    const int32_t e = chosen[a];
    LOOM_CHECK(e >= 0 && e < e_count, "[moe_permute] assignment ", a, " routed to expert ", e, " of ", e_count);
    const int64_t pos = seen[e]++;
    const int32_t r = pos < kept[e] ? static_cast<int32_t>(start[e] + pos) : -1;
    out.rows.data<int32_t>()[a] = r;
  }
  for (int64_t e = 0; e < e_count; ++e)
    LOOM_CHECK(seen[e] >= kept[e], "[moe_permute] expert ", e, " keeps ", kept[e], " rows of its ", seen[e],
               " assignments");
}

void MoeGather(const Tensor& x, const Tensor& rows, Tensor& xe) {
  if (!x.device().is_cpu()) return cuda::MoeGather(x, rows, xe);
  CheckRows(rows, x, "rows");
  LOOM_CHECK(x.ndim() == 2 && xe.ndim() == 2 && xe.dim(1) == x.dim(1) && xe.dtype() == x.dtype(),
             "[moe_permute] gather of x ", ShapeString(x.shape()), " into xe ", ShapeString(xe.shape()));
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { Gather<T>(x, rows, xe); });
}

void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* add, Tensor& y, const Tensor* a,
                const Tensor* w) {
  if (!y.device().is_cpu()) return cuda::MoeCombine(ye, rows, add, y, a, w);
  CheckRows(rows, y, "rows");
  LOOM_CHECK(y.ndim() == 2 && ye.ndim() == 2 && ye.dim(1) == y.dim(1) && ye.dtype() == y.dtype() &&
                 (add == nullptr || (add->shape() == y.shape() && add->dtype() == y.dtype())),
             "[moe_permute] combine of ye ", ShapeString(ye.shape()), " into y ", ShapeString(y.shape()));
  LOOM_CHECK((a == nullptr) == (w == nullptr), "[moe_permute] combine: a and w go together");
  if (a != nullptr)
    LOOM_CHECK(a->ndim() == 2 && w->ndim() == 2 && a->dim(0) == y.dim(0) && w->dim(0) == a->dim(1) &&
                   w->dim(1) == y.dim(1) && a->dtype() == y.dtype() && w->dtype() == y.dtype() &&
                   a->device().is_cpu() && w->device().is_cpu(),
               "[moe_permute] combine: a ", ShapeString(a->shape()), " · w ", ShapeString(w->shape()),
               " must be [", y.dim(0), ", n] · [n, ", y.dim(1), "] ", DTypeName(y.dtype()));
  LOOM_DISPATCH_FLOAT(y.dtype(), T, [&] { Combine<T>(ye, rows, add, y, a, w); });
}

}  // namespace loom::ops
