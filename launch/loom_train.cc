// loom-train --config FILE [--set a.b=v ...]: trains a model on one process.
// Prints one line per log step and appends every step to
// <train.run_dir>/metrics.jsonl; Ctrl-C stops after the current step.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "data/associative_recall.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "runtime/config.h"
#include "runtime/log.h"
#include "runtime/metrics.h"
#include "runtime/timer.h"

namespace loom {
namespace {

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

std::string HumanCount(double n) {
  if (n >= 1e9) return absl::StrFormat("%.2fB", n / 1e9);
  if (n >= 1e6) return absl::StrFormat("%.2fM", n / 1e6);
  if (n >= 1e3) return absl::StrFormat("%.1fk", n / 1e3);
  return absl::StrFormat("%.0f", n);
}

struct EvalResult {
  double loss = 0;
  Accuracy accuracy;
};

// Mean loss and answer accuracy over train.eval_sequences held-out sequences.
EvalResult Evaluate(Model& model, const AssociativeRecall& data, const config::Config& config) {
  const int64_t total = config.train().eval_sequences(), micro = config.train().micro_batch();
  const double normalizer = static_cast<double>(total * data.answers_per_sequence());
  EvalResult r;
  for (int64_t first = 0; first < total; first += micro) {
    const int64_t rows = std::min(micro, total - first);
    Batch batch = data.MakeBatch(AssociativeRecall::Split::kEval, first, rows);
    Tensor predictions = Tensor::Empty({batch.tokens_count()}, DType::kI32);
    r.loss += model.Evaluate(batch, normalizer, &predictions).loss;
    const Accuracy a = CountCorrect(predictions, batch.targets);
    r.accuracy.correct += a.correct;
    r.accuracy.total += a.total;
  }
  return r;
}

absl::Status WriteFile(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out.good()) return absl::InternalError(absl::StrCat(path.string(), ": cannot write"));
  return absl::OkStatus();
}

absl::Status Train(const config::Config& config) {
  const auto& tc = config.train();
  std::error_code ec;
  std::filesystem::create_directories(tc.run_dir(), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("train.run_dir: cannot create ", tc.run_dir(), ": ", ec.message()));
  const std::filesystem::path run_dir(tc.run_dir());
  LOOM_RETURN_IF_ERROR(WriteFile(run_dir / "config.textproto", ConfigToText(config)));
  LOOM_RETURN_IF_ERROR(WriteFile(run_dir / "version.txt", absl::StrCat("loom ", LOOM_VERSION, "\n")));
  MetricsWriter metrics;
  LOOM_RETURN_IF_ERROR(metrics.Open((run_dir / "metrics.jsonl").string()));

  const ModelDims dims = ModelDims::FromConfig(config);
  Model model(dims);
  AdamWOptions adam;
  adam.beta1 = config.optim().beta1();
  adam.beta2 = config.optim().beta2();
  adam.eps = config.optim().eps();
  adam.weight_decay = config.optim().weight_decay();
  AdamW optimizer(model.params(), adam);
  AssociativeRecall data(config);

  const int64_t micro = tc.micro_batch(), global = tc.global_batch(), steps = tc.steps();
  const int64_t tokens_per_step = global * tc.seq_len();
  LogInfo("loom ", LOOM_VERSION, " | model ", dims.kinds, " hidden ", dims.hidden, " heads ", dims.heads, "/",
          dims.kv_heads, " | ", HumanCount(dims.ParameterCount(true)), " parameters (",
          HumanCount(dims.ParameterCount(false)), " without embeddings) | ", DTypeName(dims.dtype), " on cpu");
  LogInfo("task: associative recall, ", config.data().recall().pairs(), " pairs, ", config.data().recall().queries(),
          " queries, seq_len ", tc.seq_len(), " | ", steps, " steps of ", global, " sequences | run dir ",
          tc.run_dir());

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  Timer total_timer;
  int64_t step = 0;
  double loss = 0, grad_norm = 0;
  for (; step < steps && !g_stop; ++step) {
    Timer step_timer;
    model.ZeroGrad();
    // The loss is normalised by the step's count of answer tokens (all
    // micro-batches together), so accumulation equals one large batch.
    const double normalizer = static_cast<double>(global * data.answers_per_sequence());
    loss = 0;
    for (int64_t first = 0; first < global; first += micro) {
      Batch batch = data.MakeBatch(AssociativeRecall::Split::kTrain, step * global + first, micro);
      loss += model.ForwardBackward(batch, normalizer).loss;
    }
    grad_norm = ClipGradNorm(model.params(), config.optim().grad_clip());
    const double lr = LearningRate(config.optim(), step, steps);
    optimizer.Step(lr);
    const double seconds = step_timer.Seconds();
    const double tokens_per_s = tokens_per_step / seconds;
    metrics.Write({{"step", double(step + 1)}, {"loss", loss}, {"lr", lr}, {"grad_norm", grad_norm},
                   {"tokens_per_s", tokens_per_s}, {"elapsed_s", total_timer.Seconds()}});
    if ((step + 1) % tc.log_every() == 0 || step == 0 || step + 1 == steps) {
      LogInfo(absl::StrFormat("step %5d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | %.1f s", step + 1,
                              steps, loss, lr, grad_norm, HumanCount(tokens_per_s), total_timer.Seconds()));
    }
    if (tc.eval_every() > 0 && (step + 1) % tc.eval_every() == 0 && step + 1 < steps) {
      const EvalResult e = Evaluate(model, data, config);
      LogInfo(absl::StrFormat("eval  %5d | loss %.4f | accuracy %.3f (chance %.3f)", step + 1, e.loss,
                              e.accuracy.value(), data.chance()));
      metrics.Write({{"step", double(step + 1)}, {"eval_loss", e.loss}, {"accuracy", e.accuracy.value()}});
    }
  }
  if (g_stop) LogInfo("interrupted: stopped cleanly after step ", step);
  const EvalResult e = Evaluate(model, data, config);
  metrics.Write({{"step", double(step)}, {"eval_loss", e.loss}, {"accuracy", e.accuracy.value()}});
  const double elapsed = total_timer.Seconds();
  LogInfo(absl::StrFormat("done: %d steps in %.1f s (%s tok/s) | final loss %.4f | eval loss %.4f", step, elapsed,
                          HumanCount(step * tokens_per_step / std::max(elapsed, 1e-9)), loss, e.loss));
  LogInfo(absl::StrFormat("answer accuracy %.1f%% on %d held-out answers (chance %.1f%%)",
                          100 * e.accuracy.value(), e.accuracy.total, 100 * data.chance()));
  return absl::OkStatus();
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("loom-train --config FILE [--set path.to.field=value ...]");
  auto args = loom::ExtractConfigArgs(argc, argv);
  if (!args.ok()) {
    std::fprintf(stderr, "loom-train: %s\n", std::string(args.status().message()).c_str());
    return 2;
  }
  absl::ParseCommandLine(argc, argv);
  if (args->config_path.empty()) {
    std::fprintf(stderr, "loom-train: --config FILE is required (e.g. configs/default.textproto)\n");
    return 2;
  }
  auto config = loom::LoadConfig(args->config_path, args->sets);
  if (!config.ok()) {
    std::fprintf(stderr, "loom-train: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  if (absl::Status s = loom::Train(*config); !s.ok()) {
    std::fprintf(stderr, "loom-train: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
