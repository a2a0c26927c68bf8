// The MPI backend of Communicator: CPU tensors directly, GPU tensors staged
// through page-locked host memory (so several ranks can share one GPU).
//
// Operations are MPI's non-blocking ones; Wait() polls them (driving MPI's
// progress), yielding the core while it waits. A wait longer than the
// timeout probes every member over a private duplicate of the group: ranks
// that are alive answer from inside their own waits, and the error names the
// world ranks that did not (stopped, hung or dead).
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace loom {

// Initialises MPI on first use (MPI_Init_thread, FUNNELED; finalised at
// exit) and returns the world. Works without mpirun too (a world of one).
absl::StatusOr<std::unique_ptr<Communicator>> MpiWorld(double timeout_s);

// After a communication failure the other ranks may be gone or stuck, so
// MPI_Finalize could hang: log the error, give the other ranks a moment to
// report their own view, and _exit(code) without finalising.
[[noreturn]] void ExitAfterCommFailure(const absl::Status& status, int code = 3);

}  // namespace loom
