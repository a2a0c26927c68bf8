// Data, tensor, pipeline and context parallelism are the single-process model: for each layout
// the losses, every gradient (the rank's slice of the global gradient) and
// the parameters after three AdamW steps equal a single-process run of the
// same global batches, in f64 (1e-10); and the work is really split
// (TP weight slices, ZeRO optimizer shards, bucket reductions started
// during backward).
#include <gtest/gtest.h>

#include <random>

#include "model/model.h"
#include "model/pipeline.h"
#include "optim/adamw.h"
#include "parallel/context_parallel.h"
#include "parallel/data_parallel.h"
#include "parallel/process_groups.h"
#include "tests/mpi_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

struct Case {
  const char* name;
  int tp, pp, zero;
  std::string pattern = "LS";
  bool tie = false;
  int kv_heads = 2;
  int cp = 1;
  const char* cp_softmax = "ring";
  const char* cp_linear = "lasp2";
  int vpp = 1;
  bool f32 = false;  // an f32 run: losses within 1e-5 (gradients are checked in f64)
  bool sp = false;   // sequence parallelism
};

config::Config MakeConfig(const Case& c, int world) {
  config::Config cfg;
  auto* m = cfg.mutable_model();
  m->set_pattern(c.pattern);
  m->set_layers(static_cast<int>(c.pattern.size()));
  m->set_hidden(16);
  m->set_heads(4);
  m->set_kv_heads(c.kv_heads);
  m->set_vocab(50);
  m->set_ffn_hidden(24);
  m->set_tie_embeddings(c.tie);
  m->set_lightning_block(4);
  auto* t = cfg.mutable_train();
  t->set_seq_len(16);
  t->set_global_batch(8);
  t->set_micro_batch(2);
  t->set_seed(7);
  auto* p = cfg.mutable_parallel();
  p->set_tp(c.tp);
  p->set_pp(c.pp);
  p->set_vpp(c.vpp);
  p->set_zero(c.zero);
  p->set_cp(c.cp);
  p->set_cp_softmax(c.cp_softmax);
  p->set_cp_linear(c.cp_linear);
  p->set_bucket_mb(0.004);  // a few KiB: several buckets even for this model
  return cfg;
}

// Sequence s of step `step`: random tokens, some targets ignored.
Batch MakeBatch(int step, int first, int rows, int seq_len, int vocab) {
  Batch b = Batch::Allocate(rows, seq_len, /*with_docs=*/true);
  for (int r = 0; r < rows; ++r) {
    std::mt19937 gen(1000 * step + first + r);
    for (int i = 0; i < seq_len; ++i) {
      const int64_t k = int64_t{r} * seq_len + i;
      b.tokens.data<int32_t>()[k] = static_cast<int32_t>(gen() % vocab);
      b.targets.data<int32_t>()[k] = gen() % 7 == 0 ? -100 : static_cast<int32_t>(gen() % vocab);
      b.positions.data<int32_t>()[k] = i;
    }
  }
  // Packed documents whose boundaries fall inside and between CP chunks.
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < seq_len; ++i)
      b.token_rows.doc_ids.data<int32_t>()[int64_t{r} * seq_len + i] = (i >= 5) + (i >= 8 + (first + r) % 3);
  return b;
}

std::vector<Batch> MicroBatches(int step, int first, int count, const config::Config& cfg) {
  std::vector<Batch> out;
  const int micro = cfg.train().micro_batch();
  for (int s = first; s < first + count; s += micro)
    out.push_back(MakeBatch(step, s, micro, cfg.train().seq_len(), cfg.model().vocab()));
  return out;
}

// The slice of a global tensor that a (possibly TP-sharded) parameter holds.
Tensor SliceOf(const Tensor& global, const Param& p) {
  if (!p.sharded()) return global;
  const int64_t rows = p.value.dim(0), cols = p.value.dim(1);
  Tensor out = Tensor::Empty(p.value.shape(), global.dtype());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t gr = p.split_dim == 0 ? r + p.split_start : r;
      const int64_t gc = p.split_dim == 1 ? c + p.split_start : c;
      out.data<double>()[r * cols + c] = global.data<double>()[gr * global.dim(1) + gc];
    }
  return out;
}

const Param* Find(const ParamList& params, const std::string& name) {
  for (const Param* p : params)
    if (p->name == name) return p;
  return nullptr;
}

constexpr double kTol = 1e-10;
constexpr int kSteps = 3;

