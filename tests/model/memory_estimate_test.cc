#include "model/memory_estimate.h"

#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"

#include "data/associative_recall.h"
#include "model/model.h"
#include "parallel/expert_parallel.h"
#include "parallel/solo_communicator.h"
#include "runtime/config.h"

namespace loom {
namespace {

constexpr const char* kDefault = "default.textproto";
// RLH: MoE MLPs (4 experts, top-2, one shared) under MoH lightning and
// softmax layers and a plain lightning layer.
constexpr const char* kTinyMoe = "tiny_moe.textproto";

config::Config LoadTestConfig(const std::string& file, const std::vector<std::string>& sets = {}) {
  auto config = LoadConfig(std::string(LOOM_SOURCE_DIR) + "/configs/" + file, sets);
  LOOM_CHECK(config.ok(), config.status().message());
  return *config;
}

Layout LayoutOf(int world, const config::Config& config) {
  auto layout = MakeLayout(world, config);
  LOOM_CHECK(layout.ok(), layout.status().message());
  return *layout;
}

// A group of `size` ranks that only answers size() and rank(): enough for
// the constructors of MoeLayer (its ep split) and DataParallel (bucket
// padding, ZeRO slices), which communicate nothing. Any collective fails.
class ShapeOnlyGroup : public Communicator {
 public:
  ShapeOnlyGroup(int size, int rank) {
    size_ = size;
    rank_ = rank;
    world_ranks_.resize(size);
    for (int r = 0; r < size; ++r) world_ranks_[r] = r;
  }
  std::string backend() const override { return "shape-only"; }
  CommHandle StartAllReduce(Tensor&, ReduceOp) override { return Fail(); }
  CommHandle StartReduceScatter(const Tensor&, Tensor&, ReduceOp) override { return Fail(); }
  CommHandle StartAllGather(const Tensor&, Tensor&) override { return Fail(); }
  CommHandle StartAllToAllV(const Tensor&, const std::vector<int64_t>&, Tensor&, const std::vector<int64_t>&) override {
    return Fail();
  }
  CommHandle StartSend(const Tensor&, int, int) override { return Fail(); }
  CommHandle StartRecv(Tensor&, int, int) override { return Fail(); }
  CommHandle StartBroadcast(Tensor&, int) override { return Fail(); }
  CommHandle StartBarrier() override { return Fail(); }
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int, int) override {
    return absl::UnimplementedError("[shape-only group] split");
  }

 private:
  static CommHandle Fail() { return CommHandle(absl::UnimplementedError("[shape-only group] no collectives")); }
};

// The bytes Model + ExpertDataParallel (what loom-train builds: dense
// parameters over dp·cp, MoE experts over (dp/ep)·cp) allocate, counted by
// the Tensor byte counter, equal the estimate's parameters + gradients +
// optimizer state, plus what the lightning layers ('L' and 'R') hold that is
// not trained: the decay vector (h values), and W_g / the norm weight,
// allocated even when model.lightning_gate / lightning_norm switch them off
// (lightning_attention_layer.cc). `world` > 1 plans this rank's share of
// that many ranks; the groups are ShapeOnlyGroups of the layout's sizes.
void ExpectPersistentBytesExact(const std::string& file, const std::vector<std::string>& sets, bool zero,
                                int world = 1) {
  const config::Config config = LoadTestConfig(file, sets);
  ModelDims dims = ModelDims::FromConfig(config);
  const Layout layout = LayoutOf(world, config);
  ASSERT_EQ(layout.tp * layout.pp, 1) << "one replica's parameters on every rank";
  MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, layout);
  options.zero = zero;
  auto estimate = EstimateMemory(dims, options);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  const std::string what = absl::StrCat(file, " ", absl::StrJoin(sets, " "), " zero ", zero, " ", layout.ToString());
  const int64_t before = CpuTensorBytes();
  {
    auto solo = SoloWorld();
    ShapeOnlyGroup everyone(world, 0), dense(layout.dp * layout.cp, 0), ep(layout.ep, 0),
        expert_dp(layout.dp / layout.ep * layout.cp, 0);
    const bool alone = world == 1;
    MoeParallel moe{.stats = nullptr, .ep = alone ? nullptr : &ep};
    dims.moe.parallel = &moe;
    Model model(dims);
    DataParallelOptions dpo;
    dpo.zero = zero;
    dpo.bucket_mb = options.bucket_mb;
    ExpertDataParallel dp(model.params(), alone ? solo.get() : &dense, alone ? solo.get() : &expert_dp,
                          alone ? solo.get() : &everyone, 0, dpo);
    int64_t untrained = 0;
    const int64_t e = DTypeSize(dims.dtype), hd = int64_t{dims.heads} * dims.head_dim;
    for (char kind : dims.kinds) {
      if (SoftmaxKind(kind)) continue;
      untrained += dims.heads * e;
      if (!dims.lightning_gate) untrained += 2 * hd * dims.hidden * e;  // value and grad
      if (!dims.lightning_norm) untrained += 2 * dims.head_dim * e;
    }
    const int64_t measured = CpuTensorBytes() - before - untrained;
    EXPECT_EQ(measured, estimate->param_bytes + estimate->grad_bytes + estimate->optimizer_bytes)
        << what << ": params " << estimate->param_bytes << " grads " << estimate->grad_bytes << " optimizer "
        << estimate->optimizer_bytes;
    const int64_t state = dp.dense().optimizer_state_elements() +
                          (dp.experts() != nullptr ? dp.experts()->optimizer_state_elements() : 0);
    EXPECT_EQ(state * e, estimate->optimizer_bytes) << what;
    int64_t params = 0;
    for (const Param* p : model.params()) params += p->value.numel();
    EXPECT_EQ(params, estimate->parameters) << what;
  }
  EXPECT_EQ(CpuTensorBytes(), before) << "the counter must return to where it was";
}

