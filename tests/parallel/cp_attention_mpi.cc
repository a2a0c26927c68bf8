// Context-parallel softmax/sigmoid attention (parallel/cp_attention.h): ring,
// allgather and ulysses over zig-zag chunks equal the single-process op on
// the full rows in f64 (o, lse, dq, dk, dv within 1e-10), for cp = 2, 4, 8
// through split groups, with GQA, packed documents crossing chunk and rank
// boundaries, sigmoid, a case where only other ranks' keys contribute, and
// counters that show what each scheme sends and holds.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "ops/softmax_attention.h"
#include "parallel/cp_attention.h"
#include "tests/mpi_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

constexpr double kTol = 1e-10;

struct Case {
  CpSoftmaxScheme scheme = CpSoftmaxScheme::kRing;
  int64_t rows = 2, chunk = 2, hq = 4, hk = 2, d = 4;
  bool docs = false;
  bool sigmoid = false;
  bool keep_gathered = false;
  bool cross_only = false;  // v is zero outside global chunk 0
};

// Global doc ids of a row of n tokens cut into chunks of c: a document that
// spans several chunks and ranks, a start exactly on a chunk boundary (2c)
// and one inside a chunk; row 1 differs from row 0.
Tensor Docs(int64_t rows, int64_t n, int64_t c) {
  Tensor docs = Tensor::Empty({rows * n}, DType::kI32);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> starts = r % 2 == 0 ? std::vector<int64_t>{2 * c, 2 * c + c / 2 + 1, n - 1}
                                             : std::vector<int64_t>{c + 1, n - c};
    int32_t id = 0;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t s : starts)
        if (t == s && t > 0) ++id;
      docs.data<int32_t>()[r * n + t] = id;
    }
  }
  return docs;
}

struct Global {
  Tensor q, k, v, d_o, o, lse, dq, dk, dv, docs;
  ops::TokenRows rows;
};

Global Reference(const Case& c, int cp, const ops::AttentionOptions& opt) {
  const int64_t n = 2 * cp * c.chunk, t = c.rows * n;
  Global g;
  g.q = testing::RandomTensor({t, c.hq, c.d}, DType::kF64, 11 + cp);
  g.k = testing::RandomTensor({t, c.hk, c.d}, DType::kF64, 12 + cp);
  g.v = testing::RandomTensor({t, c.hk, c.d}, DType::kF64, 13 + cp);
  g.d_o = testing::RandomTensor({t, c.hq, c.d}, DType::kF64, 14 + cp);
  if (c.cross_only)
    for (int64_t r = 0; r < c.rows; ++r)
      g.v.Slice(r * n + c.chunk, n - c.chunk).Zero();
  g.rows = ops::TokenRows::Uniform(c.rows, n);
  if (c.docs) g.rows.doc_ids = Docs(c.rows, n, c.chunk);
  g.o = Tensor::Empty(g.q.shape(), DType::kF64);
  g.lse = Tensor::Empty({t, c.hq}, DType::kF64);
  ops::SoftmaxAttentionForward(g.q, g.k, g.v, g.rows, g.rows, opt, g.o, g.lse);
  g.dq = Tensor::Empty(g.q.shape(), DType::kF64);
  g.dk = Tensor::Empty(g.k.shape(), DType::kF64);
  g.dv = Tensor::Empty(g.v.shape(), DType::kF64);
  ops::SoftmaxAttentionBackward(g.q, g.k, g.v, g.o, g.lse, g.d_o, g.rows, g.rows, opt, g.dq, g.dk, g.dv);
  return g;
}

struct CaseRun {
  CommCounters forward, backward;
  std::vector<CommEvent> trace;
  CpMemoryLedger ledger;
};

