// Lightning attention on CPU: the decay schedule and the O(n²) definition
// against golden vectors, the block algorithm against the definition, the
// three LASP phases composed over chunks against the fused call, gradients
// against finite differences, f32 against f64.
#include "ops/lightning_attention.h"
#include "ops/lightning_by_document.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "tests/testing.h"

namespace loom::ops {
namespace {

using loom::testing::AllClose;
using loom::testing::Dot;
using loom::testing::ExpectGradientsMatch;
using loom::testing::GoldenCase;
using loom::testing::RandomTensor;
using loom::testing::ReadGolden;

// ---- Building cases ----

// Rows of the given lengths; doc_starts[r] lists the row-local positions
// where row r's documents start (0 implied). Ids restart per row.
TokenRows MakeRows(const std::vector<int>& lengths, const std::vector<std::vector<int>>& doc_starts = {}) {
  TokenRows rows;
  std::vector<int32_t> cu{0};
  for (int n : lengths) cu.push_back(cu.back() + n);
  rows.cu_seqlens = Tensor::FromVector<int32_t>(cu, {static_cast<int64_t>(cu.size())});
  if (!doc_starts.empty()) {
    std::vector<int32_t> ids;
    for (size_t r = 0; r < lengths.size(); ++r) {
      int32_t id = 0;
      for (int i = 0; i < lengths[r]; ++i) {
        if (i > 0 && r < doc_starts.size() &&
            std::find(doc_starts[r].begin(), doc_starts[r].end(), i) != doc_starts[r].end())
          ++id;
        ids.push_back(id);
      }
    }
    rows.doc_ids = Tensor::FromVector<int32_t>(ids, {cu.back()});
  }
  return rows;
}

Tensor DecayTensor(const std::vector<double>& lambdas, DType dtype = DType::kF64) {
  return Tensor::FromVector<double>(lambdas, {static_cast<int64_t>(lambdas.size())}).To(dtype);
}

struct Case {
  TokenRows rows;
  std::vector<double> lambdas;
  Tensor q, k, v, decay, s0;  // s0 undefined: zero initial state
  Tensor d_o, ds_out;         // upstream gradients of o and the final state
};

Case MakeCase(const std::vector<int>& lengths, const std::vector<std::vector<int>>& doc_starts,
              const std::vector<double>& lambdas, int64_t dk, int64_t dv, uint64_t seed, bool with_state,
              DType dtype = DType::kF64) {
  Case c;
  c.rows = MakeRows(lengths, doc_starts);
  c.lambdas = lambdas;
  const int64_t t = c.rows.end(c.rows.rows() - 1), h = static_cast<int64_t>(lambdas.size()), r = c.rows.rows();
  c.q = RandomTensor({t, h, dk}, dtype, seed);
  c.k = RandomTensor({t, h, dk}, dtype, seed + 1);
  c.v = RandomTensor({t, h, dv}, dtype, seed + 2);
  c.decay = DecayTensor(lambdas, dtype);
  if (with_state) c.s0 = RandomTensor({r, h, dk, dv}, dtype, seed + 3);
  c.d_o = RandomTensor({t, h, dv}, dtype, seed + 4);
  c.ds_out = RandomTensor({r, h, dk, dv}, dtype, seed + 5);
  return c;
}

struct Result {
  Tensor o, state;
};

Result Naive(const Case& c) {
  Result r;
  LightningAttentionNaive(c.q, c.k, c.v, c.decay, c.rows, c.s0, r.o, r.state);
  return r;
}

Result Blocks(const Case& c, int block) {
  Result r;
  LightningAttentionForward(c.q, c.k, c.v, c.decay, c.rows, LightningOptions{block}, c.s0, r.o, r.state);
  return r;
}

struct Grads {
  Tensor dq, dk, dv, ds0;
};

Grads Backward(const Case& c, int block) {
  Grads g;
  g.ds0 = Tensor::Empty(c.ds_out.shape(), c.q.dtype());
  LightningAttentionBackward(c.q, c.k, c.v, c.decay, c.rows, LightningOptions{block}, c.s0, c.d_o, c.ds_out, g.dq,
                             g.dk, g.dv, g.ds0);
  return g;
}

double MaxAbs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::abs(t.Get(i)));
  return m;
}

// f64 block vs definition: both sum the same terms in another order.
constexpr double kRtol = 1e-11, kAtol = 1e-12;

