#include "parallel/tensor_parallel.h"

#include "parallel/mpi_communicator.h"

namespace loom {

void TensorParallel::AllReduce(Tensor& t) const {
  if (size == 1) return;
  const absl::Status status = comm->AllReduce(t);
  if (!status.ok()) ExitAfterCommFailure(status);
}

void TensorParallel::AllReduceMax(Tensor& t) const {
  if (size == 1) return;
  const absl::Status status = comm->AllReduce(t, ReduceOp::kMax);
  if (!status.ok()) ExitAfterCommFailure(status);
}

}  // namespace loom
