// What a layer needs to know of its tensor-parallel group (Megatron-style
// TP without sequence parallelism): its rank and size, and the all-reduces
// that close a row-parallel product in forward (the "g" operator) and a
// column-parallel one in backward (the "f" operator). Size 1 is the
// single-process model: every call is then a no-op.
#pragma once

#include "model/param.h"
#include "parallel/communicator.h"

namespace loom {

struct TensorParallel {
  Communicator* comm = nullptr;  // null when size == 1
  int rank = 0;
  int size = 1;

  // Sums t over the group in place. A failed collective (a rank gone or
  // hung) ends the process with the communicator's message.
  void AllReduce(Tensor& t) const;
  void AllReduceMax(Tensor& t) const;
};

// A failed collective inside a layer (a rank gone or hung) ends the process
// with the communicator's message; other errors are broken invariants.
void CheckComm(const absl::Status& status);

// The whole [global_shape] tensor from every TP rank's slice `local` of a
// parameter laid out like `p` (collective over the TP group).
absl::StatusOr<Tensor> GatherGlobal(const Param& p, const Tensor& local, const TensorParallel& tp);
// This rank's slice of a global tensor for a parameter laid out like `p`.
// Rows beyond the global tensor's (a vocabulary padded for another TP size)
// keep `local`'s values; `local` is written.
absl::Status CopyLocalSlice(const Param& p, const Tensor& global, Tensor& local);

}  // namespace loom