void ExpectBlocksMatchNaive(const Case& c, const std::vector<int>& blocks) {
  const Result want = Naive(c);
  for (int block : blocks) {
    SCOPED_TRACE("block " + std::to_string(block));
    const Result got = Blocks(c, block);
    EXPECT_TRUE(AllClose(got.o, want.o, kRtol, kAtol)) << "o";
    EXPECT_TRUE(AllClose(got.state, want.state, kRtol, kAtol)) << "final state";
  }
}

// ---- Decay schedule ----

TEST(LightningAttention, AlibiSlopesMatchGolden) {
  const GoldenCase g = ReadGolden("slopes.txt");
  for (int h : {4, 6, 8, 12, 32}) {
    SCOPED_TRACE("H = " + std::to_string(h));
    const std::vector<double> slopes = AlibiSlopes(h);
    ASSERT_EQ(static_cast<int64_t>(slopes.size()), h);
    EXPECT_TRUE(AllClose(Tensor::FromVector<double>(slopes, {h}), g.t("slopes_H" + std::to_string(h)), 1e-12, 0));
  }
}

TEST(LightningAttention, LightningDecayMatchesGolden) {
  const GoldenCase g = ReadGolden("slopes.txt");
  for (int layer = 0; layer < 4; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    EXPECT_TRUE(AllClose(Tensor::FromVector<double>(LightningDecay(8, layer, 4), {8}),
                         g.t("lambda_H8_L4_layer" + std::to_string(layer)), 1e-12, 0));
  }
}

TEST(LightningAttention, LightningDecayOfOneLayerModelUsesUnscaledSlopes) {
  const std::vector<double> slopes = AlibiSlopes(6), lambdas = LightningDecay(6, 0, 1);
  for (int h = 0; h < 6; ++h) EXPECT_DOUBLE_EQ(lambdas[h], std::exp(-slopes[h])) << "head " << h;
}

// ---- Golden vectors of the definition (one head, N = 37) ----

struct GoldenLightning {
  Case c;
  Tensor o, state, dq, dk, dv, ds0;
};

GoldenLightning LoadGoldenCase(const GoldenCase& g, const std::string& name) {
  GoldenLightning x;
  const Tensor& q = g.t(name + ".q");
  const Tensor& v = g.t(name + ".v");
  const int64_t n = q.dim(0), dk = q.dim(1), dv = v.dim(1);
  std::vector<int> starts;
  const Tensor& ds = g.t(name + ".doc_starts");
  for (int64_t i = 0; i < ds.numel(); ++i) starts.push_back(static_cast<int>(ds.Get(i)));
  x.c.rows = MakeRows({static_cast<int>(n)}, {starts});
  x.c.lambdas = {g.params.at(name + ".lambda")};
  x.c.decay = DecayTensor(x.c.lambdas);
  x.c.q = q.Reshape({n, 1, dk});
  x.c.k = g.t(name + ".k").Reshape({n, 1, dk});
  x.c.v = v.Reshape({n, 1, dv});
  x.c.s0 = g.t(name + ".S0").Reshape({1, 1, dk, dv});
  x.c.d_o = g.t(name + ".do").Reshape({n, 1, dv});
  x.c.ds_out = g.t(name + ".dS_final").Reshape({1, 1, dk, dv});
  x.o = g.t(name + ".o");
  x.state = g.t(name + ".S_final");
  x.dq = g.t(name + ".dq");
  x.dk = g.t(name + ".dk");
  x.dv = g.t(name + ".dv");
  x.ds0 = g.t(name + ".dS0");
  return x;
}