TEST(MemoryEstimate, ParameterGradientOptimizerBytesAreExact) {
  ExpectPersistentBytesExact(kDefault, {}, false);
  ExpectPersistentBytesExact(kDefault, {}, true);
  // Small buckets: many of them, each closed by the bucket_mb rule.
  ExpectPersistentBytesExact(kDefault, {"parallel.bucket_mb=0.05"}, true);
  ExpectPersistentBytesExact(kDefault, {"model.lightning_gate=false", "model.lightning_norm=false", "train.dtype=f64"},
                             false);
}

// MoE MLPs (router, experts, shared expert) and MoH routers (W_s, W_r, W_h).
// DataParallel cuts its buckets in backward order but keeps the model's
// parameter order in its flat buffers (parallel/data_parallel.h), across
// bucket boundaries too: every parameter's value and gradient directly
// follow its predecessor's, so a SwiGLU's dW_gate and dW_up take one GEMM
// (ops/grouped_linear.h). Small buckets: many boundaries.
TEST(MemoryEstimate, FlatBuffersKeepParameterOrder) {
  const config::Config config = LoadTestConfig(kDefault, {"parallel.bucket_mb=0.05"});
  Model model(ModelDims::FromConfig(config));
  auto solo = SoloWorld();
  DataParallelOptions dpo;
  dpo.bucket_mb = 0.05;
  ExpertDataParallel dp(model.params(), solo.get(), solo.get(), solo.get(), 0, dpo);
  const ParamList& params = model.params();
  ASSERT_GT(params.size(), 2u);
  int mlp_pairs = 0;
  for (size_t k = 1; k < params.size(); ++k) {
    const Param& a = *params[k - 1];
    const Param& b = *params[k];
    const size_t bytes = a.value.numel() * DTypeSize(a.value.dtype());
    EXPECT_EQ(static_cast<const char*>(b.value.raw()), static_cast<const char*>(a.value.raw()) + bytes) << b.name;
    EXPECT_EQ(static_cast<const char*>(b.grad.raw()), static_cast<const char*>(a.grad.raw()) + bytes) << b.name;
    mlp_pairs += absl::EndsWith(a.name, "w_gate") && absl::EndsWith(b.name, "w_up");
  }
  EXPECT_EQ(mlp_pairs, ModelDims::FromConfig(config).layers);
  // So a softmax layer's W_q, W_k, W_v and their gradients join into one
  // GEMM's operands (ops/stacked_linear.h).
  int qkv_triples = 0;
  for (size_t k = 2; k < params.size(); ++k) {
    const Param &q = *params[k - 2], &kk = *params[k - 1], &v = *params[k];
    if (!absl::EndsWith(q.name, "attn.wq") || !absl::EndsWith(v.name, "attn.wv")) continue;
    EXPECT_TRUE(Tensor::Stacked({&q.value, &kk.value, &v.value}).defined()) << q.name;
    EXPECT_TRUE(Tensor::Stacked({&q.grad, &kk.grad, &v.grad}).defined()) << q.name;
    ++qkv_triples;
  }
  EXPECT_GT(qkv_triples, 0);
}

TEST(MemoryEstimate, MoeAndMohParameterGradientOptimizerBytesAreExact) {
  ExpectPersistentBytesExact(kTinyMoe, {}, false);
  ExpectPersistentBytesExact(kTinyMoe, {}, true);
  ExpectPersistentBytesExact(kTinyMoe, {"parallel.bucket_mb=0.01"}, true);
  // No W_s and W_h with fixed gates; two shared experts; f64.
  ExpectPersistentBytesExact(kTinyMoe, {"model.moh.fixed_gates=true", "model.moe.shared_experts=2", "train.dtype=f64"},
                             false);
  // Only shared heads (W_s alone), only routed heads (W_r alone).
  ExpectPersistentBytesExact(kTinyMoe, {"model.moh.shared_heads=4"}, false);
  ExpectPersistentBytesExact(kTinyMoe, {"model.moh.shared_heads=0"}, false);
}