// Runs case c on every cp group that fits the world; checks equality on
// each rank and hands the counters of each group's rank to `inspect`.
template <typename Inspect>
void RunCase(const Case& c, Inspect inspect) {
  int checked = 0;  // cp groups this rank took part in
  for (int cp : {1, 2, 4, 8}) {  // cp = 1: the schemes degenerate to one process
    if (cp > testing::World().size()) continue;
    std::unique_ptr<Communicator> group = testing::FirstRanks(cp);
    if (!group) continue;
    SCOPED_TRACE(::testing::Message() << CpSoftmaxSchemeName(c.scheme) << " cp=" << cp << " rank=" << group->rank()
                                      << (c.docs ? " docs" : "") << (c.sigmoid ? " sigmoid" : "")
                                      << (c.cross_only ? " cross-only" : ""));
    ops::AttentionOptions opt;
    opt.sigmoid = c.sigmoid;
    opt.sigmoid_bias = c.sigmoid ? -std::log(64.0) : 0;
    const Global g = Reference(c, cp, opt);
    const int64_t n = 2 * cp * c.chunk;
    auto local = [&](const Tensor& x) { return ZigzagSlice(x, c.rows, n, cp, group->rank()); };
    auto chunks = ZigzagChunks(c.rows, n, cp, group->rank(), g.rows.doc_ids);
    ASSERT_TRUE(chunks.ok()) << chunks.status();  // local: no collective has started yet
    ops::TokenRows rows = ops::TokenRows::Uniform(c.rows, 2 * c.chunk);
    if (c.docs) rows.doc_ids = local(g.rows.doc_ids);
    CaseRun run;
    group->set_trace(&run.trace);
    CpAttentionOptions cpo{c.scheme, c.keep_gathered, &run.ledger};
    Tensor q = local(g.q), k = local(g.k), v = local(g.v), d_o = local(g.d_o), o, lse, dq, dk, dv;
    CpAttentionSaved saved;
    group->ResetCounters();
    absl::Status s = CpAttentionForward(*group, cpo, *chunks, q, k, v, rows, opt, o, lse, &saved);
    EXPECT_TRUE(s.ok()) << s;
    run.forward = group->counters();
    group->ResetCounters();
    s = CpAttentionBackward(*group, cpo, *chunks, q, k, v, o, lse, d_o, rows, opt, &saved, dq, dk, dv);
    EXPECT_TRUE(s.ok()) << s;
    run.backward = group->counters();
    group->set_trace(nullptr);
    EXPECT_TRUE(testing::AllClose(o, local(g.o), 0, kTol)) << "o";
    if (!c.sigmoid) {
      EXPECT_TRUE(testing::AllClose(lse, local(g.lse), 0, kTol)) << "lse";
    }
    EXPECT_TRUE(testing::AllClose(dq, local(g.dq), 0, kTol)) << "dq";
    EXPECT_TRUE(testing::AllClose(dk, local(g.dk), 0, kTol)) << "dk";
    EXPECT_TRUE(testing::AllClose(dv, local(g.dv), 0, kTol)) << "dv";
    EXPECT_EQ(run.ledger.current, 0) << "buffers still counted after backward";
    EXPECT_EQ(saved.bytes(), 0) << "saved tensors left after backward";
    if (c.cross_only && group->rank() > 0) {
      // This rank's values are all zero: every output comes from rank 0's chunk.
      double largest = 0;
      for (int64_t i = 0; i < o.numel(); ++i) largest = std::max(largest, std::abs(o.Get(i)));
      EXPECT_GT(largest, 0.05) << "cross-chunk output vanished: the case would prove nothing";
      int64_t nonzero = 0;
      for (int64_t i = 0; i < v.numel(); ++i) nonzero += v.Get(i) != 0.0;
      EXPECT_EQ(nonzero, 0) << "this rank's v should be zero";
    }
    inspect(cp, *group, c, run);
    ++checked;
  }
  // Every world has at least 2 ranks and rank 0 is in every group.
  if (testing::World().rank() == 0) {
    EXPECT_GE(checked, 1) << "no cp group ran";
  }
}

void NoInspect(int, Communicator&, const Case&, const CaseRun&) {}

TEST(CpAttention, RingMatchesSerial) {
  for (bool docs : {false, true}) {
    Case c;
    c.docs = docs;
    RunCase(c, NoInspect);
  }
}

