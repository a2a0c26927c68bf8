// Mixture-of-head attention (H and R layers), in f64: finite-difference
// gradients through the router weights W_s, W_r, W_h and the attention
// weights; routed MoH against a dense multi-head reference times an
// explicit gate tensor; every head shared with fixed gates against plain
// S / L; skipping inactive (head, block) pairs against computing them all,
// in the ops and in the layers; config checks.
#include "model/moh.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "data/associative_recall.h"
#include "model/lightning_attention_layer.h"
#include "model/memory_estimate.h"
#include "model/model.h"
#include "model/softmax_attention_layer.h"
#include "ops/lightning_attention.h"
#include "ops/softmax_attention.h"
#include "runtime/config.h"
#include "tests/model/model_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

config::Config MohConfig(std::vector<std::string> extra = {}) {
  return testing::ConfigFromSets({"model.pattern=HR", "model.layers=2", "model.hidden=16", "model.heads=4",
                                   "model.kv_heads=2", "model.vocab=40", "model.lightning_block=4",
                                   "train.seq_len=14", "train.dtype=f64", "data.recall.pairs=3",
                                   "data.recall.queries=3", "data.recall.key_vocab=8", "data.recall.value_vocab=8",
                                   "model.init_std=0.4", "model.moh.shared_heads=1", "model.moh.top_k=2",
                                   "model.moh.aux_loss_coef=0.5"},
                        extra);
}

ModelDims Dims(std::vector<std::string> extra = {}) { return ModelDims::FromConfig(MohConfig(std::move(extra))); }

// rows × seq_len tokens, positions 0.. in each row.
Batch RowsBatch(int64_t rows, int64_t seq_len) {
  Batch b = Batch::Allocate(rows, seq_len, /*with_docs=*/false);
  for (int64_t i = 0; i < rows * seq_len; ++i) {
    b.tokens.data<int32_t>()[i] = 0;
    b.targets.data<int32_t>()[i] = 0;
    b.positions.data<int32_t>()[i] = static_cast<int32_t>(i % seq_len);
  }
  return b;
}

// An H ('S' base) or R ('L' base) attention layer, or the plain one.
struct Layer {
  std::unique_ptr<SoftmaxAttentionLayer> softmax;
  std::unique_ptr<LightningAttentionLayer> lightning;
  Layer(const ModelDims& dims, bool softmax_kind, bool moh) {
    if (softmax_kind) {
      softmax = std::make_unique<SoftmaxAttentionLayer>(dims, TensorParallel{}, ContextParallel{}, "layers.0.attn.", moh);
    } else {
      lightning = std::make_unique<LightningAttentionLayer>(dims, TensorParallel{}, ContextParallel{}, 0,
                                                            "layers.0.attn.", moh);
    }
  }
  void Forward(const Tensor& x, const Batch& b, Tensor& y) {
    softmax ? softmax->Forward(x, b, y) : lightning->Forward(x, b, y);
  }
  void Backward(const Tensor& x, const Batch& b, const Tensor& dy, Tensor& dx, double scale) {
    softmax ? softmax->Backward(x, b, dy, dx, scale) : lightning->Backward(x, b, dy, dx, scale);
  }
  MohRouter* moh() { return softmax ? softmax->moh() : lightning->moh(); }
  void set_skip(bool skip) {
    softmax ? softmax->set_skip_inactive_heads(skip) : lightning->set_skip_inactive_heads(skip);
  }
  ParamList params() {
    ParamList p;
    softmax ? softmax->CollectParams(p) : lightning->CollectParams(p);
    return p;
  }
};

