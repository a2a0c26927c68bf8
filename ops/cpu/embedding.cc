// CPU token embedding: a row gather forward, a row scatter-add backward.
#include "ops/embedding.h"

#include <omp.h>

#include <algorithm>

namespace loom::ops {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

// ids [N] i32 in [0, V); returns N. `rows_of` is the [V, D] tensor the ids index.
int64_t CheckIds(const Tensor& ids, const Tensor& rows_of, const char* rows_name) {
  LOOM_CHECK(ids.device().is_cpu() && rows_of.device().is_cpu(), "[embedding] CPU tensors only");
  LOOM_CHECK(ids.dtype() == DType::kI32, "[embedding] ids must be i32, got ", DTypeName(ids.dtype()));
  LOOM_CHECK(rows_of.ndim() == 2, "[embedding] ", rows_name, " must be [V, D], got ",
             ShapeString(rows_of.shape()));
  const int32_t* id = ids.data<int32_t>();
  const int64_t n = ids.numel(), vocab = rows_of.dim(0);
  for (int64_t i = 0; i < n; ++i) {
    LOOM_CHECK(id[i] >= 0 && id[i] < vocab, "[embedding] id ", id[i], " at position ", i,
               " is outside the table's [0, ", vocab, ")");
  }
  return n;
}

template <typename T>
void GatherSlice(const int32_t* id, int64_t n, int64_t d, const T* table, int64_t first, int64_t rows, T* out) {
#pragma omp parallel for if (n * d >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = id[i] - first;
    if (r >= 0 && r < rows) {
      std::copy(table + r * d, table + (r + 1) * d, out + i * d);
    } else {
      std::fill(out + i * d, out + (i + 1) * d, T(0));
    }
  }
}

template <typename T>
void ScatterAddSlice(const int32_t* id, int64_t n, int64_t d, const T* dout, int64_t first, int64_t rows, T* dtable) {
#pragma omp parallel if (n * d >= kParallelMinElements)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t j0 = d * t / threads, j1 = d * (t + 1) / threads;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = id[i] - first;
      if (r < 0 || r >= rows) continue;
      for (int64_t j = j0; j < j1; ++j) dtable[r * d + j] += dout[i * d + j];
    }
  }
}

template <typename T>
void Gather(const int32_t* id, int64_t n, int64_t d, const T* table, T* out) {
#pragma omp parallel for if (n * d >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) std::copy(table + id[i] * d, table + (id[i] + 1) * d, out + i * d);
}

template <typename T>
void ScatterAdd(const int32_t* id, int64_t n, int64_t d, const T* dout, T* dtable) {
  // Repeated ids add into the same row, so threads split the columns, not
  // the tokens: each owns a column range of every row.
#pragma omp parallel if (n * d >= kParallelMinElements)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t j0 = d * t / threads, j1 = d * (t + 1) / threads;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = j0; j < j1; ++j) dtable[id[i] * d + j] += dout[i * d + j];
    }
  }
}

}  // namespace

void EmbeddingForward(const Tensor& ids, const Tensor& table, Tensor& out) {
  if (!ids.device().is_cpu()) return cuda::EmbeddingForward(ids, table, out);
  const int64_t n = CheckIds(ids, table, "table");
  const int64_t d = table.dim(1);
  LOOM_CHECK(out.device().is_cpu() && out.dtype() == table.dtype() && out.numel() == n * d, "[embedding] out ",
             ShapeString(out.shape()), " ", DTypeName(out.dtype()), " must hold [", n, ", ", d, "] ",
             DTypeName(table.dtype()));
  LOOM_DISPATCH_FLOAT(table.dtype(), T, [&] { Gather(ids.data<int32_t>(), n, d, table.data<T>(), out.data<T>()); });
}

void EmbeddingBackward(const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  if (!ids.device().is_cpu()) return cuda::EmbeddingBackward(ids, dout, dtable);
  const int64_t n = CheckIds(ids, dtable, "dtable");
  const int64_t d = dtable.dim(1);
  LOOM_CHECK(dout.device().is_cpu() && dout.dtype() == dtable.dtype() && dout.numel() == n * d,
             "[embedding] dout ", ShapeString(dout.shape()), " ", DTypeName(dout.dtype()), " must hold [", n, ", ",
             d, "] ", DTypeName(dtable.dtype()));
  LOOM_DISPATCH_FLOAT(dtable.dtype(), T,
                      [&] { ScatterAdd(ids.data<int32_t>(), n, d, dout.data<T>(), dtable.data<T>()); });
}

void EmbeddingForwardSlice(const Tensor& ids, const Tensor& table, int64_t first_row, Tensor& out) {
  if (!ids.device().is_cpu()) return cuda::EmbeddingForwardSlice(ids, table, first_row, out);
  LOOM_CHECK(ids.device().is_cpu() && ids.dtype() == DType::kI32 && table.ndim() == 2, "[embedding] slice: CPU i32 ids and a [V, D] table");
  const int64_t n = ids.numel(), d = table.dim(1);
  LOOM_CHECK(out.device().is_cpu() && out.dtype() == table.dtype() && out.numel() == n * d, "[embedding] out ",
             ShapeString(out.shape()), " must hold [", n, ", ", d, "]");
  LOOM_DISPATCH_FLOAT(table.dtype(), T, [&] {
    GatherSlice(ids.data<int32_t>(), n, d, table.data<T>(), first_row, table.dim(0), out.data<T>());
  });
}

void EmbeddingBackwardSlice(const Tensor& ids, const Tensor& dout, int64_t first_row, Tensor& dtable) {
  if (!ids.device().is_cpu()) return cuda::EmbeddingBackwardSlice(ids, dout, first_row, dtable);
  LOOM_CHECK(ids.device().is_cpu() && ids.dtype() == DType::kI32 && dtable.ndim() == 2, "[embedding] slice: CPU i32 ids and a [V, D] table");
  const int64_t n = ids.numel(), d = dtable.dim(1);
  LOOM_CHECK(dout.dtype() == dtable.dtype() && dout.numel() == n * d, "[embedding] dout ", ShapeString(dout.shape()),
             " must hold [", n, ", ", d, "]");
  LOOM_DISPATCH_FLOAT(dtable.dtype(), T, [&] {
    ScatterAddSlice(ids.data<int32_t>(), n, d, dout.data<T>(), first_row, dtable.dim(0), dtable.data<T>());
  });
}

}  // namespace loom::ops