TEST(LightningAttention, NaiveAndBlocksMatchGoldenForwardAndBackward) {
  const GoldenCase g = ReadGolden("lightning.txt");
  constexpr double kGoldenRtol = 1e-11, kGoldenAtol = 1e-12;
  for (const std::string name : {"decay", "nodecay", "docs"}) {
    SCOPED_TRACE("case " + name);
    const GoldenLightning x = LoadGoldenCase(g, name);
    if (name == "docs") {
      ASSERT_TRUE(x.c.rows.has_docs());
    }
    const Result naive = Naive(x.c);
    EXPECT_TRUE(AllClose(naive.o, x.o, kGoldenRtol, kGoldenAtol)) << "naive o";
    EXPECT_TRUE(AllClose(naive.state, x.state, kGoldenRtol, kGoldenAtol)) << "naive S_final";
    for (int block : {1, 5, 8, 16, 37, 64}) {
      SCOPED_TRACE("block " + std::to_string(block));
      const Result r = Blocks(x.c, block);
      EXPECT_TRUE(AllClose(r.o, x.o, kGoldenRtol, kGoldenAtol)) << "o";
      EXPECT_TRUE(AllClose(r.state, x.state, kGoldenRtol, kGoldenAtol)) << "S_final";
      const Grads gr = Backward(x.c, block);
      EXPECT_TRUE(AllClose(gr.dq, x.dq, kGoldenRtol, kGoldenAtol)) << "dq";
      EXPECT_TRUE(AllClose(gr.dk, x.dk, kGoldenRtol, kGoldenAtol)) << "dk";
      EXPECT_TRUE(AllClose(gr.dv, x.dv, kGoldenRtol, kGoldenAtol)) << "dv";
      EXPECT_TRUE(AllClose(gr.ds0, x.ds0, kGoldenRtol, kGoldenAtol)) << "dS0";
    }
  }
}

// ---- Block algorithm vs the definition (f64) ----

TEST(LightningAttention, BlocksMatchNaive_DecayPerBlockBetween03And09) {
  const std::vector<double> lambdas{0.93, 0.96, 0.99};
  for (double l : lambdas) {
    ASSERT_GE(std::pow(l, 16), 0.3);
    ASSERT_LE(std::pow(l, 16), 0.9);
  }
  ExpectBlocksMatchNaive(MakeCase({80}, {}, lambdas, 5, 4, 11, false), {16});
}

TEST(LightningAttention, BlocksMatchNaive_NoDecay) {
  ExpectBlocksMatchNaive(MakeCase({70}, {}, {1.0, 1.0}, 4, 6, 21, true), {7, 16});
}

TEST(LightningAttention, BlocksMatchNaive_LengthNotMultipleOfBlock) {
  ExpectBlocksMatchNaive(MakeCase({37, 53}, {}, {0.9, 0.97, 1.0}, 6, 3, 31, false), {5, 8, 16, 64});
}

TEST(LightningAttention, BlocksMatchNaive_NonZeroInitialState) {
  const Case c = MakeCase({45, 16}, {}, {0.8, 0.95, 1.0}, 4, 5, 41, true);
  ExpectBlocksMatchNaive(c, {1, 8, 16, 64});
  // The state must matter: without it the output differs.
  Case zero = c;
  zero.s0 = Tensor();
  EXPECT_FALSE(AllClose(Naive(zero).o, Naive(c).o, 1e-6, 1e-6));
}

TEST(LightningAttention, BlocksMatchNaive_OnlyInterBlockTermNonZero) {
  // Block 16: q lives in the second block, k and v in the first, so every
  // intra-block product is zero and the output is the carried state alone.
  Case c = MakeCase({32}, {}, {0.9, 0.97}, 4, 3, 51, false);
  const int64_t h = 2, dk = 4, dv = 3;
  for (int64_t t = 0; t < 32; ++t) {
    for (int64_t i = 0; i < h * dk; ++i) (t < 16 ? c.q : c.k).data<double>()[t * h * dk + i] = 0;
    if (t >= 16)
      for (int64_t i = 0; i < h * dv; ++i) c.v.data<double>()[t * h * dv + i] = 0;
  }
  Tensor intra;
  LightningIntraChunk(c.q.Slice(16, 16), c.k.Slice(16, 16), c.v.Slice(16, 16), c.decay, Tensor(), intra);
  EXPECT_EQ(MaxAbs(intra), 0.0) << "second block's intra product should vanish";
  ExpectBlocksMatchNaive(c, {16});
  const Result r = Blocks(c, 16);
  EXPECT_GT(MaxAbs(r.o.Slice(16, 16)), 1e-2) << "inter-block output should be non-zero";
  EXPECT_EQ(MaxAbs(r.o.Slice(0, 16)), 0.0);

  // Its gradients flow only through the carried state too.
  const Grads g = Backward(c, 16);
  EXPECT_GT(MaxAbs(g.dq.Slice(16, 16)), 1e-2);
  EXPECT_GT(MaxAbs(g.dk.Slice(0, 16)), 1e-2);
  ExpectGradientsMatch(
      [&] {
        const Result x = Blocks(c, 16);
        return Dot(x.o, c.d_o) + Dot(x.state, c.ds_out);
      },
      {{"q", c.q, g.dq}, {"k", c.k, g.dk}, {"v", c.v, g.dv}});
}

