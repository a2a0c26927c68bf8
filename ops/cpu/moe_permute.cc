// CPU MoE permutation (math in ops/moe_permute.h): one pass over the
// assignments in id order places each kept one at its expert's next row.
#include "ops/moe_permute.h"

#include <numeric>

namespace loom::ops {
namespace {

void CheckRows(const Tensor& rows, const Tensor& tokens, const char* name) {
  LOOM_CHECK(rows.ndim() == 2 && rows.dtype() == DType::kI32 && rows.dim(0) == tokens.dim(0), "[moe_permute] ",
             name, " must be [T, k] i32 with T = ", tokens.dim(0), ", got ", ShapeString(rows.shape()), " ",
             DTypeName(rows.dtype()));
}

template <typename T>
void Gather(const Tensor& x, const Tensor& ids, int k, Tensor& xe) {
  const int64_t c = x.dim(1);
  const int32_t* id = ids.data<int32_t>();
  for (int64_t r = 0; r < ids.numel(); ++r)
    std::copy_n(x.data<T>() + id[r] / k * c, c, xe.data<T>() + r * c);
}

template <typename T>
void Combine(const Tensor& ye, const Tensor& rows, const Tensor* gates, const Tensor* add, Tensor& y) {
  const int64_t n = y.dim(0), c = y.dim(1), k = rows.dim(1);
  const int32_t* row = rows.data<int32_t>();
  for (int64_t t = 0; t < n; ++t) {
    T* out = y.data<T>() + t * c;
    std::fill_n(out, c, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[t * k + j];
      if (r < 0) continue;
      const T g = gates != nullptr ? gates->data<T>()[t * k + j] : T(1);
      const T* src = ye.data<T>() + r * c;
      for (int64_t i = 0; i < c; ++i) out[i] += g * src[i];
    }
    if (add != nullptr)
      for (int64_t i = 0; i < c; ++i) out[i] += add->data<T>()[t * c + i];
  }
}

template <typename T>
void CombineBackward(const Tensor& dy, const Tensor& ye, const Tensor& rows, const Tensor& gates, Tensor& dye,
                     Tensor& dgates) {
  const int64_t n = dy.dim(0), c = dy.dim(1), k = rows.dim(1);
  const int32_t* row = rows.data<int32_t>();
  for (int64_t a = 0; a < n * k; ++a) {
    const int32_t r = row[a];
    if (r < 0) {
      dgates.data<T>()[a] = 0;
      continue;
    }
    const T g = gates.data<T>()[a];
    const T* d = dy.data<T>() + a / k * c;
    const T* o = ye.data<T>() + r * c;
    T* out = dye.data<T>() + r * c;
    T dot = 0;
    for (int64_t i = 0; i < c; ++i) {
      out[i] = g * d[i];
      dot += d[i] * o[i];
    }
    dgates.data<T>()[a] = dot;
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
  out.ids = Tensor::Empty({start[e_count]}, DType::kI32);
  std::vector<int64_t> seen(e_count, 0);
  const int32_t* chosen = experts.data<int32_t>();
  for (int64_t a = 0; a < assignments; ++a) {
    const int32_t e = chosen[a];
    LOOM_CHECK(e >= 0 && e < e_count, "[moe_permute] assignment ", a, " routed to expert ", e, " of ", e_count);
    const int64_t pos = seen[e]++;
    const int32_t r = pos < kept[e] ? static_cast<int32_t>(start[e] + pos) : -1;
    out.rows.data<int32_t>()[a] = r;
    if (r >= 0) out.ids.data<int32_t>()[r] = static_cast<int32_t>(a);
  }
  for (int64_t e = 0; e < e_count; ++e)
    LOOM_CHECK(seen[e] >= kept[e], "[moe_permute] expert ", e, " keeps ", kept[e], " rows of its ", seen[e],
               " assignments");
}

void MoeGather(const Tensor& x, const Tensor& ids, int k, Tensor& xe) {
  if (!x.device().is_cpu()) return cuda::MoeGather(x, ids, k, xe);
  LOOM_CHECK(x.ndim() == 2 && ids.dtype() == DType::kI32 && xe.ndim() == 2 && xe.dim(0) == ids.numel() &&
                 xe.dim(1) == x.dim(1) && xe.dtype() == x.dtype(),
             "[moe_permute] gather of x ", ShapeString(x.shape()), " by ", ids.numel(), " ids into xe ",
             ShapeString(xe.shape()));
  LOOM_DISPATCH_FLOAT(x.dtype(), T, [&] { Gather<T>(x, ids, k, xe); });
}

void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* gates, const Tensor* add, Tensor& y) {
  if (!y.device().is_cpu()) return cuda::MoeCombine(ye, rows, gates, add, y);
  CheckRows(rows, y, "rows");
  LOOM_CHECK(y.ndim() == 2 && ye.ndim() == 2 && ye.dim(1) == y.dim(1) && ye.dtype() == y.dtype() &&
                 (gates == nullptr || (gates->numel() == rows.numel() && gates->dtype() == y.dtype())) &&
                 (add == nullptr || (add->shape() == y.shape() && add->dtype() == y.dtype())),
             "[moe_permute] combine of ye ", ShapeString(ye.shape()), " into y ", ShapeString(y.shape()));
  LOOM_DISPATCH_FLOAT(y.dtype(), T, [&] { Combine<T>(ye, rows, gates, add, y); });
}

void MoeCombineBackward(const Tensor& dy, const Tensor& ye, const Tensor& rows, const Tensor& gates, Tensor& dye,
                        Tensor& dgates) {
  if (!dy.device().is_cpu()) return cuda::MoeCombineBackward(dy, ye, rows, gates, dye, dgates);
  CheckRows(rows, dy, "rows");
  LOOM_CHECK(dy.ndim() == 2 && ye.ndim() == 2 && dye.shape() == ye.shape() && ye.dim(1) == dy.dim(1) &&
                 gates.numel() == rows.numel() && dgates.numel() == rows.numel() && ye.dtype() == dy.dtype() &&
                 dye.dtype() == dy.dtype() && gates.dtype() == dy.dtype() && dgates.dtype() == dy.dtype(),
             "[moe_permute] combine backward: dy ", ShapeString(dy.shape()), ", ye ", ShapeString(ye.shape()),
             ", dye ", ShapeString(dye.shape()));
  LOOM_DISPATCH_FLOAT(dy.dtype(), T, [&] { CombineBackward<T>(dy, ye, rows, gates, dye, dgates); });
}

}  // namespace loom::ops
