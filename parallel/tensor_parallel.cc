#include "parallel/tensor_parallel.h"

#include <cstring>

#include "ops/add.h"
#include "ops/linear.h"
#include "parallel/mpi_communicator.h"

namespace loom {

void TensorParallel::AllReduce(Tensor& t) const {
  if (size == 1) return;
  const absl::Status status = comm->AllReduce(t);
  if (!status.ok()) ExitAfterCommFailure(status);
}

void TensorParallel::ProjectOutput(const Tensor& h, const Tensor& w, Tensor& y, const Tensor* residual) const {
  LOOM_CHECK(residual == nullptr || !sp(), "[tp] a skip connection under sequence parallelism is added after the "
             "reduce-scatter, not in the projection");
  if (size == 1) {
    ops::LinearForward(h, w, y, residual);
    return;
  }
  ops::LinearForward(h, w, y);
  ReduceOutput(y);
  if (residual != nullptr) ops::AddInPlace(y, *residual);
}

void TensorParallel::AllReduceMax(Tensor& t) const {
  if (size == 1) return;
  const absl::Status status = comm->AllReduce(t, ReduceOp::kMax);
  if (!status.ok()) ExitAfterCommFailure(status);
}

void CheckComm(const absl::Status& status) {
  if (status.ok()) return;
  if (absl::IsDeadlineExceeded(status) || absl::IsInternal(status)) ExitAfterCommFailure(status);
  LOOM_CHECK(false, status.message());
}

Tensor TensorParallel::GatherTokens(const Tensor& local) const {
  Shape shape = local.shape();
  shape[0] *= size;
  Tensor full = Tensor::Empty(shape, local.dtype(), local.device());
  CheckComm(comm->AllGather(local, full));
  return full;
}

Tensor TensorParallel::ScatterTokens(const Tensor& full) const {
  Shape shape = full.shape();
  LOOM_CHECK(shape[0] % size == 0, "[tensor_parallel] ", shape[0], " tokens do not split over ", size, " ranks");
  shape[0] /= size;
  Tensor local = Tensor::Empty(shape, full.dtype(), full.device());
  CheckComm(comm->ReduceScatter(full, local));
  return local;
}

Tensor TensorParallel::LocalTokens(const Tensor& full) const {
  const int64_t t = full.dim(0) / size;
  return full.Slice(rank * t, t);
}

absl::Status CopyLocalSlice(const Param& p, const Tensor& global, Tensor& local) {
  if (global.dtype() != local.dtype())
    return absl::InvalidArgumentError(absl::StrCat(p.name, ": ", DTypeName(global.dtype()), " in the checkpoint, ",
                                                   DTypeName(local.dtype()), " in the model"));
  const Shape& want = p.global_shape;
  const bool same = global.shape() == want;
  // A vocabulary padded for another TP size: only the row count differs.
  const bool padded_rows = global.ndim() == 2 && want.size() == 2 && global.dim(1) == want[1] &&
                           global.dim(0) != want[0] && (p.name == "embed" || p.name == "lm_head");
  if (!same && !padded_rows)
    return absl::InvalidArgumentError(absl::StrCat(p.name, ": ", ShapeString(global.shape()),
                                                   " in the checkpoint, ", ShapeString(want), " in the model"));
  if (!p.sharded() && same) {
    local.CopyFrom(global);
    return absl::OkStatus();
  }
  const int64_t rows = local.dim(0), cols = local.ndim() == 2 ? local.dim(1) : 1, elem = DTypeSize(local.dtype());
  const int64_t g_rows = global.dim(0), g_cols = global.ndim() == 2 ? global.dim(1) : 1;
  const char* src = static_cast<const char*>(global.raw());
  char* dst = static_cast<char*>(local.raw());
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t gi = p.split_dim == 0 ? i + p.split_start : i;
    if (gi >= g_rows) break;  // padding rows this layout has and the checkpoint had not
    const int64_t gc = p.split_dim == 1 ? p.split_start : 0;
    std::memcpy(dst + i * cols * elem, src + (gi * g_cols + gc) * elem, cols * elem);
  }
  return absl::OkStatus();
}

}  // namespace loom