TEST(LightningAttention, BlocksMatchNaive_VarlenRowsAndDocuments) {
  // Document starts inside blocks, on block starts (16, 32), one-token
  // documents, a one-token row and an empty row (its final state is S0).
  const Case c = MakeCase({37, 1, 0, 64, 20}, {{5, 16, 17, 30}, {}, {}, {32, 40, 41, 63}, {}}, {0.85, 0.95, 1.0},
                          4, 3, 61, true);
  ExpectBlocksMatchNaive(c, {1, 4, 8, 16, 64});
  EXPECT_TRUE(AllClose(Blocks(c, 8).state.Slice(2, 1), c.s0.Slice(2, 1), 0, 1e-300))
      << "an empty row passes its state through";
}

// Each document as a row of its own (what the CUDA kernels run for rows
// with documents) against the fused calls over the rows with doc_ids:
// outputs, final states and every gradient, with and without initial
// states, the same varlen rows and documents as above.
TEST(LightningAttention, ByDocumentMatchesFusedCallsWithDocuments) {
  for (const bool with_state : {true, false}) {
    SCOPED_TRACE(with_state ? "initial states" : "zero initial states");
    const Case c = MakeCase({37, 1, 0, 64, 20}, {{5, 16, 17, 30}, {}, {}, {32, 40, 41, 63}, {}},
                            {0.85, 0.95, 1.0}, 4, 3, 71, with_state);
    for (int block : {4, 16}) {
      SCOPED_TRACE("block " + std::to_string(block));
      const Result want = Blocks(c, block);
      Result got;
      by_document::LightningAttentionForward(c.q, c.k, c.v, c.decay, c.rows, LightningOptions{block}, c.s0, got.o,
                                          got.state);
      EXPECT_TRUE(AllClose(got.o, want.o, kRtol, kAtol)) << "o";
      EXPECT_TRUE(AllClose(got.state, want.state, kRtol, kAtol)) << "final state";
      const Grads want_g = Backward(c, block);
      Grads g;
      g.ds0 = Tensor::Empty(c.ds_out.shape(), c.q.dtype());
      by_document::LightningAttentionBackward(c.q, c.k, c.v, c.decay, c.rows, LightningOptions{block}, c.s0, c.d_o,
                                           c.ds_out, g.dq, g.dk, g.dv, g.ds0);
      EXPECT_TRUE(AllClose(g.dq, want_g.dq, kRtol, kAtol)) << "dq";
      EXPECT_TRUE(AllClose(g.dk, want_g.dk, kRtol, kAtol)) << "dk";
      EXPECT_TRUE(AllClose(g.dv, want_g.dv, kRtol, kAtol)) << "dv";
      EXPECT_TRUE(AllClose(g.ds0, want_g.ds0, kRtol, kAtol)) << "dS0";
    }
  }
}

