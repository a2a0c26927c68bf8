// The NCCL backend of Communicator: GPU tensors, one rank per GPU.
//
// A NCCL communicator is built over a host communicator of the same group
// (an MpiCommunicator): rank 0 of the group creates the ncclUniqueId and
// broadcasts it over the host communicator, and every member joins with
// ncclCommInitRank on its current CUDA device. The host communicator stays
// inside and carries the operations on CPU tensors (a loss sum, a flag), so
// one communicator serves a run that mixes both; they count here all the same.
//
// Streams: every operation is enqueued on the communicator's own
// (non-blocking) CUDA stream after the legacy default stream's work so far
// (an event recorded there, waited on by the NCCL stream), so inputs written
// by Loom's kernels (default stream) are complete. Completion is a CUDA event
// recorded after the operation; CommHandle::Wait() polls it, so the host
// sees finished outputs after Wait(), and so does any later kernel.
//
// Point to point: NCCL has no tags and fuses sends and receives only inside
// one ncclGroupStart/End. StartSend/StartRecv therefore queue; the queue is
// launched as one group when any handle is waited on or tested, or before
// the next collective. Messages between two ranks are matched in the order
// they were started (the tag is not used): start them in the same order on
// both sides, as the ring and chain schemes of parallel/ do.
//
// Timeouts: a wait longer than the timeout (or an asynchronous NCCL error
// found while waiting) aborts the NCCL communicator (ncclCommAbort) and
// fails with DeadlineExceeded naming the group's world ranks; every later
// operation on it fails at once. Split groups get their own NCCL
// communicator (ncclCommSplit) and their own host communicator.
//
// In a build without CUDA, MakeNcclCommunicator returns an error saying so.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace loom {

// True in a CUDA build (NCCL linked).
bool BuiltWithNccl();

// The NCCL communicator of `host`'s group on the calling thread's current
// CUDA device (cudaSetDevice it first: SelectLocalGpu() does). Collective
// over `host`; `host` must be an MPI communicator (it carries CPU tensors).
absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(std::unique_ptr<Communicator> host,
                                                                   double timeout_s);

}  // namespace loom