Param* Named(const ParamList& params, const std::string& suffix) {
  for (Param* p : params)
    if (p->name.size() >= suffix.size() && p->name.compare(p->name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return p;
  return nullptr;
}

// loss = Σ w ⊙ layer(x) + scale · router_loss; x and every parameter checked.
void CheckLayerGradients(const ModelDims& dims, bool softmax_kind, const std::vector<std::string>& must_have) {
  Layer layer(dims, softmax_kind, /*moh=*/true);
  const int64_t rows = 2, seq = 9, t = rows * seq, c = dims.hidden;
  const Batch batch = RowsBatch(rows, seq);
  Tensor x = testing::RandomTensor({t, c}, DType::kF64, 21);
  Tensor w = testing::RandomTensor({t, c}, DType::kF64, 22);
  const double scale = 0.7;
  auto loss = [&] {
    Tensor y = Tensor::Empty({t, c}, DType::kF64);
    layer.Forward(x, batch, y);
    return testing::Dot(w, y) + scale * layer.moh()->router_loss();
  };
  Tensor y = Tensor::Empty({t, c}, DType::kF64), dx = Tensor::Empty({t, c}, DType::kF64);
  layer.Forward(x, batch, y);
  EXPECT_GT(layer.moh()->router_loss(), 0);
  layer.Backward(x, batch, w, dx, scale);
  const ParamList params = layer.params();
  for (const std::string& name : must_have) EXPECT_NE(Named(params, name), nullptr) << name;
  std::vector<testing::GradInput> inputs = {{"x", x, dx}};
  for (Param* p : params) inputs.push_back({p->name, p->value, p->grad});
  testing::ExpectGradientsMatch(loss, inputs, 1e-7);
}

TEST(MohLayer, GradientsMatchFiniteDifferences_SoftmaxHeads) {
  CheckLayerGradients(Dims(), true, {"moh.w_s", "moh.w_r", "moh.w_h", "attn.wq", "attn.wo"});
}

TEST(MohLayer, GradientsMatchFiniteDifferences_LightningHeads) {
  CheckLayerGradients(Dims(), false, {"moh.w_s", "moh.w_r", "moh.w_h", "attn.wq", "attn.wg", "attn.norm"});
}

TEST(MohLayer, GradientsMatchFiniteDifferences_RoutedOnlyAndFixedGates) {
  CheckLayerGradients(Dims({"model.moh.shared_heads=0", "model.moh.top_k=3"}), true, {"moh.w_r"});
  CheckLayerGradients(Dims({"model.moh.fixed_gates=true"}), false, {"moh.w_r"});
}

TEST(MohModel, GradientsMatchFiniteDifferences_HybridWithRecompute) {
  const config::Config c = MohConfig({"model.recompute=1"});
  Model model(ModelDims::FromConfig(c));
  Batch batch = AssociativeRecall(c).MakeBatch(AssociativeRecall::Split::kTrain, 0, 2);
  model_testing::CheckGradients(model, batch, static_cast<double>(batch.CountTargets()), /*max_elements=*/40);
  const auto stats = model.MohStatistics();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[1].first, 1);
  EXPECT_EQ(stats[1].second.assignments, 2 * batch.tokens_count());  // top-2 of 3 routed heads
}

// The gates written out from the weights, independently of MohRouter:
// softmaxes in plain loops and the top-k by sorting (ties to the lower head).
Tensor ExplicitGates(const ModelDims& dims, const ParamList& params, const Tensor& x) {
  const int64_t t = x.dim(0), c = x.dim(1), h = dims.heads, s = dims.moh.shared_heads, r = h - s;
  auto logits = [&](const Param* w, int64_t row, int64_t n) {
    std::vector<double> z(n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < c; ++j) z[i] += w->value.Get(i * c + j) * x.Get(row * c + j);
    const double m = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (double& v : z) sum += v = std::exp(v - m);
    for (double& v : z) v /= sum;
    return z;
  };
  Tensor g = Tensor::Zeros({t, h}, DType::kF64);
  for (int64_t row = 0; row < t; ++row) {
    const std::vector<double> alpha = logits(Named(params, "moh.w_h"), row, 2);
    const std::vector<double> shared = logits(Named(params, "moh.w_s"), row, s);
    const std::vector<double> p = logits(Named(params, "moh.w_r"), row, r);
    for (int64_t i = 0; i < s; ++i) g.data<double>()[row * h + i] = alpha[0] * shared[i];
    std::vector<int64_t> order(r);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    for (int j = 0; j < dims.moh.top_k; ++j) g.data<double>()[row * h + s + order[j]] = alpha[1] * p[order[j]];
  }
  return g;
}

// y = Σ_h g_h · (head h's part of the dense layer's output): the dense
// layer with W_o's columns of the other heads zeroed gives head h's part.
void CheckAgainstDenseTimesGates(bool softmax_kind) {
  const ModelDims dims = Dims();
  Layer moh(dims, softmax_kind, true), dense(dims, softmax_kind, false);
  const int64_t rows = 2, seq = 11, t = rows * seq, c = dims.hidden, hd = dims.heads, d = dims.head_dim;
  const Batch batch = RowsBatch(rows, seq);
  const Tensor x = testing::RandomTensor({t, c}, DType::kF64, 31);
  Tensor y = Tensor::Empty({t, c}, DType::kF64);
  moh.Forward(x, batch, y);
  const Tensor gates = ExplicitGates(dims, moh.params(), x);
  // The router's own gates are the explicit ones.
  const Tensor router_gates = moh.moh()->Forward(x);
  EXPECT_TRUE(testing::AllClose(router_gates, gates, 0, 1e-15));
  Param* wo = Named(dense.params(), "attn.wo");
  const Tensor wo_all = wo->value.Clone();
  Tensor want = Tensor::Zeros({t, c}, DType::kF64);
  for (int64_t h = 0; h < hd; ++h) {
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < hd * d; ++j)
        wo->value.data<double>()[i * hd * d + j] = j / d == h ? wo_all.Get(i * hd * d + j) : 0.0;
    Tensor part = Tensor::Empty({t, c}, DType::kF64);
    dense.Forward(x, batch, part);
    for (int64_t row = 0; row < t; ++row)
      for (int64_t i = 0; i < c; ++i) want.data<double>()[row * c + i] += gates.Get(row * hd + h) * part.Get(row * c + i);
  }
  EXPECT_TRUE(testing::AllClose(y, want, 0, 1e-12));
  // Some routed gates are 0 (top-2 of 3), none of the shared ones.
  int zeros = 0;
  for (int64_t i = 0; i < gates.numel(); ++i) zeros += gates.Get(i) == 0;
  EXPECT_EQ(zeros, t);
}

