// Pipeline-parallel schedules as pure functions: the order in which one
// pipeline rank runs the forward and backward passes of its micro-batches.
//
// 1F1B (vpp = 1, PipeDream-Flush): rank r of pp first runs pp − r − 1
// forwards (warm-up), then alternates one forward and one backward, then
// runs the remaining backwards; at most pp − r micro-batches are in flight.
// Interleaved 1F1B (vpp > 1, Megatron-LM): each rank holds vpp model
// chunks; virtual stage s = chunk·pp + rank. Forward task k runs micro-batch
// (k / (pp·vpp))·pp + k mod pp on chunk (k / pp) mod vpp; backward task k
// the same micro-batch on chunk vpp − 1 − (k / pp) mod vpp; the warm-up is
// (pp − r − 1)·2 + (vpp − 1)·pp forwards. Needs micro_batches % pp == 0.
#pragma once

#include <vector>

#include "runtime/status.h"

namespace loom {

struct PipelineTask {
  bool forward;
  int micro;  // micro-batch index
  int chunk;  // model chunk of this rank (0 when vpp = 1)
  bool operator==(const PipelineTask&) const = default;
};

absl::StatusOr<std::vector<PipelineTask>> PipelineSchedule(int pp, int vpp, int rank, int micro_batches);

}  // namespace loom