void RunCase(const Case& c) {
  Communicator& world = testing::World();
  const int n = world.size();
  config::Config cfg = MakeConfig(c, n);
  auto layout = MakeLayout(n, cfg);
  ASSERT_TRUE(layout.ok()) << layout.status();
  auto groups_or = ProcessGroups::Make(world, *layout);
  ASSERT_TRUE(groups_or.ok()) << groups_or.status();
  ProcessGroups& g = **groups_or;
  SCOPED_TRACE(std::string(c.name) + " " + layout->ToString());

  ModelDims dims = ModelDims::FromConfig(cfg);
  dims.dtype = c.f32 ? DType::kF32 : DType::kF64;
  AdamWOptions adam;
  const double lr = 1e-2, clip = 0.05;  // small clip: clipping happens

  // Reference: one process, the whole global batch.
  Model ref(dims);
  AdamW ref_opt(ref.params(), adam);

  TensorParallel tp{g.tp.get(), g.coords.tp, layout->tp, c.sp};
  ContextParallel cp;
  cp.comm = g.cp.get();
  cp.rank = g.coords.cp;
  cp.size = layout->cp;
  cp.softmax.scheme = *ParseCpSoftmaxScheme(c.cp_softmax);
  cp.linear.scheme = *ParseCpLinearScheme(c.cp_linear);
  PipelineParallel pp{layout->pp, g.coords.pp, layout->vpp};
  Model model(dims, tp, cp, pp);
  DataParallelOptions dpo;
  dpo.bucket_mb = cfg.parallel().bucket_mb();
  dpo.zero = cfg.parallel().zero() == 1;
  dpo.adam = adam;
  DataParallel dp(model.params(), g.dp_cp.get(), g.world, g.coords.tp, dpo);
  model.set_grad_ready_hook([&](const ParamList& ready) { dp.GradReady(ready); });

  const int global = cfg.train().global_batch(), per_rank = global / layout->dp;
  for (int step = 0; step < kSteps; ++step) {
    const std::vector<Batch> all = MicroBatches(step, 0, global, cfg);
    double normalizer = 0;
    for (const Batch& b : all) normalizer += b.CountTargets();
    const double ref_loss = ref.StepGradients(all, normalizer);
    std::vector<Tensor> ref_grads;
    for (const Param* p : ref.params()) ref_grads.push_back(p->grad.Clone());
    const double ref_norm = ClipGradNorm(ref.params(), clip);
    ref_opt.Step(lr);

    std::vector<Batch> mine = MicroBatches(step, g.coords.dp * per_rank, per_rank, cfg);
    if (layout->cp > 1) {
      for (Batch& b : mine) {
        auto shard = ZigzagShardBatch(b, layout->cp, g.coords.cp);
        ASSERT_TRUE(shard.ok()) << shard.status();
        b = shard->batch;
        b.cp_chunks = std::make_shared<CpChunks>(shard->chunks);
      }
    }
    double local_loss = 0;
    if (layout->pp == 1) {
      local_loss = model.StepGradients(mine, normalizer);
    } else {
      auto l = PipelineStepGradients(model, *g.pp, mine, normalizer);
      ASSERT_TRUE(l.ok()) << l.status();
      local_loss = *l;
    }
    Tensor loss = Tensor::FromVector<double>({local_loss}, {1});
    ASSERT_TRUE(dp.ReduceGradients().ok());
    ASSERT_TRUE(g.dp_cp->AllReduce(loss).ok());
    ASSERT_TRUE(g.pp->AllReduce(loss).ok());  // only the last stage has a loss
    EXPECT_NEAR(loss.data<double>()[0], ref_loss, (c.f32 ? 1e-5 : kTol) * std::abs(ref_loss)) << "step " << step;
    if (c.f32) {
      ASSERT_TRUE(dp.ClipGradients(clip).ok());
      ASSERT_TRUE(dp.Step(lr).ok());
      continue;
    }
    if (!dpo.zero) {
      for (const Param* p : model.params()) {
        const Param* r = Find(ref.params(), p->name);
        ASSERT_NE(r, nullptr) << p->name;
        const size_t k = std::find(ref.params().begin(), ref.params().end(), r) - ref.params().begin();
        EXPECT_TRUE(testing::AllClose(p->grad, SliceOf(ref_grads[k], *p), kTol, 1e-14)) << "grad of " << p->name;
      }
    }
    auto norm = dp.ClipGradients(clip);
    ASSERT_TRUE(norm.ok()) << norm.status();
    EXPECT_NEAR(*norm, ref_norm, kTol * ref_norm) << "step " << step;
    ASSERT_TRUE(dp.Step(lr).ok());
  }
  for (const Param* p : model.params()) {
    if (c.f32) break;
    const Param* r = Find(ref.params(), p->name);
    // Relative to the tensor's scale: AdamW divides by sqrt(v) + eps, so an
    // element whose gradient is near eps carries the gradient's last-bit
    // differences (summation order) into its value at about 1e-14 absolute.
    const Tensor want = SliceOf(r->value, *p);
    double scale = 0;
    for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(want.Get(i)));
    EXPECT_TRUE(testing::AllClose(p->value, want, kTol, kTol * scale)) << "value of " << p->name;
  }

  // The work is split: TP slices, ZeRO shards, early bucket reductions.
  int64_t local = 0, global_elems = 0;
  for (const Param* p : model.params()) {
    if (p->sharded()) {
      EXPECT_EQ(p->value.numel() * layout->tp, NumElements(p->global_shape)) << p->name;
    }
    local += p->value.numel();
  }
  for (const Param* p : ref.params()) global_elems += p->value.numel();
  if (layout->tp > 1 || layout->pp > 1) {
    EXPECT_LT(local, global_elems);
  }
  if (dpo.zero) {
    // 2 moments of about local/dp elements (buckets are padded to the group).
    EXPECT_LE(dp.optimizer_state_elements(), 2 * (local / layout->dp + dp.buckets() * layout->dp));
  }
  EXPECT_GT(dp.buckets(), 1);
  EXPECT_EQ(dp.buckets_started_in_backward(), dp.buckets());
}

