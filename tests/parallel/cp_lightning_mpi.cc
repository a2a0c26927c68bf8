// Context-parallel lightning attention (parallel/cp_lightning.h): lasp1 and
// lasp2 over zig-zag chunks equal the single-process op on the full rows in
// f64 (o, dq, dk, dv within 1e-10) for cp = 2, 4, 8 through split groups,
// for λ = 1 and λ^C in [0.3, 0.9], with packed documents crossing chunk and
// rank boundaries, a case where only the state from earlier chunks reaches a
// rank's outputs, and counters: lasp2 makes one forward all-gather of 2·cp
// states per row and one backward collective; lasp1 only point-to-point
// messages of one state.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "ops/lightning_attention.h"
#include "parallel/cp_lightning.h"
#include "tests/mpi_testing.h"
#include "tests/testing.h"

namespace loom {
namespace {

constexpr double kTol = 1e-10;

struct Case {
  CpLinearScheme scheme = CpLinearScheme::kLasp2;
  int64_t rows = 2, chunk = 3, h = 3, dk = 4, dv = 5;
  bool decay = true;        // λ_h^C = 0.3, 0.6, 0.9; else λ = 1
  bool docs = false;
  bool cross_only = false;  // v zero outside global chunk 0
};

// Documents: one spanning chunks and ranks, a start exactly on a chunk
// boundary (2C), one inside a chunk; row 1 differs.
Tensor Docs(int64_t rows, int64_t n, int64_t c) {
  Tensor docs = Tensor::Empty({rows * n}, DType::kI32);
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<int64_t> starts =
        r % 2 == 0 ? std::vector<int64_t>{2 * c, 2 * c + c / 2 + 1, n - 1} : std::vector<int64_t>{c + 1, n - c};
    int32_t id = 0;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t s : starts) id += t == s;
      docs.data<int32_t>()[r * n + t] = id;
    }
  }
  return docs;
}

struct LinearRun {
  CommCounters forward, backward;
  std::vector<CommEvent> trace;
};

template <typename Inspect>
void RunCase(const Case& c, Inspect inspect) {
  int checked = 0;
  for (int cp : {1, 2, 4, 8}) {  // cp = 1: the schemes degenerate to one process
    if (cp > testing::World().size()) continue;
    std::unique_ptr<Communicator> group = testing::FirstRanks(cp);
    if (!group) continue;
    SCOPED_TRACE(::testing::Message() << CpLinearSchemeName(c.scheme) << " cp=" << cp << " rank=" << group->rank()
                                      << (c.decay ? " decay" : " lambda=1") << (c.docs ? " docs" : "")
                                      << (c.cross_only ? " cross-only" : ""));
    const int64_t n = 2 * cp * c.chunk, t = c.rows * n;
    Tensor q = testing::RandomTensor({t, c.h, c.dk}, DType::kF64, 21 + cp);
    Tensor k = testing::RandomTensor({t, c.h, c.dk}, DType::kF64, 22 + cp);
    Tensor v = testing::RandomTensor({t, c.h, c.dv}, DType::kF64, 23 + cp);
    Tensor d_o = testing::RandomTensor({t, c.h, c.dv}, DType::kF64, 24 + cp);
    if (c.cross_only)
      for (int64_t r = 0; r < c.rows; ++r) v.Slice(r * n + c.chunk, n - c.chunk).Zero();
    Tensor decay = Tensor::Empty({c.h}, DType::kF64);
    const double targets[3] = {0.3, 0.6, 0.9};  // λ^C
    for (int64_t h = 0; h < c.h; ++h)
      decay.data<double>()[h] = c.decay ? std::pow(targets[h % 3], 1.0 / static_cast<double>(c.chunk)) : 1.0;
    ops::TokenRows rows = ops::TokenRows::Uniform(c.rows, n);
    if (c.docs) rows.doc_ids = Docs(c.rows, n, c.chunk);
    // The single-process reference on the full rows.
    Tensor o_ref, state, dq_ref, dk_ref, dv_ref, no_state;
    ops::LightningAttentionForward(q, k, v, decay, rows, {}, Tensor(), o_ref, state);
    ops::LightningAttentionBackward(q, k, v, decay, rows, {}, Tensor(), d_o, Tensor(), dq_ref, dk_ref, dv_ref,
                                    no_state);

    auto local = [&](const Tensor& x) { return ZigzagSlice(x, c.rows, n, cp, group->rank()); };
    auto chunks = ZigzagChunks(c.rows, n, cp, group->rank(), rows.doc_ids);
    ASSERT_TRUE(chunks.ok()) << chunks.status();
    ops::TokenRows lrows = ops::TokenRows::Uniform(c.rows, 2 * c.chunk);
    if (c.docs) lrows.doc_ids = local(rows.doc_ids);
    Tensor lq = local(q), lk = local(k), lv = local(v), ldo = local(d_o), o, dq, dk, dv;
    CpMemoryLedger ledger;
    CpLightningOptions opt{c.scheme, &ledger};
    CpLightningSaved saved;
    LinearRun run;
    group->set_trace(&run.trace);
    group->ResetCounters();
    absl::Status s = CpLightningForward(*group, opt, *chunks, lq, lk, lv, decay, lrows, o, &saved);
    EXPECT_TRUE(s.ok()) << s;
    run.forward = group->counters();
    group->ResetCounters();
    s = CpLightningBackward(*group, opt, *chunks, lq, lk, lv, decay, lrows, ldo, &saved, dq, dk, dv);
    EXPECT_TRUE(s.ok()) << s;
    run.backward = group->counters();
    group->set_trace(nullptr);
    EXPECT_TRUE(testing::AllClose(o, local(o_ref), 0, kTol)) << "o";
    EXPECT_TRUE(testing::AllClose(dq, local(dq_ref), 0, kTol)) << "dq";
    EXPECT_TRUE(testing::AllClose(dk, local(dk_ref), 0, kTol)) << "dk";
    EXPECT_TRUE(testing::AllClose(dv, local(dv_ref), 0, kTol)) << "dv";
    EXPECT_EQ(ledger.current, 0) << "buffers still counted after backward";
    if (c.cross_only && group->rank() > 0) {
      // This rank's v is zero: its outputs come only from earlier chunks' state.
      int64_t nonzero = 0;
      for (int64_t i = 0; i < lv.numel(); ++i) nonzero += lv.Get(i) != 0.0;
      EXPECT_EQ(nonzero, 0);
      double largest = 0;
      for (int64_t i = 0; i < o.numel(); ++i) largest = std::max(largest, std::abs(o.Get(i)));
      EXPECT_GT(largest, 1e-6) << "the cross-chunk term vanished: the case would prove nothing";
    }
    inspect(cp, *group, c, run);
    ++checked;
  }
  if (testing::World().rank() == 0) {
    EXPECT_GE(checked, 1) << "no cp group ran";
  }
}