// The chunk phases on token ranges (what the CUDA kernels run for chunks
// with documents) against the phases over doc_ids: a chunk with a boundary
// inside it, one starting on a boundary, one without boundaries; the
// accumulated outputs start from non-zero values.
TEST(LightningAttention, PhasesByDocumentMatchPhasesWithDocuments) {
  const Case c = MakeCase({50}, {{1, 20, 21, 44}}, {0.85, 0.95, 1.0}, 4, 3, 81, false);
  const Tensor s = RandomTensor({3, 4, 3}, DType::kF64, 91), dm = RandomTensor({3, 4, 3}, DType::kF64, 92);
  for (const auto& [begin, length] : std::vector<std::pair<int64_t, int64_t>>{{0, 50}, {20, 30}, {45, 5}, {22, 0}}) {
    SCOPED_TRACE("chunk [" + std::to_string(begin) + ", " + std::to_string(begin + length) + ")");
    const Tensor q = c.q.Slice(begin, length), k = c.k.Slice(begin, length), v = c.v.Slice(begin, length);
    const Tensor d_o = c.d_o.Slice(begin, length), docs = c.rows.doc_ids.Slice(begin, length);
    const auto start = [&](const Tensor& like, uint64_t seed) { return RandomTensor(like.shape(), DType::kF64, seed); };
    Tensor m_want, m_got;
    EXPECT_EQ(by_document::LightningChunkState(k, v, c.decay, docs, m_got),
              LightningChunkState(k, v, c.decay, docs, m_want));
    EXPECT_TRUE(AllClose(m_got, m_want, kRtol, kAtol)) << "chunk state";
    Tensor o_want, o_got;
    LightningIntraChunk(q, k, v, c.decay, docs, o_want);
    by_document::LightningIntraChunk(q, k, v, c.decay, docs, o_got);
    EXPECT_TRUE(AllClose(o_got, o_want, kRtol, kAtol)) << "intra";
    Tensor inter_want = start(v, 93), inter_got = inter_want.Clone();
    LightningInterChunk(q, c.decay, docs, s, inter_want);
    by_document::LightningInterChunk(q, c.decay, docs, s, inter_got);
    EXPECT_TRUE(AllClose(inter_got, inter_want, kRtol, kAtol)) << "inter";
    Tensor dk_want = start(k, 94), dv_want = start(v, 95), dk_got = dk_want.Clone(), dv_got = dv_want.Clone();
    LightningChunkStateBackward(k, v, c.decay, docs, dm, dk_want, dv_want);
    by_document::LightningChunkStateBackward(k, v, c.decay, docs, dm, dk_got, dv_got);
    EXPECT_TRUE(AllClose(dk_got, dk_want, kRtol, kAtol)) << "chunk state dk";
    EXPECT_TRUE(AllClose(dv_got, dv_want, kRtol, kAtol)) << "chunk state dv";
    Tensor dq_want = start(q, 96), dq_got = dq_want.Clone();
    LightningIntraChunkBackward(q, k, v, c.decay, docs, d_o, dq_want, dk_want, dv_want);
    by_document::LightningIntraChunkBackward(q, k, v, c.decay, docs, d_o, dq_got, dk_got, dv_got);
    EXPECT_TRUE(AllClose(dq_got, dq_want, kRtol, kAtol)) << "intra dq";
    EXPECT_TRUE(AllClose(dk_got, dk_want, kRtol, kAtol)) << "intra dk";
    EXPECT_TRUE(AllClose(dv_got, dv_want, kRtol, kAtol)) << "intra dv";
    Tensor ds_want = RandomTensor(s.shape(), DType::kF64, 97), ds_got = ds_want.Clone();
    LightningInterChunkBackward(q, c.decay, docs, s, d_o, dq_want, ds_want);
    by_document::LightningInterChunkBackward(q, c.decay, docs, s, d_o, dq_got, ds_got);
    EXPECT_TRUE(AllClose(dq_got, dq_want, kRtol, kAtol)) << "inter dq";
    EXPECT_TRUE(AllClose(ds_got, ds_want, kRtol, kAtol)) << "inter ds";
  }
}

// ---- The three phases composed over chunks ----

// λ_h^p · s for s [H, Dk, Dv].
Tensor ScaleHeads(const Tensor& s, const std::vector<double>& lambdas, int64_t p) {
  Tensor out = s.Clone();
  const int64_t per = s.numel() / s.dim(0);
  for (int64_t h = 0; h < s.dim(0); ++h)
    for (int64_t i = 0; i < per; ++i) out.data<double>()[h * per + i] *= std::pow(lambdas[h], p);
  return out;
}

Tensor Add(const Tensor& a, const Tensor& b) {
  Tensor out = a.Clone();
  for (int64_t i = 0; i < a.numel(); ++i) out.data<double>()[i] += b.data<double>()[i];
  return out;
}

// One row cut into chunks of `chunk` tokens. A chunk whose first token starts
// a document enters with a zero state: the phases see only their own chunk,
// so that reset is the caller's (as it is LASP's).
struct Chunks {
  const Case& c;
  int64_t chunk;
  int64_t n() const { return c.q.dim(0); }
  int64_t count() const { return (n() + chunk - 1) / chunk; }
  int64_t begin(int64_t u) const { return u * chunk; }
  int64_t length(int64_t u) const { return std::min(chunk, n() - begin(u)); }
  Tensor docs(int64_t u) const { return c.rows.doc_ids.Slice(begin(u), length(u)); }
  Tensor slice(const Tensor& t, int64_t u) const { return t.Slice(begin(u), length(u)); }
  bool starts_document(int64_t u) const {
    const int32_t* d = c.rows.doc_ids.data<int32_t>();
    return u > 0 && d[begin(u)] != d[begin(u) - 1];
  }
};

