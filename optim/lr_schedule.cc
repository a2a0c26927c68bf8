#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace loom {

double LearningRate(const config::OptimConfig& o, int64_t step, int64_t total_steps) {
  const double lr = o.lr(), min_lr = o.lr() * o.min_lr_ratio();
  const int64_t warmup = o.warmup_steps();
  if (step < warmup) return lr * static_cast<double>(step + 1) / warmup;
  if (o.schedule() == "constant") return lr;
  const double span = std::max<int64_t>(1, total_steps - warmup - 1);
  const double p = std::clamp(static_cast<double>(step - warmup) / span, 0.0, 1.0);
  if (o.schedule() == "cosine") return min_lr + (lr - min_lr) * 0.5 * (1 + std::cos(M_PI * p));
  if (o.schedule() == "linear") return lr - (lr - min_lr) * p;
  // wsd: stable, then linear decay over the last decay_fraction of all steps.
  const double decay_steps = std::max(1.0, double(o.decay_fraction()) * total_steps);
  const double decay_start = total_steps - decay_steps;
  if (step < decay_start) return lr;
  const double q = std::clamp((step - decay_start + 1) / decay_steps, 0.0, 1.0);
  return lr - (lr - min_lr) * q;
}

}  // namespace loom
