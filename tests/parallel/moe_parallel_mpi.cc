// MoE under data and expert parallelism is the single-process model: dp
// ranks whose micro-batches together form the single process's micro-batches
// (rank r holding rows [r·micro, (r+1)·micro) of each), with the experts
// split over ep ranks of the DP group, give its losses, every gradient (each
// expert's on its owner: together all of them), the clipped gradient norm,
// routing statistics (loads, dropped assignments) and, after AdamW steps and
// bias-balancing updates, its parameters, in f64 within 1e-10. The router
// statistics (f_i, P_i, z-loss), the capacity cut and the balancing loads
// are global (model/moe.h); tokens reach remote experts by all-to-all(v)
// (parallel/expert_parallel.h).
#include <gtest/gtest.h>

#include <random>

#include "model/model.h"
#include "model/moe.h"
#include "optim/adamw.h"
#include "parallel/data_parallel.h"
#include "parallel/expert_parallel.h"
#include "parallel/process_groups.h"
#include "runtime/config.h"
#include "tests/mpi_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

constexpr double kTol = 1e-10;
constexpr int kSteps = 3, kSeqLen = 12, kMicro = 2, kAccumulation = 2;

struct MoeCase {
  const char* name;
  std::vector<std::string> sets;  // model.moe.* overrides
  bool expect_drops = false;
  bool zero = false;  // ZeRO-1 sharded optimizer
};

ModelDims Dims(const MoeCase& c) {
  std::vector<std::string> sets = {"model.pattern=LS", "model.layers=2", "model.hidden=8", "model.heads=2",
                                   "model.kv_heads=2", "model.vocab=40", "model.lightning_block=4",
                                   "train.seq_len=12", "train.dtype=f64", "model.init_std=0.4",
                                   "data.recall.pairs=3", "data.recall.queries=2", "data.recall.key_vocab=8",
                                   "data.recall.value_vocab=8",
                                   "model.moe.experts=4", "model.moe.top_k=2", "model.moe.moe_ffn=6"};
  sets.insert(sets.end(), c.sets.begin(), c.sets.end());
  auto cfg = LoadConfig("", sets);
  LOOM_CHECK(cfg.ok(), cfg.status().message());
  ModelDims dims = ModelDims::FromConfig(*cfg);
  dims.dtype = DType::kF64;
  return dims;
}

// Rows [first, first + rows) of step `step`: random tokens, some targets ignored.
Batch MakeBatch(int step, int first, int rows, int vocab) {
  Batch b = Batch::Allocate(rows, kSeqLen, /*with_docs=*/false);
  for (int r = 0; r < rows; ++r) {
    std::mt19937 gen(1000 * step + first + r);
    for (int i = 0; i < kSeqLen; ++i) {
      const int64_t k = int64_t{r} * kSeqLen + i;
      b.tokens.data<int32_t>()[k] = static_cast<int32_t>(gen() % vocab);
      b.targets.data<int32_t>()[k] = gen() % 7 == 0 ? -100 : static_cast<int32_t>(gen() % vocab);
      b.positions.data<int32_t>()[k] = i;
    }
  }
  return b;
}

const Param* Find(const ParamList& params, const std::string& name) {
  for (const Param* p : params)
    if (p->name == name) return p;
  return nullptr;
}

