// Learning-rate schedules (step counts from 0):
//   warmup: lr · (step+1)/warmup for step < warmup, then
//   cosine:   min + (lr−min)·½(1 + cos(π·p)),  p = progress after warmup in [0, 1]
//   linear:   lr − (lr−min)·p
//   wsd:      lr until the last decay_fraction of steps, then linear to min
//   constant: lr
// min = lr · min_lr_ratio.
#pragma once

#include "configs/loom.pb.h"

namespace loom {

double LearningRate(const config::OptimConfig& optim, int64_t step, int64_t total_steps);

}  // namespace loom
