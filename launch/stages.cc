#include "launch/stages.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "parallel/topology.h"
#include "runtime/config.h"
#include "runtime/log.h"

namespace loom {

namespace {

absl::Status StageError(int i, const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("train.stages[", i, "]", field.empty() ? "" : ".", field, ": ", why));
}

}  // namespace

absl::StatusOr<std::vector<TrainStagePlan>> ResolveStages(const config::Config& config, int world) {
  const auto& t = config.train();
  if (t.stages_size() == 0) {
    TrainStagePlan only;
    only.config = config;
    return std::vector<TrainStagePlan>{only};
  }
  // Tokens per optimizer step: train.global_batch sequences of the first stage.
  const int64_t first_len = t.stages(0).seq_len();
  if (first_len < 2) return StageError(0, "seq_len", absl::StrCat(first_len, " is below 2"));
  const int64_t tokens_per_step = int64_t{t.global_batch()} * first_len;
  std::vector<TrainStagePlan> plans;
  int64_t step = 0, token = 0;
  for (int i = 0; i < t.stages_size(); ++i) {
    const config::TrainStage& s = t.stages(i);
    if (s.seq_len() < 2) return StageError(i, "seq_len", absl::StrCat(s.seq_len(), " is below 2"));
    if (tokens_per_step % s.seq_len() != 0)
      return StageError(i, "seq_len",
                        absl::StrCat(s.seq_len(), " does not divide the ", tokens_per_step,
                                     " tokens per step (train.global_batch ", t.global_batch(),
                                     " x the first stage's seq_len ", first_len, ")"));
    if (s.steps() < 1) return StageError(i, "steps", absl::StrCat(s.steps(), " is below 1"));
    if (s.cp() < 1) return StageError(i, "cp", absl::StrCat(s.cp(), " is below 1"));
    if (!(s.lr_scale() > 0 && s.lr_scale() <= 100))
      return StageError(i, "lr_scale", absl::StrCat(s.lr_scale(), " is outside (0, 100]"));
    if (!(s.lr() >= 0 && s.lr() <= 10)) return StageError(i, "lr", absl::StrCat(s.lr(), " is outside [0, 10]"));
    if (s.micro_batch() < 0) return StageError(i, "micro_batch", absl::StrCat(s.micro_batch(), " is negative"));
    if (s.warmup_steps() < -1 || s.warmup_steps() > s.steps())
      return StageError(i, "warmup_steps", absl::StrCat(s.warmup_steps(), " is outside [-1, steps = ", s.steps(), "]"));
    const int m = config.parallel().tp() * s.cp() * config.parallel().pp();
    if (world % m != 0)
      return StageError(i, "cp", absl::StrCat("tp·cp·pp = ", m, " does not divide the world of ", world, " ranks"));
    const int dp = world / m;
    const int64_t global = tokens_per_step / s.seq_len();
    if (global % dp != 0)
      return StageError(i, "seq_len", absl::StrCat("the stage's ", global, " sequences per step do not split over dp = ",
                                                   dp, " ranks (world ", world, " / tp·cp·pp ", m, ")"));
    const int64_t per_rank = global / dp;
    const int64_t micro = s.micro_batch() > 0 ? s.micro_batch() : std::min<int64_t>(t.micro_batch(), per_rank);
    if (per_rank % micro != 0)
      return StageError(i, "micro_batch", absl::StrCat(micro, " does not divide the stage's ", per_rank,
                                                       " sequences per data-parallel rank"));

    TrainStagePlan p;
    p.index = i;
    p.count = t.stages_size();
    p.first_step = step;
    p.first_token = token;
    p.config = config;
    config::TrainConfig& pt = *p.config.mutable_train();
    pt.set_seq_len(s.seq_len());
    pt.set_steps(static_cast<int32_t>(step + s.steps()));
    pt.set_global_batch(static_cast<int32_t>(global));
    pt.set_micro_batch(static_cast<int32_t>(micro));
    p.config.mutable_parallel()->set_cp(s.cp());
    config::OptimConfig& o = *p.config.mutable_optim();
    o.set_lr(s.lr() > 0 ? s.lr() : config.optim().lr() * s.lr_scale());
    o.set_warmup_steps(s.warmup_steps() >= 0 ? s.warmup_steps() : std::min(config.optim().warmup_steps(), s.steps()));
    if (absl::Status v = ValidateConfig(p.config); !v.ok()) return StageError(i, "", std::string(v.message()));
    if (absl::Status v = MakeLayout(world, p.config).status(); !v.ok())
      return StageError(i, "", std::string(v.message()));
    plans.push_back(p);
    step += s.steps();
    token += s.steps() * tokens_per_step;
  }
  return plans;
}

std::string CheckpointDirOf(const config::Config& config) {
  return config.checkpoint().dir().empty() ? config.train().run_dir() + "/checkpoints" : config.checkpoint().dir();
}

absl::StatusOr<ResumePoint> FindResumePoint(const config::Config& config) {
  const std::string& how = config.checkpoint().resume();
  if (how == "none") return ResumePoint{};
  std::string step_dir;
  if (how == "auto") {
    // Verifies the checkpoint (reads it whole; loom-train asks on rank 0).
    // Checkpoints that all fail stop the run rather than start it afresh
    // (and prune them at its first save).
    std::vector<std::string> skipped;
    absl::StatusOr<std::string> found = checkpoint::FindLatestGoodCheckpoint(CheckpointDirOf(config), &skipped);
    for (const std::string& s : skipped) LogWarning("refusing checkpoint ", s);
    if (absl::IsNotFound(found.status())) return ResumePoint{};
    if (!found.ok())
      return absl::Status(found.status().code(),
                          absl::StrCat(found.status().message(), " (the warnings above say why); set "
                                                                 "checkpoint.resume=none to start afresh"));
    step_dir = *found;
  } else {
    LOOM_ASSIGN_OR_RETURN(step_dir, checkpoint::ResolveStepDir(how));
  }
  LOOM_ASSIGN_OR_RETURN(const checkpoint::Manifest manifest, checkpoint::ReadManifest(step_dir));
  return ResumePoint{manifest.step(), step_dir};
}

}  // namespace loom