TEST(LightningAttention, PhasesChainedLikeLasp1MatchFused) {
  // Document starts: inside chunks, on chunk starts (48, 96, 100, 200) and a
  // one-token document (100). Chunk 100 exceeds the default block (64), so
  // the intra phase also tiles internally.
  const Case c = MakeCase({250}, {{30, 48, 96, 100, 101, 200, 230}}, {0.95, 1.0}, 4, 3, 71, true);
  const int64_t h = 2, dk = 4, dv = 3;
  const Result want = Blocks(c, 16);
  const Grads want_g = Backward(c, 16);
  ASSERT_TRUE(AllClose(want.o, Naive(c).o, kRtol, kAtol));
  for (int64_t chunk : {24, 48, 100}) {
    SCOPED_TRACE("chunk " + std::to_string(chunk));
    const Chunks ch{c, chunk};
    // Forward: LASP-1 passes S along the chunks in order.
    Tensor o = Tensor::Zeros(c.v.shape(), DType::kF64);
    Tensor s = c.s0.Reshape({h, dk, dv}).Clone();
    std::vector<Tensor> entry(ch.count());
    std::vector<bool> boundary(ch.count());
    for (int64_t u = 0; u < ch.count(); ++u) {
      entry[u] = ch.starts_document(u) ? Tensor::Zeros({h, dk, dv}, DType::kF64) : s;
      Tensor ou = ch.slice(o, u);
      LightningIntraChunk(ch.slice(c.q, u), ch.slice(c.k, u), ch.slice(c.v, u), c.decay, ch.docs(u), ou);
      LightningInterChunk(ch.slice(c.q, u), c.decay, ch.docs(u), entry[u], ou);
      Tensor m;
      boundary[u] = LightningChunkState(ch.slice(c.k, u), ch.slice(c.v, u), c.decay, ch.docs(u), m);
      // S_{u+1} = has_boundary ? M_u : λ^C_u E_u + M_u
      s = boundary[u] ? m : Add(ScaleHeads(entry[u], c.lambdas, ch.length(u)), m);
    }
    EXPECT_TRUE(AllClose(o, want.o, kRtol, kAtol)) << "o";
    EXPECT_TRUE(AllClose(s, want.state, kRtol, kAtol)) << "final state";

    // Backward: the chain in reverse, dS flowing from the final state.
    Tensor dq = Tensor::Zeros(c.q.shape(), DType::kF64), dk_ = Tensor::Zeros(c.k.shape(), DType::kF64),
           dv_ = Tensor::Zeros(c.v.shape(), DType::kF64);
    Tensor ds = c.ds_out.Reshape({h, dk, dv}).Clone();
    for (int64_t u = ch.count() - 1; u >= 0; --u) {
      Tensor dqu = ch.slice(dq, u), dku = ch.slice(dk_, u), dvu = ch.slice(dv_, u);
      LightningChunkStateBackward(ch.slice(c.k, u), ch.slice(c.v, u), c.decay, ch.docs(u), ds, dku, dvu);
      Tensor de = boundary[u] ? Tensor::Zeros({h, dk, dv}, DType::kF64) : ScaleHeads(ds, c.lambdas, ch.length(u));
      LightningInterChunkBackward(ch.slice(c.q, u), c.decay, ch.docs(u), entry[u], ch.slice(c.d_o, u), dqu, de);
      LightningIntraChunkBackward(ch.slice(c.q, u), ch.slice(c.k, u), ch.slice(c.v, u), c.decay, ch.docs(u),
                                  ch.slice(c.d_o, u), dqu, dku, dvu);
      ds = ch.starts_document(u) ? Tensor::Zeros({h, dk, dv}, DType::kF64) : de;
    }
    EXPECT_TRUE(AllClose(dq, want_g.dq, kRtol, kAtol)) << "dq";
    EXPECT_TRUE(AllClose(dk_, want_g.dk, kRtol, kAtol)) << "dk";
    EXPECT_TRUE(AllClose(dv_, want_g.dv, kRtol, kAtol)) << "dv";
    EXPECT_TRUE(AllClose(ds, want_g.ds0, kRtol, kAtol)) << "dS0";
  }
}