TEST(CpAttention, AllGatherMatchesSerial) {
  for (bool keep : {false, true}) {
    Case c;
    c.scheme = CpSoftmaxScheme::kAllGather;
    c.docs = true;
    c.keep_gathered = keep;
    RunCase(c, NoInspect);
  }
}

TEST(CpAttention, UlyssesMatchesSerial) {
  for (bool docs : {false, true}) {
    Case c;
    c.scheme = CpSoftmaxScheme::kUlysses;
    c.docs = docs;
    c.hq = 16;  // heads and KV heads divisible by every cp in {2, 4, 8}
    c.hk = 8;
    RunCase(c, NoInspect);
  }
}

TEST(CpAttention, SigmoidMatchesSerialInEveryScheme) {
  for (CpSoftmaxScheme scheme : {CpSoftmaxScheme::kRing, CpSoftmaxScheme::kAllGather, CpSoftmaxScheme::kUlysses}) {
    Case c;
    c.scheme = scheme;
    c.sigmoid = true;
    c.docs = true;
    if (scheme == CpSoftmaxScheme::kUlysses) c.hq = c.hk = 8;
    RunCase(c, NoInspect);
  }
}

TEST(CpAttention, OnlyOtherChunksContribute) {
  for (CpSoftmaxScheme scheme : {CpSoftmaxScheme::kRing, CpSoftmaxScheme::kAllGather}) {
    Case c;
    c.scheme = scheme;
    c.cross_only = true;
    c.chunk = 3;
    RunCase(c, NoInspect);
  }
}

TEST(CpAttention, RingSendsOnlyChunkBlocksAndHoldsNoFullSequence) {
  Case c;
  c.chunk = 3;
  c.hk = 1;  // GQA 4:1
  RunCase(c, [](int cp, Communicator& g, const Case& c, const CaseRun& run) {
    if (cp == 1) {
      EXPECT_TRUE(run.trace.empty()) << "one rank sends nothing";
      return;
    }
    const int64_t block = c.chunk * c.hk * c.d * 8;  // bytes of one chunk of one row's K or V
    int64_t sends = 0;
    for (const CommEvent& e : run.trace) {
      EXPECT_TRUE(e.op == CommOp::kSend || e.op == CommOp::kRecv) << CommOpName(e.op);
      EXPECT_EQ(e.bytes, block) << CommOpName(e.op) << " to/from " << e.peer;
      if (e.op == CommOp::kSend) {
        ++sends;
        EXPECT_EQ(e.peer, (g.rank() + 1) % cp) << "ring sends go to the next rank";
      }
    }
    // Forward: K and V of 2·rows blocks per hop, cp−1 hops; backward: the
    // same plus dK and dV for cp hops.
    const int64_t per_hop = 2 * c.rows * 2;
    EXPECT_EQ(run.forward.Calls(CommOp::kSend), per_hop * (cp - 1));
    EXPECT_EQ(run.backward.Calls(CommOp::kSend), per_hop * (cp - 1) + per_hop * cp);
    EXPECT_EQ(sends, run.forward.Calls(CommOp::kSend) + run.backward.Calls(CommOp::kSend));
    // No buffer holds more than one chunk's tokens; the full sequence's K
    // would be rows·N tokens.
    EXPECT_LE(run.ledger.largest_tokens, c.chunk);
    const int64_t full_qkv = c.rows * 2 * cp * c.chunk * (c.hq + 2 * c.hk) * c.d * 8;
    EXPECT_LT(run.ledger.largest, full_qkv / 2);
  });
}