TEST(MohLayer, RoutedEqualsDenseHeadsTimesExplicitGates_Softmax) { CheckAgainstDenseTimesGates(true); }
TEST(MohLayer, RoutedEqualsDenseHeadsTimesExplicitGates_Lightning) { CheckAgainstDenseTimesGates(false); }

// Every head shared with fixed gates: no router weights, and the model is
// the plain S / L model (same parameter names, same numbers).
TEST(MohModel, AllHeadsSharedWithFixedGatesEqualsPlainAttention) {
  const config::Config moh = MohConfig({"model.moh.shared_heads=4", "model.moh.fixed_gates=true"});
  const config::Config plain = MohConfig({"model.pattern=SL"});
  Model a(ModelDims::FromConfig(moh)), b(ModelDims::FromConfig(plain));
  ASSERT_EQ(a.params().size(), b.params().size());
  for (size_t i = 0; i < a.params().size(); ++i) ASSERT_EQ(a.params()[i]->name, b.params()[i]->name);
  Batch batch = AssociativeRecall(moh).MakeBatch(AssociativeRecall::Split::kTrain, 0, 2);
  const double n = static_cast<double>(batch.CountTargets());
  a.ZeroGrad();
  b.ZeroGrad();
  EXPECT_EQ(a.ForwardBackward(batch, n).loss, b.ForwardBackward(batch, n).loss);
  for (size_t i = 0; i < a.params().size(); ++i)
    EXPECT_TRUE(testing::AllClose(a.params()[i]->grad, b.params()[i]->grad, 0, 0)) << a.params()[i]->name;
  EXPECT_TRUE(a.MohStatistics().empty());
}

// ---- Skipping ----

// Router weights that route by the sign of x[:, 0]: tokens of blocks with
// x0 > 0 keep routed head 2, the others routed head 0; routed head 1 is
// never kept. So whole (head, block) pairs are inactive.
void SteerRouter(Layer& layer, Tensor& x, int64_t block) {
  Param* wr = Named(layer.params(), "moh.w_r");
  ASSERT_NE(wr, nullptr);
  const int64_t c = x.dim(1);
  wr->value.Zero();
  for (int64_t i = 0; i < 3; ++i) wr->value.data<double>()[i * c] = 2.0 * (static_cast<double>(i) - 1.0);
  for (int64_t row = 0; row < x.dim(0); ++row) x.data<double>()[row * c] = (row / block) % 2 == 0 ? 3.0 : -3.0;
}

