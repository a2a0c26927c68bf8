// The world communicator of a run, chosen by parallel.backend, and the GPU
// each rank uses.
//
// Launchers: `mpirun -np N` and SLURM `srun` (with `--mpi=pmix` or `pmi2`:
// the MPI library joins the tasks through PMI, nothing here depends on it)
// both give MPI_COMM_WORLD its N ranks; the local rank (a rank's index among
// the ranks of its node) comes from the launcher's environment or from MPI.
//
//   auto  NCCL when Loom is built with CUDA, the run keeps its tensors on
//         the GPU, and every rank has a GPU of its own (no two ranks of a
//         node select the same device); else MPI.
//   mpi   MPI: CPU tensors, GPU tensors staged through pinned host memory.
//   nccl  NCCL, or an error (InvalidArgument, the same on every rank) that
//         says why it cannot be: no CUDA, CPU tensors, no GPU, or ranks
//         that share a GPU.
#pragma once

#include <memory>

#include "configs/loom.pb.h"
#include "parallel/communicator.h"

namespace loom {

// This rank's index among the ranks of its node: OMPI_COMM_WORLD_LOCAL_RANK
// (Open MPI's mpirun), MPI_LOCALRANKID (MPICH's hydra), SLURM_LOCALID (srun),
// else, once MPI is initialised, the rank in MPI_Comm_split_type(SHARED);
// else 0.
int LocalRank();
// The number of ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS, or
// MPI's shared-memory split); 1 for one process.
int LocalSize();

// Makes CUDA device LocalRank() % (visible GPUs) current and returns it;
// -1 when no GPU is visible (or built without CUDA). The first call decides;
// later calls return the same device (and make it current again).
int SelectLocalGpu();

// Initialises MPI and builds the world communicator for parallel.backend
// with parallel.timeout_s; `gpu_tensors`: the run keeps its tensors on the
// GPU. Collective over every rank. With NCCL it selects the GPU first
// (SelectLocalGpu). Refuses a world of one when srun started several tasks
// (srun without PMI: every task would train alone).
absl::StatusOr<std::unique_ptr<Communicator>> MakeWorld(const config::ParallelConfig& parallel, bool gpu_tensors);

}  // namespace loom