TEST(CpAttention, AllGatherMakesOneGatherAndOneReduceScatter) {
  for (bool keep : {false, true}) {
    Case c;
    c.scheme = CpSoftmaxScheme::kAllGather;
    c.keep_gathered = keep;
    RunCase(c, [](int cp, Communicator&, const Case& c, const CaseRun& run) {
      const int64_t kv_local = 2 * c.rows * 2 * c.chunk * c.hk * c.d * 8;  // [K|V] of the local tokens
      EXPECT_EQ(run.forward.Calls(CommOp::kAllGather), 1);
      EXPECT_EQ(run.forward.Bytes(CommOp::kAllGather), kv_local);
      EXPECT_EQ(run.backward.Calls(CommOp::kAllGather), c.keep_gathered ? 0 : 1);
      EXPECT_EQ(run.backward.Calls(CommOp::kReduceScatter), 1);
      EXPECT_EQ(run.backward.Bytes(CommOp::kReduceScatter), kv_local * cp);
      EXPECT_EQ(run.forward.Calls(CommOp::kSend) + run.backward.Calls(CommOp::kSend), 0);
    });
  }
}

TEST(CpAttention, UlyssesMakesTwoAllToAllsEachWay) {
  Case c;
  c.scheme = CpSoftmaxScheme::kUlysses;
  c.hq = c.hk = 8;
  RunCase(c, [](int, Communicator&, const Case&, const CaseRun& run) {
    EXPECT_EQ(run.forward.Calls(CommOp::kAllToAll), 2);   // [q|k|v] there, [o|lse] back
    EXPECT_EQ(run.backward.Calls(CommOp::kAllToAll), 2);  // d_o there, [dq|dk|dv] back
    EXPECT_EQ(run.forward.Calls(CommOp::kAllGather) + run.backward.Calls(CommOp::kAllGather), 0);
  });
}

TEST(CpAttention, UlyssesRefusesHeadsNotDivisibleByCp) {
  const absl::Status s = CheckCpAttention(CpSoftmaxScheme::kUlysses, 4, 6, 2);
  ASSERT_FALSE(s.ok());
  const std::string m(s.message());
  EXPECT_NE(m.find("model.heads = 6"), std::string::npos) << m;
  EXPECT_NE(m.find("model.kv_heads = 2"), std::string::npos) << m;
  EXPECT_NE(m.find("parallel.cp = 4"), std::string::npos) << m;
  EXPECT_NE(m.find("ring or allgather"), std::string::npos) << m;
  EXPECT_TRUE(CheckCpAttention(CpSoftmaxScheme::kRing, 4, 6, 2).ok());
  // The forward refuses before any message is sent.
  if (testing::World().size() >= 2) {
    std::unique_ptr<Communicator> g = testing::FirstRanks(2);
    if (g) {
      auto chunks = ZigzagChunks(1, 8, 2, g->rank());
      ASSERT_TRUE(chunks.ok());
      Tensor q = Tensor::Zeros({4, 3, 4}, DType::kF64), k = Tensor::Zeros({4, 1, 4}, DType::kF64), o, lse;
      const absl::Status f = CpAttentionForward(*g, {CpSoftmaxScheme::kUlysses}, *chunks, q, k, k,
                                                ops::TokenRows::Uniform(1, 4), {}, o, lse, nullptr);
      EXPECT_FALSE(f.ok());
      EXPECT_NE(std::string(f.message()).find("divisible by parallel.cp = 2"), std::string::npos) << f;
      EXPECT_EQ(g->counters().Calls(CommOp::kAllToAll), 0);
    }
  }
}

TEST(CpAttention, ZigzagGatherRestoresGlobalOrder) {
  for (int cp : {2, 4, 8}) {
    if (cp > testing::World().size()) continue;
    std::unique_ptr<Communicator> g = testing::FirstRanks(cp);
    if (!g) continue;
    const int64_t rows = 2, n = 4 * cp;
    Tensor global = testing::RandomTensor({rows * n, 3}, DType::kF64, 5);
    auto chunks = ZigzagChunks(rows, n, cp, g->rank());
    ASSERT_TRUE(chunks.ok());
    auto back = ZigzagGather(*g, ZigzagSlice(global, rows, n, cp, g->rank()), *chunks);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(testing::AllClose(*back, global, 0, 0));
  }
}

}  // namespace
}  // namespace loom