TEST(ModelParallel, Np2Layouts) {
  if (testing::World().size() != 2) GTEST_SKIP() << "np=2 layouts";
  RunCase({"dp2", 1, 1, 0});
  RunCase({"dp2+zero", 1, 1, 1});
  RunCase({"tp2", 2, 1, 0});
  RunCase({"tp2 tied", 2, 1, 0, "SL", true});
  RunCase({"cp2 ring lasp2", 1, 1, 0, "LS", false, 2, 2, "ring", "lasp2"});
  RunCase({"cp2 allgather lasp1", 1, 1, 0, "SL", false, 2, 2, "allgather", "lasp1"});
  RunCase({"cp2 ulysses", 1, 1, 0, "LS", false, 2, 2, "ulysses", "lasp2"});
  RunCase({"pp2", 1, 2, 0, "LSLS"});
  Case sp{"tp2 sequence-parallel", 2, 1, 0, "LS", false, 2};
  sp.sp = true;
  RunCase(sp);
  Case f32{"tp2 f32", 2, 1, 0};
  f32.f32 = true;
  RunCase(f32);
}

TEST(ModelParallel, Np4Layouts) {
  if (testing::World().size() != 4) GTEST_SKIP() << "np=4 layouts";
  RunCase({"tp2 x dp2", 2, 1, 0});
  RunCase({"dp4+zero", 1, 1, 1});
  RunCase({"tp2 x dp2 + zero", 2, 1, 1, "SL", true});
  RunCase({"cp4 hybrid LLLS ring lasp2", 1, 1, 0, "LLLS", false, 2, 4, "ring", "lasp2"});
  RunCase({"cp2 x tp2", 2, 1, 0, "LS", false, 2, 2, "allgather", "lasp2"});
  RunCase({"cp2 x dp2 + zero", 1, 1, 1, "SL", false, 2, 2, "ring", "lasp1"});
  RunCase({"tp2 x pp2", 2, 2, 0, "LS"});
  RunCase({"pp2 x dp2 + zero", 1, 2, 1, "SLLS"});
  RunCase({"pp4 vpp2", 1, 4, 0, "LLLSLLLS", false, 2, 1, "ring", "lasp2", 2});
  RunCase({"cp4 f32", 1, 1, 0, "LLLS", false, 2, 4, "ring", "lasp2", 1, true});
  RunCase({"cp2 x pp2", 1, 2, 0, "LSLS", false, 2, 2, "ring", "lasp2"});
  Case sp_pp{"tp2 x pp2 sequence-parallel", 2, 2, 0, "SLLS"};
  sp_pp.sp = true;
  RunCase(sp_pp);
  Case sp_cp{"cp2 x tp2 sequence-parallel + zero", 2, 1, 1, "LS", false, 2, 2, "ring", "lasp2"};
  sp_cp.sp = true;
  RunCase(sp_cp);
}

TEST(ModelParallel, Np8Layouts) {
  if (testing::World().size() != 8) GTEST_SKIP() << "np=8 layouts";
  RunCase({"tp4 x dp2", 4, 1, 0, "LS", false, 4});
  RunCase({"cp2 x tp2 x dp2", 2, 1, 0, "LS", false, 2, 2, "ring", "lasp2"});
  RunCase({"cp8 ring lasp2", 1, 1, 0, "SL", false, 2, 8, "ring", "lasp2"});
  RunCase({"tp2 x pp2 x dp2", 2, 2, 0, "LSLS"});
  RunCase({"tp2 x pp2 x dp2 + zero", 2, 2, 1, "SL"});
  RunCase({"tp2 x pp2 x dp2 + zero f32", 2, 2, 1, "SL", false, 2, 1, "ring", "lasp2", 1, true});
}

}  // namespace
}  // namespace loom