// One rank of four with expert parallelism 2: two of the four experts here,
// the dense buckets padded to multiples of dp = 4 and the expert buckets to
// multiples of dp/ep = 2, with ZeRO slices of each.
TEST(MemoryEstimate, ExpertParallelBucketsAndSlicesAreExact) {
  const std::vector<std::string> layout = {"parallel.ep=2", "train.micro_batch=8"};
  for (bool zero : {false, true})
    for (const char* bucket : {"parallel.bucket_mb=25", "parallel.bucket_mb=0.01", "parallel.bucket_mb=0.003"}) {
      std::vector<std::string> sets = layout;
      sets.push_back(bucket);
      ExpectPersistentBytesExact(kTinyMoe, sets, zero, /*world=*/4);
    }
  // Hidden 70: norms and W_s [1, 70] are not multiples of 4; nearly every
  // parameter in a bucket of its own, each padded.
  ExpectPersistentBytesExact(kTinyMoe, {"parallel.ep=2", "train.micro_batch=8", "model.hidden=70", "model.heads=5",
                                        "model.kv_heads=5", "parallel.bucket_mb=0.0001"},
                             /*zero=*/true, /*world=*/4);
}

// Every TP rank and pipeline stage: the estimate's local parameter count is
// what the model of that rank holds.
TEST(MemoryEstimate, LocalParameterCountsUnderTpAndPp) {
  for (const auto& [tp, pp, vpp] : std::vector<std::tuple<int, int, int>>{{2, 1, 1}, {4, 1, 1}, {1, 2, 1},
                                                                           {1, 2, 2}, {2, 4, 1}}) {
    const config::Config config =
        LoadTestConfig(kDefault, {absl::StrCat("parallel.tp=", tp), absl::StrCat("parallel.pp=", pp),
                                  absl::StrCat("parallel.vpp=", vpp), "train.global_batch=64", "train.micro_batch=16"});
    const ModelDims dims = ModelDims::FromConfig(config);
    const Layout layout = LayoutOf(tp * pp, config);
    for (int stage = 0; stage < pp; ++stage) {
      MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, layout);
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

// MoH routers under TP (replicated: every TP rank holds all of W_s, W_r,
// W_h; MoE layers refuse TP, so dense MLPs there) and MoE layers under EP
// (this rank's E/ep experts, the router and shared experts whole). MoE and
// MoH layers refuse PP.
TEST(MemoryEstimate, MoeAndMohLocalParameterCountsUnderTpAndEp) {
  const int pp = 1, stage = 0;
  for (const auto& [tp, ep] : std::vector<std::tuple<int, int>>{{2, 1}, {4, 1}, {1, 2}, {1, 4}}) {
    std::vector<std::string> sets = {absl::StrCat("parallel.tp=", tp), absl::StrCat("parallel.ep=", ep),
                                     "train.micro_batch=8"};
    if (tp > 1) sets.push_back("model.moe.experts=0");
    const config::Config config = LoadTestConfig(kTinyMoe, sets);
    ModelDims dims = ModelDims::FromConfig(config);
    const Layout layout = LayoutOf(tp * ep, config);
    auto estimate = EstimateMemory(dims, MemoryEstimateOptionsFromConfig(config, layout));
    ASSERT_TRUE(estimate.ok()) << estimate.status();
    for (int r = 0; r < tp; ++r) {
      ShapeOnlyGroup ep_group(ep, ep - 1);
      MoeParallel moe{.stats = nullptr, .ep = &ep_group};
      dims.moe.parallel = &moe;
      Model model(dims, TensorParallel{nullptr, r, tp}, ContextParallel{}, PipelineParallel{pp, stage, 1});
      int64_t params = 0;
      for (const Param* p : model.params()) params += p->value.numel();
      EXPECT_EQ(params, estimate->parameters) << "tp " << tp << " rank " << r << " ep " << ep;
    }
  }
}

// The activation estimate against the peak of the Tensor byte counter over
// one optimizer step on the CPU (batches built before the peak is reset).
// The replay follows the allocations of model/*.cc one by one, so the two
// agree to the byte. For MoE layers the plan's expert rows are what one
// process routes: T·top_k (dropless) or, when every expert of every layer
// got at least `capacity` assignments, E·capacity; check_capacity_reached
// asserts the latter from the routing statistics.
void ExpectActivationPeakExact(const std::string& file, const std::vector<std::string>& sets,
                               bool check_capacity_reached = false) {
  const config::Config config = LoadTestConfig(file, sets);
  const ModelDims dims = ModelDims::FromConfig(config);
  const MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, LayoutOf(1, config));
  auto estimate = EstimateMemory(dims, options);
  ASSERT_TRUE(estimate.ok()) << estimate.status();
  auto world = SoloWorld();
  Model model(dims);
  ExpertDataParallel dp(model.params(), world.get(), world.get(), world.get(), 0, DataParallelOptions{});
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
  const std::string what = absl::StrCat(file, " ", absl::StrJoin(sets, " "));
  if (check_capacity_reached) {
    const int64_t tokens = options.micro_batch * options.seq_len, k = dims.moe.top_k;
    const auto capacity = static_cast<int64_t>(std::ceil(dims.moe.capacity_factor * double(tokens * k) / dims.moe.experts));
    for (const auto& [layer, stats] : model.RoutingStatistics())
      ASSERT_GE(stats.load_min, double(capacity)) << what << ": layer " << layer << " has an expert under capacity";
  }
  EXPECT_EQ(measured, estimate->activation_bytes) << "measured peak vs estimate, bytes (" << what << ")";
  std::printf("activations %s: measured %lld B, estimated %lld B\n", what.c_str(), static_cast<long long>(measured),
              static_cast<long long>(estimate->activation_bytes));
}

TEST(MemoryEstimate, ActivationPeakMatchesMeasuredDefaultConfig) { ExpectActivationPeakExact(kDefault, {}); }
TEST(MemoryEstimate, ActivationPeakMatchesMeasuredWithRecompute) {
  ExpectActivationPeakExact(kDefault, {"model.recompute=all"});
  ExpectActivationPeakExact(kDefault, {"model.recompute=1,3"});
  ExpectActivationPeakExact(kDefault, {"train.micro_batch=16", "model.lightning_gate=false"});
}

// configs/tiny_moe.textproto: the MoE layer's routing, permutation, expert
// rows and shared expert, MoH's router tensors, masks and gate gradients.
TEST(MemoryEstimate, MoeAndMohActivationPeakMatchesMeasured) {
  ExpectActivationPeakExact(kTinyMoe, {});
  ExpectActivationPeakExact(kTinyMoe, {"model.recompute=all"});
  ExpectActivationPeakExact(kTinyMoe, {"model.recompute=0,2"});
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.shared_experts=2", "model.moe.top_k=3"});
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.shared_experts=0", "model.moh.fixed_gates=true"});
  ExpectActivationPeakExact(kTinyMoe, {"model.moh.shared_heads=0", "model.pattern=HRR", "train.dtype=f64"});
  ExpectActivationPeakExact(kTinyMoe, {"model.moh.shared_heads=4", "model.lightning_gate=false",
                                       "model.lightning_norm=false"});
  // Wide experts and few tokens: the MoE backward holds the peak.
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.moe_ffn=1024", "train.micro_batch=4", "train.global_batch=4"});
  // Narrow experts: the last layer's mixer backward holds it (MoH's gate
  // and router gradients; for R the masked d_o copy).
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.moe_ffn=4", "model.moe.shared_experts=0"});
  ExpectActivationPeakExact(kTinyMoe, {"model.pattern=LHR", "model.moe.moe_ffn=4", "model.moe.shared_experts=0"});
  // Many narrow experts: the router's logit gradient [T, E] at the end of
  // the MoE backward.
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.experts=256", "model.moe.moe_ffn=4", "model.moe.shared_experts=0"});
  // One head of dimension 64: the lightning state of the last layer's
  // forward (live with the layer's saved tensors) holds the peak.
  ExpectActivationPeakExact(kTinyMoe, {"model.hidden=256", "model.heads=1", "model.kv_heads=1", "model.pattern=HRR",
                                       "model.moh.top_k=1", "model.moh.shared_heads=0", "model.moe.top_k=1",
                                       "model.moe.moe_ffn=4", "model.moe.shared_experts=0", "model.recompute=all"});
  ExpectActivationPeakExact(kTinyMoe, {"model.hidden=256", "model.heads=1", "model.kv_heads=1", "model.pattern=HRR",
                                       "model.moh.top_k=1", "model.moh.shared_heads=0", "model.moe.top_k=1",
                                       "model.moe.moe_ffn=4", "model.moe.shared_experts=0"});
}

// Capacity 0.5: each expert keeps at most ceil(0.5·T·k/E) rows; with
// every expert over it the rows are E·capacity exactly.
TEST(MemoryEstimate, MoeActivationPeakAtCapacity) {
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.capacity_factor=0.5"}, /*check_capacity_reached=*/true);
  ExpectActivationPeakExact(kTinyMoe, {"model.moe.capacity_factor=0.5", "model.moe.moe_ffn=1024"},
                            /*check_capacity_reached=*/true);
}

}  // namespace
}  // namespace loom
