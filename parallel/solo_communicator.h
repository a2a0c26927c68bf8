// A world of one process that never touches MPI: what loom-train uses when
// it was not started by mpirun or srun (no MPI_Init, no orted, nothing that
// can fail in a restricted environment). Every collective is its
// single-rank identity (a copy where input and output differ); send/recv
// have no peer and are errors. Counters count as in the other backends.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace loom {

std::unique_ptr<Communicator> SoloWorld();

// Whether a parallel launcher started this process (mpirun, srun, or any
// PMI-based launcher): then MPI is initialised, even for one rank.
bool LaunchedByParallelLauncher();
// This process's rank as the launcher's environment gives it before MPI
// starts (OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK, SLURM_PROCID); -1 when
// none is set.
int LauncherRank();

}  // namespace loom
