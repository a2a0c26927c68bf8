#include "parallel/pipeline_schedule.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace loom {

absl::StatusOr<std::vector<PipelineTask>> PipelineSchedule(int pp, int vpp, int rank, int micro_batches) {
  const int m = micro_batches;
  if (vpp > 1 && m % pp != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "[pipeline] the interleaved schedule (parallel.vpp = ", vpp, ") needs the micro-batches per rank (", m,
        " = global_batch / (dp·micro_batch)) to be a multiple of parallel.pp = ", pp));
  const int total = m * vpp;
  auto task = [&](int k, bool forward) {
    const int group = k / pp;
    const int chunk = vpp == 1 ? 0 : (forward ? group % vpp : vpp - 1 - group % vpp);
    const int micro = vpp == 1 ? k : (k / (pp * vpp)) * pp + k % pp;
    return PipelineTask{forward, micro, chunk};
  };
  const int warmup = std::min(total, vpp == 1 ? pp - rank - 1 : (pp - rank - 1) * 2 + (vpp - 1) * pp);
  std::vector<PipelineTask> tasks;
  int f = 0, b = 0;
  for (; f < warmup; ++f) tasks.push_back(task(f, true));
  for (; f < total; ++f, ++b) {
    tasks.push_back(task(f, true));
    tasks.push_back(task(b, false));
  }
  for (; b < total; ++b) tasks.push_back(task(b, false));
  return tasks;
}

}  // namespace loom
