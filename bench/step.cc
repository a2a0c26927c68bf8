// loom-bench --what=step [--config FILE] [--set k=v ...] [--steps N] [--json]
// Times whole training steps (forward, backward, AdamW) of a config's model
// on the CPU, beside a baseline measured in the same run: OpenBLAS SGEMM at
// the model's widest matmul shape, so the step's FLOP rate reads as a
// fraction of what the hardware's matmul does.
#include <cstdio>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "data/associative_recall.h"
#include "model/model.h"
#include "ops/matmul.h"
#include "optim/adamw.h"
#include "runtime/timer.h"

namespace loom {
namespace {

// GFLOP/s of c[m,n] = a[m,k]·b[n,k]ᵀ in f32, best of `reps`.
double SgemmGflops(int64_t m, int64_t n, int64_t k, int reps) {
  Tensor a = Tensor::Empty({m, k}, DType::kF32), b = Tensor::Empty({n, k}, DType::kF32);
  Tensor c = Tensor::Empty({m, n}, DType::kF32);
  a.Fill(0.5);
  b.Fill(0.25);
  double best = 1e30;
  for (int r = 0; r < reps + 1; ++r) {
    Timer t;
    ops::Matmul(a, false, b, true, c);
    if (r > 0) best = std::min(best, t.Seconds());
  }
  return 2.0 * m * n * k / best / 1e9;
}

int BenchStep(const config::Config& config) {
  const ModelDims dims = ModelDims::FromConfig(config);
  Model model(dims);
  AdamW optimizer(model.params(), AdamWOptions{});
  AssociativeRecall data(config);
  const int64_t global = config.train().global_batch(), micro = config.train().micro_batch();
  const int64_t tokens = global * config.train().seq_len();
  const int steps = absl::GetFlag(FLAGS_steps);
  double seconds = 0;
  for (int s = 0; s < steps + 1; ++s) {
    Timer t;
    std::vector<Batch> batches;
    for (int64_t first = 0; first < global; first += micro)
      batches.push_back(data.MakeBatch(AssociativeRecall::Split::kTrain, s * global + first, micro));
    model.StepGradients(batches);
    ClipGradNorm(model.params(), 1.0);
    optimizer.Step(1e-3);
    if (s > 0) seconds += t.Seconds();  // step 0 warms up allocations and threads
  }
  const double step_s = seconds / steps;
  const double flops = dims.FlopsPerToken(config.train().seq_len()) * tokens;
  const double model_gflops = flops / step_s / 1e9;
  const double sgemm = SgemmGflops(micro * config.train().seq_len(), dims.ffn, dims.hidden, 3);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf(
        "{\"what\": \"step\", \"model\": \"%s\", \"tokens_per_step\": %ld, \"step_s\": %.6f, \"tokens_per_s\": %.1f, "
        "\"model_gflops\": %.2f, \"sgemm_gflops\": %.2f, \"fraction_of_sgemm\": %.4f}\n",
        dims.kinds.c_str(), static_cast<long>(tokens), step_s, tokens / step_s, model_gflops, sgemm,
        model_gflops / sgemm);
  } else {
    std::printf("%-10s %10s %10s %12s %14s %14s %10s\n", "model", "params", "tokens", "step (s)", "tokens/s",
                "model GFLOP/s", "of SGEMM");
    std::printf("%-10s %9.2fM %10ld %12.4f %14.0f %14.2f %9.1f%%\n", dims.kinds.c_str(),
                dims.ParameterCount(true) / 1e6, static_cast<long>(tokens), step_s, tokens / step_s, model_gflops,
                100 * model_gflops / sgemm);
    std::printf("baseline: OpenBLAS SGEMM [%ld x %d x %d] %.2f GFLOP/s, same run\n",
                static_cast<long>(micro * config.train().seq_len()), dims.ffn, dims.hidden, sgemm);
  }
  return 0;
}

LOOM_BENCHMARK("step", "whole training steps (forward, backward, AdamW) on the CPU vs OpenBLAS SGEMM", BenchStep);

}  // namespace
}  // namespace loom

