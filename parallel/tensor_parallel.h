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
  // Sequence parallelism (Megatron-LM's): between the TP regions the
  // residual stream and the norms hold only this rank's 1/size of the
  // tokens. A TP region starts with an all-gather of its input over the
  // tokens (GatherTokens) and ends with a reduce-scatter (ScatterTokens)
  // instead of the all-reduce; backward mirrors them.
  bool sequence_parallel = false;
  bool sp() const { return sequence_parallel && size > 1; }

  // The end of a row-parallel product (y or a region's dx): summed over the
  // group, unless sequence parallelism leaves that to ScatterTokens.
  void ReduceOutput(Tensor& t) const {
    if (!sp()) AllReduce(t);
  }
  // y = h · Wᵀ (a row-parallel projection) closed by ReduceOutput, plus
  // `residual` when given (a block's skip connection, not under sequence
  // parallelism): added in the GEMM's epilogue without tp, after the
  // all-reduce with it.
  void ProjectOutput(const Tensor& h, const Tensor& w, Tensor& y, const Tensor* residual) const;
  // [t, ...] of every rank, in rank order -> [size·t, ...].
  Tensor GatherTokens(const Tensor& local) const;
  // [size·t, ...] partial sums -> this rank's [t, ...] rows of their sum.
  Tensor ScatterTokens(const Tensor& full) const;
  // This rank's [t, ...] rows of a [size·t, ...] tensor (no communication).
  Tensor LocalTokens(const Tensor& full) const;

  // Sums t over the group in place. A failed collective (a rank gone or
  // hung) ends the process with the communicator's message.
  void AllReduce(Tensor& t) const;
  void AllReduceMax(Tensor& t) const;
};

// A failed collective inside a layer (a rank gone or hung) ends the process
// with the communicator's message; other errors are broken invariants.
void CheckComm(const absl::Status& status);

// This rank's slice of a global tensor for a parameter laid out like `p`.
// Rows beyond the global tensor's (a vocabulary padded for another TP size)
// keep `local`'s values; `local` is written.
absl::Status CopyLocalSlice(const Param& p, const Tensor& global, Tensor& local);

}  // namespace loom