void CheckSkippingChangesNothing(bool softmax_kind) {
  const ModelDims dims = Dims({"model.moh.top_k=1", "model.lightning_block=8"});
  const int64_t block = softmax_kind ? SoftmaxAttentionLayer::kMohBlock : 8;
  // Rows of 76 tokens: not a multiple of either block size.
  const int64_t rows = 2, seq = 76, t = rows * seq, c = dims.hidden;
  const Batch batch = RowsBatch(rows, seq);
  Tensor x = testing::RandomTensor({t, c}, DType::kF64, 41);
  const Tensor w = testing::RandomTensor({t, c}, DType::kF64, 42);
  Layer skip(dims, softmax_kind, true), full(dims, softmax_kind, true);
  full.set_skip(false);
  SteerRouter(skip, x, block);
  SteerRouter(full, x, block);
  Tensor ys = Tensor::Empty({t, c}, DType::kF64), yf = Tensor::Empty({t, c}, DType::kF64);
  Tensor dxs = Tensor::Empty({t, c}, DType::kF64), dxf = Tensor::Empty({t, c}, DType::kF64);
  skip.Forward(x, batch, ys);
  full.Forward(x, batch, yf);
  // Whole blocks are inactive: routed head 1 everywhere, 0 and 2 in turns.
  const Tensor active = skip.moh()->ActiveMask(block);
  const int64_t blocks = active.dim(1);
  int64_t inactive = 0;
  for (int64_t i = 0; i < active.numel(); ++i) inactive += active.data<int32_t>()[i] == 0;
  EXPECT_GE(inactive, blocks + blocks / 2 - 1) << "blocks " << blocks;
  for (int64_t b = 0; b < blocks; ++b) EXPECT_EQ(active.data<int32_t>()[0 * blocks + b], 1) << "shared head, block " << b;
  skip.Backward(x, batch, w, dxs, 0.9);
  full.Backward(x, batch, w, dxf, 0.9);
  EXPECT_TRUE(testing::AllClose(ys, yf, 0, 1e-12));
  EXPECT_TRUE(testing::AllClose(dxs, dxf, 0, 1e-12));
  const ParamList ps = skip.params(), pf = full.params();
  for (size_t i = 0; i < ps.size(); ++i)
    EXPECT_TRUE(testing::AllClose(ps[i]->grad, pf[i]->grad, 0, 1e-12)) << ps[i]->name;
}

TEST(MohLayer, SkippingInactiveHeadsChangesNothing_Softmax) { CheckSkippingChangesNothing(true); }
TEST(MohLayer, SkippingInactiveHeadsChangesNothing_Lightning) { CheckSkippingChangesNothing(false); }

// A random (head, block) mask. Block size 5 against rows of 13 and 9: blocks
// straddle rows.
Tensor RandomMask(int64_t heads, int64_t tokens, int64_t block, uint64_t seed) {
  const int64_t blocks = (tokens + block - 1) / block;
  const Tensor r = testing::RandomTensor({heads, blocks}, DType::kF64, seed);
  Tensor a = Tensor::Empty({heads, blocks}, DType::kI32);
  for (int64_t i = 0; i < a.numel(); ++i) a.data<int32_t>()[i] = r.Get(i) > -0.2;
  return a;
}

// o with inactive (token, head) rows zeroed.
Tensor Masked(const Tensor& o, const Tensor& active, int64_t block) {
  Tensor m = o.Clone();
  const int64_t t = o.dim(0), h = o.dim(1), d = o.dim(2), blocks = active.dim(1);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < h; ++j)
      if (active.data<int32_t>()[j * blocks + i / block] == 0)
        for (int64_t k = 0; k < d; ++k) m.data<double>()[(i * h + j) * d + k] = 0;
  return m;
}

ops::TokenRows TwoRows() {
  ops::TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector<int32_t>({0, 13, 22}, {3});
  return rows;
}

TEST(SoftmaxAttention, ActiveMaskEqualsZeroedOutputsAndGradients) {
  const int64_t t = 22, hq = 4, hk = 2, d = 6, block = 5;
  const ops::TokenRows rows = TwoRows();
  const Tensor q = testing::RandomTensor({t, hq, d}, DType::kF64, 1), k = testing::RandomTensor({t, hk, d}, DType::kF64, 2);
  const Tensor v = testing::RandomTensor({t, hk, d}, DType::kF64, 3), d_o = testing::RandomTensor({t, hq, d}, DType::kF64, 4);
  ops::AttentionOptions plain;
  ops::AttentionOptions masked = plain;
  masked.active = RandomMask(hq, t, block, 5);
  masked.active_block = block;
  Tensor o0 = Tensor::Empty({t, hq, d}, DType::kF64), l0 = Tensor::Empty({t, hq}, DType::kF64);
  Tensor o1 = Tensor::Empty({t, hq, d}, DType::kF64), l1 = Tensor::Empty({t, hq}, DType::kF64);
  ops::SoftmaxAttentionForward(q, k, v, rows, rows, plain, o0, l0);
  ops::SoftmaxAttentionForward(q, k, v, rows, rows, masked, o1, l1);
  EXPECT_TRUE(testing::AllClose(o1, Masked(o0, masked.active, block), 0, 1e-14));
  // Reference backward: every pair computed, with d_o zeroed where inactive.
  auto grads = [&](const ops::AttentionOptions& opt, const Tensor& o, const Tensor& lse, const Tensor& g) {
    std::vector<Tensor> out = {Tensor::Empty(q.shape(), DType::kF64), Tensor::Empty(k.shape(), DType::kF64),
                               Tensor::Empty(v.shape(), DType::kF64)};
    ops::SoftmaxAttentionBackward(q, k, v, o, lse, g, rows, rows, opt, out[0], out[1], out[2]);
    return out;
  };
  const auto want = grads(plain, o0, l0, Masked(d_o, masked.active, block));
  const auto got = grads(masked, o1, l1, d_o);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(testing::AllClose(got[i], want[i], 0, 1e-13)) << "dq dk dv"[i * 3];
}