void NoInspect(int, Communicator&, const Case&, const LinearRun&) {}

TEST(CpLightning, Lasp1MatchesSerial) {
  for (bool decay : {false, true})
    for (bool docs : {false, true}) {
      Case c;
      c.scheme = CpLinearScheme::kLasp1;
      c.decay = decay;
      c.docs = docs;
      RunCase(c, NoInspect);
    }
}

TEST(CpLightning, Lasp2MatchesSerial) {
  for (bool decay : {false, true})
    for (bool docs : {false, true}) {
      Case c;
      c.decay = decay;
      c.docs = docs;
      RunCase(c, NoInspect);
    }
}

TEST(CpLightning, OnlyCrossChunkStateReachesLaterRanks) {
  for (CpLinearScheme scheme : {CpLinearScheme::kLasp1, CpLinearScheme::kLasp2})
    for (bool decay : {false, true}) {
      Case c;
      c.scheme = scheme;
      c.decay = decay;
      c.cross_only = true;
      c.chunk = 2;
      RunCase(c, NoInspect);
    }
}

TEST(CpLightning, Lasp2GathersTwoCpStatesOnceEachWay) {
  Case c;
  c.docs = true;
  RunCase(c, [](int cp, Communicator&, const Case& c, const LinearRun& run) {
    const int64_t state = c.h * c.dk * c.dv;
    // Forward: this rank's 2 chunk states (+ a cut flag each) per row, so the
    // gather brings 2·cp states per row.
    EXPECT_EQ(run.forward.Calls(CommOp::kAllGather), 1);
    EXPECT_EQ(run.forward.Bytes(CommOp::kAllGather), c.rows * 2 * (state + 1) * 8);
    // Backward: one collective, the 2 local d-states per row.
    EXPECT_EQ(run.backward.Calls(CommOp::kAllGather), 1);
    EXPECT_EQ(run.backward.Bytes(CommOp::kAllGather), c.rows * 2 * state * 8);
    EXPECT_EQ(run.trace.size(), 2u) << "lasp2 makes no other call";
    for (const CommEvent& e : run.trace) EXPECT_EQ(e.op, CommOp::kAllGather);
    (void)cp;
  });
}

TEST(CpLightning, Lasp1SendsOnlyOneStatePerMessage) {
  Case c;
  c.scheme = CpLinearScheme::kLasp1;
  c.docs = true;
  RunCase(c, [](int cp, Communicator& g, const Case& c, const LinearRun& run) {
    const int64_t state_bytes = c.rows * c.h * c.dk * c.dv * 8;
    for (const CommEvent& e : run.trace) {
      EXPECT_TRUE(e.op == CommOp::kSend || e.op == CommOp::kRecv) << CommOpName(e.op);
      EXPECT_EQ(e.bytes, state_bytes);
      EXPECT_TRUE(e.peer == g.rank() - 1 || e.peer == g.rank() + 1) << "a chain only talks to its neighbours";
    }
    // The chain crosses 2cp − 2 rank boundaries each way: rank p sends one
    // state up and one down (none past the ends).
    const int p = g.rank();
    const int64_t sends = (p + 1 < cp) + (p > 0);
    EXPECT_EQ(run.forward.Calls(CommOp::kSend), sends);
    EXPECT_EQ(run.backward.Calls(CommOp::kSend), sends);
    EXPECT_EQ(run.forward.Calls(CommOp::kRecv), sends);
    EXPECT_EQ(run.backward.Calls(CommOp::kRecv), sends);
  });
}

}  // namespace
}  // namespace loom
