#include "model/memory_estimate.h"

#include <gtest/gtest.h>

#include <tuple>

#include "absl/strings/str_join.h"

#include "data/associative_recall.h"
#include "model/model.h"
#include "parallel/data_parallel.h"
#include "parallel/solo_communicator.h"
#include "runtime/config.h"

namespace loom {
namespace {

config::Config DefaultConfig(const std::vector<std::string>& sets = {}) {
  auto config = LoadConfig(std::string(LOOM_SOURCE_DIR) + "/configs/default.textproto", sets);
  LOOM_CHECK(config.ok(), config.status().message());
  return *config;
}

Layout OneRank(const config::Config& config) {
  auto layout = MakeLayout(1, config);
  LOOM_CHECK(layout.ok(), layout.status().message());
  return *layout;
}

// The bytes Model + DataParallel allocate (the Tensor byte counter) equal
// the estimate's parameters + gradients + optimizer state, plus what the
// lightning layers hold that is not trained: the decay vector (h values),
// and W_g / the norm weight, allocated even when model.lightning_gate /
// lightning_norm switch them off (lightning_attention_layer.cc).
void ExpectPersistentBytesExact(const std::vector<std::string>& sets, bool zero) {
  const config::Config config = DefaultConfig(sets);
  const ModelDims dims = ModelDims::FromConfig(config);
  MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, OneRank(config));
  options.zero = zero;
  auto estimate = EstimateMemory(dims, options);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  const int64_t before = CpuTensorBytes();
  {
    auto world = SoloWorld();
    Model model(dims);
    DataParallelOptions dpo;
    dpo.zero = zero;
    dpo.bucket_mb = options.bucket_mb;
    DataParallel dp(model.params(), world.get(), world.get(), 0, dpo);
    int64_t untrained = 0;
    const int64_t e = DTypeSize(dims.dtype), hd = int64_t{dims.heads} * dims.head_dim;
    for (char kind : dims.kinds) {
      if (kind != 'L') continue;
      untrained += dims.heads * e;
      if (!dims.lightning_gate) untrained += 2 * hd * dims.hidden * e;  // value and grad
      if (!dims.lightning_norm) untrained += 2 * dims.head_dim * e;
    }
    const int64_t measured = CpuTensorBytes() - before - untrained;
    EXPECT_EQ(measured, estimate->param_bytes + estimate->grad_bytes + estimate->optimizer_bytes)
        << "params " << estimate->param_bytes << " grads " << estimate->grad_bytes << " optimizer "
        << estimate->optimizer_bytes << " zero " << zero;
    EXPECT_EQ(dp.optimizer_state_elements() * DTypeSize(dims.dtype), estimate->optimizer_bytes);
    int64_t params = 0;
    for (const Param* p : model.params()) params += p->value.numel();
    EXPECT_EQ(params, estimate->parameters);
  }
  EXPECT_EQ(CpuTensorBytes(), before) << "the counter must return to where it was";
}

TEST(MemoryEstimate, ParameterGradientOptimizerBytesAreExact) {
  ExpectPersistentBytesExact({}, false);
  ExpectPersistentBytesExact({}, true);
  // Small buckets: many of them, each closed by the bucket_mb rule.
  ExpectPersistentBytesExact({"parallel.bucket_mb=0.05"}, true);
  ExpectPersistentBytesExact({"model.lightning_gate=false", "model.lightning_norm=false", "train.dtype=f64"}, false);
}

// Every TP rank and pipeline stage: the estimate's local parameter count is
// what the model of that rank holds.
TEST(MemoryEstimate, LocalParameterCountsUnderTpAndPp) {
  for (const auto& [tp, pp, vpp] : std::vector<std::tuple<int, int, int>>{{2, 1, 1}, {4, 1, 1}, {1, 2, 1},
                                                                           {1, 2, 2}, {2, 4, 1}}) {
    const config::Config config =
        DefaultConfig({absl::StrCat("parallel.tp=", tp), absl::StrCat("parallel.pp=", pp),
                       absl::StrCat("parallel.vpp=", vpp), "train.global_batch=64", "train.micro_batch=16"});
    const ModelDims dims = ModelDims::FromConfig(config);
    auto layout = MakeLayout(tp * pp, config);
    ASSERT_TRUE(layout.ok()) << layout.status();
    for (int stage = 0; stage < pp; ++stage) {
      MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, *layout);
      options.pp_rank = stage;
      auto estimate = EstimateMemory(dims, options);
      ASSERT_TRUE(estimate.ok()) << estimate.status();
      for (int r = 0; r < tp; ++r) {
        Model model(dims, TensorParallel{nullptr, r, tp}, ContextParallel{}, PipelineParallel{pp, stage, vpp});
        int64_t params = 0;
        for (const Param* p : model.params()) params += p->value.numel();
        EXPECT_EQ(params, estimate->parameters) << "tp " << tp << " rank " << r << " pp " << pp << " stage " << stage
                                                << " vpp " << vpp;
      }
    }
  }
}

// The activation estimate against the peak of the Tensor byte counter over
// one optimizer step of the default config on the CPU (batches built before
// the peak is reset). The replay follows the allocations of model/*.cc one
// by one, so the two agree to the byte.
void ExpectActivationPeakExact(const std::vector<std::string>& sets) {
  const config::Config config = DefaultConfig(sets);
  const ModelDims dims = ModelDims::FromConfig(config);
  const MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, OneRank(config));
  auto estimate = EstimateMemory(dims, options);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  auto world = SoloWorld();
  Model model(dims);
  DataParallel dp(model.params(), world.get(), world.get(), 0, DataParallelOptions{});
  model.set_grad_ready_hook([&](const ParamList& ready) { dp.GradReady(ready); });
  AssociativeRecall recall(config);
  std::vector<Batch> batches;
  for (int64_t i = 0; i < options.micro_batches; ++i)
    batches.push_back(recall.MakeBatch(AssociativeRecall::Split::kTrain, i * options.micro_batch, options.micro_batch));
  const int64_t base = CpuTensorBytes();
  ResetPeakCpuTensorBytes();
  model.StepGradients(batches);
  ASSERT_TRUE(dp.ReduceGradients().ok());
  const int64_t measured = PeakCpuTensorBytes() - base;
  EXPECT_EQ(measured, estimate->activation_bytes)
      << "measured peak vs estimate, bytes (" << absl::StrJoin(sets, " ") << ")";
  std::printf("activations %s: measured %lld B, estimated %lld B\n", absl::StrJoin(sets, " ").c_str(),
              static_cast<long long>(measured), static_cast<long long>(estimate->activation_bytes));
}

TEST(MemoryEstimate, ActivationPeakMatchesMeasuredDefaultConfig) { ExpectActivationPeakExact({}); }
TEST(MemoryEstimate, ActivationPeakMatchesMeasuredWithRecompute) {
  ExpectActivationPeakExact({"model.recompute=all"});
  ExpectActivationPeakExact({"model.recompute=1,3"});
  ExpectActivationPeakExact({"train.micro_batch=16", "model.lightning_gate=false"});
}

}  // namespace
}  // namespace loom