TEST(LightningAttention, ActiveMaskEqualsZeroedOutputsAndGradients) {
  const int64_t t = 22, h = 3, d = 4, block = 5;
  const ops::TokenRows rows = TwoRows();
  const Tensor q = testing::RandomTensor({t, h, d}, DType::kF64, 1), k = testing::RandomTensor({t, h, d}, DType::kF64, 2);
  const Tensor v = testing::RandomTensor({t, h, d}, DType::kF64, 3), d_o = testing::RandomTensor({t, h, d}, DType::kF64, 4);
  const Tensor decay = Tensor::FromVector<double>({0.9, 0.8, 1.0}, {h});
  ops::LightningOptions plain;
  plain.block = block;
  ops::LightningOptions masked = plain;
  masked.active = RandomMask(h, t, block, 6);
  Tensor o0, s0, o1, s1;
  ops::LightningAttentionForward(q, k, v, decay, rows, plain, Tensor(), o0, s0);
  ops::LightningAttentionForward(q, k, v, decay, rows, masked, Tensor(), o1, s1);
  EXPECT_TRUE(testing::AllClose(o1, Masked(o0, masked.active, block), 0, 1e-14));
  EXPECT_TRUE(testing::AllClose(s1, s0, 0, 0)) << "the state folds every block's k, v";
  const Tensor ds = testing::RandomTensor(s0.shape(), DType::kF64, 7);
  auto grads = [&](const ops::LightningOptions& opt, const Tensor& g) {
    std::vector<Tensor> out(4);
    out[3] = Tensor::Empty(s0.shape(), DType::kF64);
    ops::LightningAttentionBackward(q, k, v, decay, rows, opt, Tensor(), g, ds, out[0], out[1], out[2], out[3]);
    return out;
  };
  const auto want = grads(plain, Masked(d_o, masked.active, block));
  const auto got = grads(masked, d_o);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(testing::AllClose(got[i], want[i], 0, 1e-13)) << "output " << i;
}

// The dry-run estimate counts the router weights exactly and MoH's
// activations on top of the plain layers'.
TEST(MohModel, MemoryEstimateCountsRouterWeightsAndActivations) {
  const config::Config moh = MohConfig(), plain = MohConfig({"model.pattern=SL"});
  auto layout = MakeLayout(1, moh);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const ModelDims dims = ModelDims::FromConfig(moh);
  auto a = EstimateMemory(dims, MemoryEstimateOptionsFromConfig(moh, *layout));
  auto b = EstimateMemory(ModelDims::FromConfig(plain), MemoryEstimateOptionsFromConfig(plain, *layout));
  ASSERT_TRUE(a.ok() && b.ok());
  Model model(dims);
  int64_t elements = 0;
  for (const Param* p : model.params()) elements += p->value.numel();
  EXPECT_EQ(a->parameters, elements);
  EXPECT_EQ(a->parameters - b->parameters, 2 * dims.MohRouterRows() * dims.hidden);
  EXPECT_EQ(dims.ParameterCount(true), elements);
  EXPECT_GT(a->activation_bytes, b->activation_bytes);
}

TEST(MohConfig, RefusesBadFieldsTakesParallelism) {
  for (const char* bad : {"model.moh.top_k=4", "model.moh.shared_heads=5", "model.moh.aux_loss_coef=-1"}) {
    config::Config c = MohConfig();
    ASSERT_TRUE(ApplyOverride(c, bad).ok()) << bad;
    const absl::Status s = ValidateConfig(c);
    EXPECT_FALSE(s.ok()) << bad;
    const std::string field(std::string(bad).substr(0, std::string(bad).find('=')));
    EXPECT_NE(s.message().find(field), std::string::npos) << s;
  }
  config::Config ok = MohConfig({"model.moh.shared_heads=4", "model.moh.top_k=9"});  // no routed heads: top_k unused
  EXPECT_TRUE(ValidateConfig(ok).ok());
  EXPECT_TRUE(ValidateConfig(MohConfig({"parallel.tp=2"})).ok());  // TP: model/moh.h
  EXPECT_TRUE(ValidateConfig(MohConfig({"parallel.pp=2"})).ok());  // PP: model/pipeline.h
}

}  // namespace
}  // namespace loom
