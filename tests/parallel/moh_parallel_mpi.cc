// MoH (H and R layers) under data and context parallelism is the
// single-process model: the ranks' tokens of a step form the single
// process's micro-batch (dp: rank r holds rows [r·micro, (r+1)·micro); cp:
// zig-zag chunks of every row), and the losses, every gradient and the
// routing statistics agree in f64 within 1e-10. The load-balance statistics
// are summed over the dp × cp group (model/moh.h); under CP every head is
// computed (no skip mask) and ungated heads are multiplied by 0.
#include <gtest/gtest.h>

#include <random>

#include "model/model.h"
#include "parallel/context_parallel.h"
#include "parallel/process_groups.h"
#include "parallel/zigzag.h"
#include "runtime/config.h"
#include "tests/mpi_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

constexpr double kTol = 1e-10;
constexpr int kSteps = 2, kSeqLen = 16, kRows = 4;

struct MohCase {
  const char* name;
  int cp;
  const char* cp_softmax = "ring";
  const char* cp_linear = "lasp2";
};

config::Config MakeConfig(const MohCase& c) {
  auto cfg = LoadConfig("", {"model.pattern=HR", "model.layers=2", "model.hidden=16", "model.heads=4",
                             "model.kv_heads=2", "model.vocab=50", "model.ffn_hidden=24", "model.lightning_block=4",
                             "model.init_std=0.3", "model.moh.shared_heads=1", "model.moh.top_k=2",
                             "model.moh.aux_loss_coef=0.5", "data.recall.pairs=3", "data.recall.queries=3",
                             "data.recall.key_vocab=8", "data.recall.value_vocab=8", "train.seq_len=16",
                             "train.global_batch=4",
                             "train.micro_batch=2", "train.seed=7", absl::StrCat("parallel.cp=", c.cp),
                             absl::StrCat("parallel.cp_softmax=", c.cp_softmax),
                             absl::StrCat("parallel.cp_linear=", c.cp_linear)});
  LOOM_CHECK(cfg.ok(), cfg.status().message());
  return *cfg;
}

// Rows [first, first + rows) of step `step`: random tokens, some targets
// ignored, packed documents whose boundaries fall inside and between chunks.
Batch MakeBatch(int step, int first, int rows) {
  Batch b = Batch::Allocate(rows, kSeqLen, /*with_docs=*/true);
  for (int r = 0; r < rows; ++r) {
    std::mt19937 gen(1000 * step + first + r);
    for (int i = 0; i < kSeqLen; ++i) {
      const int64_t k = int64_t{r} * kSeqLen + i;
      b.tokens.data<int32_t>()[k] = static_cast<int32_t>(gen() % 50);
      b.targets.data<int32_t>()[k] = gen() % 7 == 0 ? -100 : static_cast<int32_t>(gen() % 50);
      b.positions.data<int32_t>()[k] = i;
      b.token_rows.doc_ids.data<int32_t>()[k] = (i >= 5) + (i >= 9 + (first + r) % 3);
    }
  }
  return b;
}

void RunCase(const MohCase& c) {
  Communicator& world = testing::World();
  const config::Config cfg = MakeConfig(c);
  auto layout = MakeLayout(world.size(), cfg);
  ASSERT_TRUE(layout.ok()) << layout.status();
  auto groups_or = ProcessGroups::Make(world, *layout);
  ASSERT_TRUE(groups_or.ok()) << groups_or.status();
  ProcessGroups& g = **groups_or;
  SCOPED_TRACE(std::string(c.name) + " " + layout->ToString());

  ModelDims dims = ModelDims::FromConfig(cfg);
  dims.dtype = DType::kF64;
  Model ref(dims);
  dims.moh.stats = g.dp_cp.get();
  ContextParallel cp;
  cp.comm = g.cp.get();
  cp.rank = g.coords.cp;
  cp.size = layout->cp;
  cp.softmax.scheme = *ParseCpSoftmaxScheme(c.cp_softmax);
  cp.linear.scheme = *ParseCpLinearScheme(c.cp_linear);
  Model model(dims, TensorParallel{}, cp);

  const int per_rank = kRows / layout->dp;
  for (int step = 0; step < kSteps; ++step) {
    const Batch all = MakeBatch(step, 0, kRows);
    const double normalizer = static_cast<double>(all.CountTargets());
    const double ref_loss = ref.StepGradients({all}, normalizer);

    Batch mine = MakeBatch(step, g.coords.dp * per_rank, per_rank);
    if (layout->cp > 1) {
      auto shard = ZigzagShardBatch(mine, layout->cp, g.coords.cp);
      ASSERT_TRUE(shard.ok()) << shard.status();
      mine = shard->batch;
      mine.cp_chunks = std::make_shared<CpChunks>(shard->chunks);
    }
    Tensor loss = Tensor::FromVector<double>({model.StepGradients({mine}, normalizer)}, {1});
    ASSERT_TRUE(g.dp_cp->AllReduce(loss).ok());
    EXPECT_NEAR(loss.data<double>()[0], ref_loss, kTol * std::abs(ref_loss)) << "step " << step;
    ASSERT_EQ(model.params().size(), ref.params().size());
    for (size_t i = 0; i < ref.params().size(); ++i) {
      Param* p = model.params()[i];
      ASSERT_EQ(p->name, ref.params()[i]->name);
      ASSERT_TRUE(g.dp_cp->AllReduce(p->grad).ok());
      EXPECT_TRUE(testing::AllClose(p->grad, ref.params()[i]->grad, kTol, 1e-14)) << "grad of " << p->name;
    }
    const auto want = ref.MohStatistics(), got = model.MohStatistics();
    ASSERT_EQ(got.size(), want.size());
    for (size_t l = 0; l < got.size(); ++l) {
      EXPECT_EQ(got[l].second.load_min, want[l].second.load_min) << "layer " << l;
      EXPECT_EQ(got[l].second.load_max, want[l].second.load_max) << "layer " << l;
      EXPECT_NEAR(got[l].second.load_cv, want[l].second.load_cv, 1e-14) << "layer " << l;
      EXPECT_EQ(got[l].second.assignments, want[l].second.assignments) << "layer " << l;
    }
    // The same update on both, so the next step starts from equal weights.
    for (size_t i = 0; i < ref.params().size(); ++i) {
      for (Param* p : {model.params()[i], ref.params()[i]})
        for (int64_t e = 0; e < p->value.numel(); ++e)
          p->value.data<double>()[e] -= 0.5 * ref.params()[i]->grad.data<double>()[e];
    }
  }
}

TEST(MohParallel, Np2MatchesOneProcess) {
  if (testing::World().size() != 2) GTEST_SKIP() << "np=2 layouts";
  RunCase({"dp2", 1});
  RunCase({"cp2 ring lasp2", 2, "ring", "lasp2"});
  RunCase({"cp2 allgather lasp2", 2, "allgather", "lasp2"});
  RunCase({"cp2 ring lasp1", 2, "ring", "lasp1"});
  RunCase({"cp2 ulysses lasp2", 2, "ulysses", "lasp2"});
}

}  // namespace
}  // namespace loom