// Runs the case on the first `dp` ranks of the world.
void RunCase(const MoeCase& c, int dp, int ep) {
  std::unique_ptr<Communicator> comm = testing::FirstRanks(dp);
  if (comm == nullptr) return;
  SCOPED_TRACE(absl::StrCat(c.name, " dp", dp, " ep", ep));
  Layout layout;
  layout.world = layout.dp = dp;
  layout.ep = ep;
  auto groups_or = ProcessGroups::Make(*comm, layout);
  ASSERT_TRUE(groups_or.ok()) << groups_or.status();
  ProcessGroups& g = **groups_or;

  const ModelDims ref_dims = Dims(c);
  Model ref(ref_dims);
  AdamWOptions adam;
  AdamW ref_opt(ref.params(), adam);

  // The statistics group is the dp communicator, not dp_cp, on which the
  // gradient buckets are reduced during backward.
  MoeParallel moe_parallel{.stats = g.dp.get(), .ep = g.ep.get()};
  ModelDims dims = ref_dims;
  dims.moe.parallel = &moe_parallel;
  Model model(dims);
  DataParallelOptions dpo;
  dpo.bucket_mb = 0.004;
  dpo.adam = adam;
  dpo.zero = c.zero;
  ExpertDataParallel data_parallel(model.params(), g.dp_cp.get(), g.expert_dp.get(), g.world, 0, dpo);
  model.set_grad_ready_hook([&](const ParamList& ready) { data_parallel.GradReady(ready); });

  const double lr = 1e-2, clip = 0.05;  // small clip: clipping happens
  int64_t dropped = 0;
  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    // Global micro-batch m: rows [m·dp·micro, (m+1)·dp·micro); rank r holds
    // rows r·micro.. of each.
    std::vector<Batch> all, mine;
    double normalizer = 0;
    for (int m = 0; m < kAccumulation; ++m) {
      all.push_back(MakeBatch(step, m * dp * kMicro, dp * kMicro, dims.vocab));
      normalizer += all.back().CountTargets();
      mine.push_back(MakeBatch(step, m * dp * kMicro + g.coords.dp * kMicro, kMicro, dims.vocab));
    }
    const double ref_loss = ref.StepGradients(all, normalizer);
    const auto ref_stats = ref.RoutingStatistics();
    std::vector<Tensor> ref_grads;
    for (const Param* p : ref.params()) ref_grads.push_back(p->grad.Clone());
    const double ref_norm = ClipGradNorm(ref.params(), clip);
    ref_opt.Step(lr);

    Tensor loss = Tensor::FromVector<double>({model.StepGradients(mine, normalizer)}, {1});
    ASSERT_TRUE(data_parallel.ReduceGradients().ok());
    ASSERT_TRUE(g.dp->AllReduce(loss).ok());
    EXPECT_NEAR(loss.data<double>()[0], ref_loss, kTol * std::abs(ref_loss));
    for (const Param* p : model.params()) {
      if (c.zero) break;  // ZeRO keeps only a slice of each gradient: the norm and the values check it
      const Param* r = Find(ref.params(), p->name);
      ASSERT_NE(r, nullptr) << p->name;
      const size_t i = std::find(ref.params().begin(), ref.params().end(), r) - ref.params().begin();
      EXPECT_TRUE(testing::AllClose(p->grad, ref_grads[i], kTol, 1e-14)) << "gradient of " << p->name;
    }
    // Routing statistics of the last micro-batch: global on every rank.
    const auto stats = model.RoutingStatistics();
    ASSERT_EQ(stats.size(), ref_stats.size());
    for (size_t i = 0; i < stats.size(); ++i) {
      const RoutingStats &a = stats[i].second, &b = ref_stats[i].second;
      EXPECT_EQ(a.assignments, b.assignments) << "layer " << stats[i].first;
      EXPECT_EQ(a.dropped, b.dropped) << "layer " << stats[i].first;
      EXPECT_EQ(a.load_min, b.load_min) << "layer " << stats[i].first;
      EXPECT_EQ(a.load_max, b.load_max) << "layer " << stats[i].first;
      EXPECT_NEAR(a.load_cv, b.load_cv, 1e-12) << "layer " << stats[i].first;
      dropped += b.dropped;
    }
    auto norm = data_parallel.ClipGradients(clip);
    ASSERT_TRUE(norm.ok()) << norm.status();
    EXPECT_NEAR(*norm, ref_norm, kTol * ref_norm);
    ASSERT_TRUE(data_parallel.Step(lr).ok());
  }
  // The experts are split: this rank holds E/ep of them, the ep group all.
  int64_t mine = 0, all = 0;
  for (const Param* p : model.params()) mine += IsExpertParam(*p);
  for (const Param* p : ref.params()) all += IsExpertParam(*p);
  EXPECT_EQ(mine * ep, all);
  Tensor held = Tensor::FromVector<double>({double(mine)}, {1});
  ASSERT_TRUE(g.ep->AllReduce(held).ok());
  EXPECT_EQ(held.data<double>()[0], double(all));
  if (c.expect_drops) {
    EXPECT_GT(dropped, 0) << "the capacity cut was not exercised";
  }
  // After the steps (and, with bias balancing, the bias updates that steer
  // later steps' routing) the parameters still agree.
  for (const Param* p : model.params()) {
    const Param* r = Find(ref.params(), p->name);
    double scale = 0;
    for (int64_t i = 0; i < r->value.numel(); ++i) scale = std::max(scale, std::abs(r->value.Get(i)));
    EXPECT_TRUE(testing::AllClose(p->value, r->value, kTol, kTol * scale)) << "value of " << p->name;
  }
}

const std::vector<MoeCase>& Cases() {
  static const std::vector<MoeCase> cases = {
      {"softmax, aux + z-loss, dropless", {"model.moe.aux_loss_coef=0.5", "model.moe.z_loss_coef=0.1"}},
      {"sigmoid, normalised top-k, shared expert, capacity 0.8, bias balancing",
       {"model.moe.router=sigmoid", "model.moe.normalize_top_k=true", "model.moe.shared_experts=1",
        "model.moe.capacity_factor=0.8", "model.moe.aux_loss_coef=0.3", "model.moe.z_loss_coef=0.05",
        "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.05"},
       /*expect_drops=*/true},
      // Capacity ceil(1e-3 · N k / E) = 1: the first assignment of each
      // expert survives, so the later ranks send no rows at all. ZeRO on.
      {"capacity of one row per expert, ZeRO-1",
       {"model.moe.capacity_factor=0.001", "model.moe.aux_loss_coef=0.2", "model.moe.shared_experts=1"},
       /*expect_drops=*/true, /*zero=*/true},
  };
  return cases;
}

TEST(MoeParallel, DataParallelEqualsOneProcess) {
  const int n = testing::World().size();
  for (const MoeCase& c : Cases()) {
    RunCase(c, 2, 1);
    if (n >= 4) RunCase(c, 4, 1);
  }
}

TEST(MoeParallel, ExpertParallelEqualsOneProcess) {
  const int n = testing::World().size();
  for (const MoeCase& c : Cases()) {
    RunCase(c, 2, 2);
    if (n >= 4) RunCase(c, 4, 4);
    if (n >= 4) RunCase(c, 4, 2);
  }
}

}  // namespace
}  // namespace loom
