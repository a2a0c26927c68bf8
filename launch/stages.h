// Progressive-length training (configs/loom.proto TrainConfig.stages): a run
// raises its sequence length in stages, e.g. 1K at cp=1, then 4K at cp=4, on
// a fixed world. Each stage is trained as a run of its own resolved config
// (loom-train builds the layout, process groups and model per stage and
// hands the weights and AdamW moments over through the stage-boundary
// checkpoint, so a restart at the boundary equals passing it).
//
// Worked example: world 4, tp = pp = 1, train.global_batch 8, stages
// {seq_len 1024 cp 1 steps 20} {seq_len 4096 cp 4 steps 20}:
//   tokens per step = 8 · 1024 = 8192 (fixed: a step is the same amount of
//   data in every stage, so the LR means the same)
//   stage 0: global batch 8 sequences, dp = 4/1 = 4, steps 1..20,
//            data tokens [0, 163840)
//   stage 1: global batch 2 sequences, dp = 4/4 = 1, steps 21..40,
//            data tokens [163840, 327680): sequence 40 of the 4K stream,
//            where the 1K stream's sequence 160 ended.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "configs/loom.pb.h"
#include "runtime/status.h"

namespace loom {

struct TrainStagePlan {
  int index = 0;  // 0-based
  int count = 1;  // stages in the run
  // The stage's run: train.seq_len, train.global_batch (sequences),
  // train.micro_batch, parallel.cp, optim.lr and optim.warmup_steps are the
  // stage's; train.steps is the step the stage ends at, counted across stages.
  config::Config config;
  int64_t first_step = 0;   // steps completed before the stage
  int64_t first_token = 0;  // data position at the stage's start, tokens

  int64_t end_step() const { return config.train().steps(); }
  int64_t steps() const { return end_step() - first_step; }
  int64_t tokens_per_step() const {
    return int64_t{config.train().global_batch()} * config.train().seq_len();
  }
  // First sequence of the stage's data stream (first_token is a multiple of seq_len).
  int64_t first_sample() const { return first_token / config.train().seq_len(); }
  // Data position after `step` (a step of this stage, or its first_step).
  int64_t data_tokens_at(int64_t step) const { return first_token + (step - first_step) * tokens_per_step(); }
  bool last() const { return index + 1 == count; }
};

// The stages of `config` for a world of `world` ranks: config.train().stages,
// or one stage equal to `config` itself when it lists none. Each stage's
// config is validated (ValidateConfig, MakeLayout); errors name the stage:
// "train.stages[1].seq_len: 3000 does not divide the 8192 tokens per step".
absl::StatusOr<std::vector<TrainStagePlan>> ResolveStages(const config::Config& config, int world);

// The step a run of `config` resumes from (0 for a fresh run) and the step
// directory it resumes from ("" for a fresh run), resolved as loom-train's
// checkpoint.resume does ("auto": the newest checkpoint that verifies; each
// one refused is logged as a warning, and when all are, it is an error).
struct ResumePoint {
  int64_t step = 0;
  std::string step_dir;
};
absl::StatusOr<ResumePoint> FindResumePoint(const config::Config& config);

// checkpoint.dir, or <train.run_dir>/checkpoints when empty.
std::string CheckpointDirOf(const config::Config& config);

}  // namespace loom