TEST(LightningAttention, PhasesGatheredLikeLasp2MatchFused) {
  // LASP-2: every chunk's M_u and boundary flag first (the all-gather), then
  // S_t = Σ_{u0≤u<t} λ^(C(t−1−u)) M_u (+ λ^(C·t) S0 while still in the first
  // document), the sum stopping at the nearest chunk u0 with a boundary or a
  // document start.
  const Case c = MakeCase({240}, {{30, 96, 97, 150}}, {0.97, 0.995, 1.0}, 4, 3, 81, true);
  const int64_t h = 3, dk = 4, dv = 3, chunk = 48;
  const Chunks ch{c, chunk};
  ASSERT_EQ(c.q.dim(0) % chunk, 0);
  std::vector<Tensor> m(ch.count());
  std::vector<bool> stops(ch.count());
  for (int64_t u = 0; u < ch.count(); ++u)
    stops[u] = LightningChunkState(ch.slice(c.k, u), ch.slice(c.v, u), c.decay, ch.docs(u), m[u]) ||
               ch.starts_document(u);
  Tensor o = Tensor::Zeros(c.v.shape(), DType::kF64);
  for (int64_t t = 0; t < ch.count(); ++t) {
    Tensor s = Tensor::Zeros({h, dk, dv}, DType::kF64);
    if (!ch.starts_document(t)) {
      int64_t u = t - 1;
      for (; u >= 0; --u) {
        s = Add(s, ScaleHeads(m[u], c.lambdas, chunk * (t - 1 - u)));
        if (stops[u]) break;
      }
      if (u < 0) s = Add(s, ScaleHeads(c.s0.Reshape({h, dk, dv}), c.lambdas, chunk * t));
    }
    Tensor ot = ch.slice(o, t);
    LightningIntraChunk(ch.slice(c.q, t), ch.slice(c.k, t), ch.slice(c.v, t), c.decay, ch.docs(t), ot);
    LightningInterChunk(ch.slice(c.q, t), c.decay, ch.docs(t), s, ot);
  }
  EXPECT_TRUE(AllClose(o, Naive(c).o, kRtol, kAtol));
  EXPECT_TRUE(AllClose(o, Blocks(c, 64).o, kRtol, kAtol));
}

TEST(LightningAttention, PhaseBackwardsAccumulate) {
  const Case c = MakeCase({12}, {{7}}, {0.9, 1.0}, 3, 2, 91, false);
  const Tensor s = RandomTensor({2, 3, 2}, DType::kF64, 92);
  const Tensor dm = RandomTensor({2, 3, 2}, DType::kF64, 93);
  // Calling a backward twice from zero must give twice its gradients.
  auto twice = [](const std::function<void(std::vector<Tensor>&)>& f) {
    std::vector<Tensor> grads(3);
    f(grads);
    std::vector<Tensor> once;
    for (const Tensor& g : grads) once.push_back(g.defined() ? g.Clone() : Tensor());
    f(grads);
    ::testing::AssertionResult all = ::testing::AssertionSuccess();
    for (size_t i = 0; i < grads.size() && all; ++i)
      if (grads[i].defined()) all = AllClose(grads[i], Add(once[i], once[i]), 1e-14, 1e-300);
    return all;
  };
  EXPECT_TRUE(twice([&](std::vector<Tensor>& g) {
    LightningChunkStateBackward(c.k, c.v, c.decay, c.rows.doc_ids, dm, g[0], g[1]);
  }));
  EXPECT_TRUE(twice([&](std::vector<Tensor>& g) {
    LightningInterChunkBackward(c.q, c.decay, c.rows.doc_ids, s, c.d_o, g[0], g[1]);
  }));
  EXPECT_TRUE(twice([&](std::vector<Tensor>& g) {
    LightningIntraChunkBackward(c.q, c.k, c.v, c.decay, c.rows.doc_ids, c.d_o, g[0], g[1], g[2]);
  }));
}

// ---- Gradients against finite differences (f64) ----

TEST(LightningAttention, FusedGradientsMatchFiniteDifferences) {
  for (int block : {4, 64}) {
    SCOPED_TRACE("block " + std::to_string(block));
    const Case c = MakeCase({13, 9}, {{4, 8, 9}, {6}}, {0.8, 1.0}, 3, 2, 101, true);
    const Grads g = Backward(c, block);
    ExpectGradientsMatch(
        [&] {
          const Result r = Blocks(c, block);
          return Dot(r.o, c.d_o) + Dot(r.state, c.ds_out);
        },
        {{"q", c.q, g.dq}, {"k", c.k, g.dk}, {"v", c.v, g.dv}, {"S0", c.s0, g.ds0}});
  }
}

TEST(LightningAttention, ChunkStateGradientsMatchFiniteDifferences) {
  const Case c = MakeCase({11}, {{3}}, {0.85, 1.0}, 3, 2, 111, false);
  const Tensor dm = RandomTensor({2, 3, 2}, DType::kF64, 112);
  Tensor dk, dv;
  LightningChunkStateBackward(c.k, c.v, c.decay, c.rows.doc_ids, dm, dk, dv);
  ExpectGradientsMatch(
      [&] {
        Tensor m;
        LightningChunkState(c.k, c.v, c.decay, c.rows.doc_ids, m);
        return Dot(m, dm);
      },
      {{"k", c.k, dk}, {"v", c.v, dv}});
}

TEST(LightningAttention, IntraChunkGradientsMatchFiniteDifferences) {
  // 75 tokens: longer than the default block, with a document starting on
  // the block boundary (64).
  const Case c = MakeCase({75}, {{20, 64, 70}}, {0.9, 1.0}, 3, 2, 121, false);
  Tensor dq, dk, dv;
  LightningIntraChunkBackward(c.q, c.k, c.v, c.decay, c.rows.doc_ids, c.d_o, dq, dk, dv);
  ExpectGradientsMatch(
      [&] {
        Tensor o;
        LightningIntraChunk(c.q, c.k, c.v, c.decay, c.rows.doc_ids, o);
        return Dot(o, c.d_o);
      },
      {{"q", c.q, dq}, {"k", c.k, dk}, {"v", c.v, dv}});
}

TEST(LightningAttention, InterChunkGradientsMatchFiniteDifferences) {
  const Case c = MakeCase({9}, {{5}}, {0.7, 1.0}, 3, 2, 131, false);
  const Tensor s = RandomTensor({2, 3, 2}, DType::kF64, 132);
  Tensor dq, ds;
  LightningInterChunkBackward(c.q, c.decay, c.rows.doc_ids, s, c.d_o, dq, ds);
  ExpectGradientsMatch(
      [&] {
        Tensor o = Tensor::Zeros(c.d_o.shape(), DType::kF64);
        LightningInterChunk(c.q, c.decay, c.rows.doc_ids, s, o);
        return Dot(o, c.d_o);
      },
      {{"q", c.q, dq}, {"S", s, ds}});
}

// ---- f32 against f64 ----

TEST(LightningAttention, F32MatchesF64) {
  const std::vector<double> lambdas = LightningDecay(4, 0, 2);
  const Case c64 = MakeCase({300, 300}, {{}, {100, 128, 250}}, lambdas, 32, 32, 141, true);
  Case c32 = c64;
  for (Tensor* t : {&c32.q, &c32.k, &c32.v, &c32.decay, &c32.s0, &c32.d_o, &c32.ds_out}) *t = t->To(DType::kF32);
  const Result r64 = Blocks(c64, 64), r32 = Blocks(c32, 64);
  const Grads g64 = Backward(c64, 64), g32 = Backward(c32, 64);
  auto close = [](const Tensor& a, const Tensor& b) { return AllClose(a, b, 1e-4, 1e-5 * MaxAbs(b)); };
  EXPECT_TRUE(close(r32.o, r64.o)) << "o";
  EXPECT_TRUE(close(r32.state, r64.state)) << "final state";
  EXPECT_TRUE(close(g32.dq, g64.dq)) << "dq";
  EXPECT_TRUE(close(g32.dk, g64.dk)) << "dk";
  EXPECT_TRUE(close(g32.dv, g64.dv)) << "dv";
  EXPECT_TRUE(close(g32.ds0, g64.ds0)) << "dS0";
}

// ---- Argument checks ----

TEST(LightningAttentionDeathTest, RejectsMismatchedShapes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const Case c = MakeCase({8}, {}, {0.9}, 3, 2, 151, false);
  Tensor o, s;
  const Tensor short_k = c.k.Slice(0, 7);
  EXPECT_DEATH(LightningAttentionForward(c.q, short_k, c.v, c.decay, c.rows, {}, Tensor(), o, s),
               "\\[lightning_attention\\] k is");
  const Tensor bad_decay = DecayTensor({1.5});
  EXPECT_DEATH(LightningAttentionForward(c.q, c.k, c.v, bad_decay, c.rows, {}, Tensor(), o, s),
               "\\[lightning_attention\\] decay\\[0\\]");
  const TokenRows too_short = MakeRows({7});
  EXPECT_DEATH(LightningAttentionNaive(c.q, c.k, c.v, c.decay, too_short, Tensor(), o, s),
               "\\[lightning_attention\\] cu_seqlens");
}

}  // namespace
}  // namespace loom::ops
