// The MPI communicator on the world and on split groups: every collective's
// values, async handles completed out of order, counters and traces, and
// clear errors for mismatched shapes.
#include <gtest/gtest.h>

#include <thread>

#include "tests/mpi_testing.h"

namespace loom {
namespace {

// Distinct values per rank and element.
double Value(int rank, int64_t i) { return 1000.0 * rank + i + 0.25; }

Tensor RankTensor(int rank, int64_t n, DType dtype) {
  Tensor t = Tensor::Empty({n}, DType::kF64);
  for (int64_t i = 0; i < n; ++i) t.data<double>()[i] = Value(rank, i);
  return t.To(dtype);
}

TEST(Communicator, AllReduceSumsAndMaxes) {
  Communicator& w = testing::World();
  const int p = w.size();
  for (DType dtype : {DType::kF64, DType::kF32}) {
    Tensor t = RankTensor(w.rank(), 37, dtype);
    ASSERT_TRUE(w.AllReduce(t).ok());
    for (int64_t i = 0; i < 37; ++i) {
      double expect = 0;
      for (int r = 0; r < p; ++r) expect += Value(r, i);
      EXPECT_EQ(t.Get(i), expect) << "element " << i;
    }
  }
  Tensor m = Tensor::FromVector<int64_t>({w.rank(), -w.rank()}, {2});
  ASSERT_TRUE(w.AllReduce(m, ReduceOp::kMax).ok());
  EXPECT_EQ(m.data<int64_t>()[0], p - 1);
  EXPECT_EQ(m.data<int64_t>()[1], 0);
}

// bf16 and f16 reduce too (widened to f32 pairwise and rounded back): on
// half-integers below 128 every partial sum is exact in both.
TEST(Communicator, ReducesBf16AndF16) {
  Communicator& w = testing::World();
  const int p = w.size(), n = 7;
  auto value = [](int rank, int64_t i) { return (rank + 1) * (i % 7 + 1) * 0.5; };
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    Tensor mine = Tensor::Empty({p * n}, DType::kF64);
    for (int64_t i = 0; i < p * n; ++i) mine.data<double>()[i] = value(w.rank(), i);
    Tensor sum = mine.To(dtype), max = mine.To(dtype), part = Tensor::Empty({n}, dtype);
    ASSERT_TRUE(w.AllReduce(sum).ok());
    ASSERT_TRUE(w.AllReduce(max, ReduceOp::kMax).ok());
    ASSERT_TRUE(w.ReduceScatter(mine.To(dtype), part).ok());
    for (int64_t i = 0; i < p * n; ++i) {
      double expect = 0;
      for (int r = 0; r < p; ++r) expect += value(r, i);
      EXPECT_EQ(sum.Get(i), expect) << "element " << i;
      EXPECT_EQ(max.Get(i), value(p - 1, i)) << "element " << i;
      if (i / n == w.rank()) EXPECT_EQ(part.Get(i % n), expect) << "element " << i;
    }
  }
}

TEST(Communicator, ReduceScatterAllGatherAllToAll) {
  Communicator& w = testing::World();
  const int p = w.size(), n = 5;
  Tensor in = RankTensor(w.rank(), p * n, DType::kF64);
  Tensor out = Tensor::Empty({n}, DType::kF64);
  ASSERT_TRUE(w.ReduceScatter(in, out).ok());
  for (int i = 0; i < n; ++i) {
    double expect = 0;
    for (int r = 0; r < p; ++r) expect += Value(r, w.rank() * n + i);
    EXPECT_EQ(out.Get(i), expect);
  }
  Tensor mine = RankTensor(w.rank(), n, DType::kBF16);  // gathers move any dtype
  Tensor all = Tensor::Empty({p * n}, DType::kBF16);
  ASSERT_TRUE(w.AllGather(mine, all).ok());
  for (int r = 0; r < p; ++r)
    for (int i = 0; i < n; ++i) EXPECT_EQ(all.Get(r * n + i), RankTensor(r, n, DType::kBF16).Get(i));
  // all_to_all: slice r of rank s's input is Value(s, r·n + i).
  Tensor a2a = Tensor::Empty({p * n}, DType::kF64);
  ASSERT_TRUE(w.AllToAll(in, a2a).ok());
  for (int s = 0; s < p; ++s)
    for (int i = 0; i < n; ++i) EXPECT_EQ(a2a.Get(s * n + i), Value(s, w.rank() * n + i));
}

TEST(Communicator, AllToAllVWithUnequalCounts) {
  Communicator& w = testing::World();
  const int p = w.size(), me = w.rank();
  // Rank s sends s + r + 1 elements to rank r, valued 100·s + r.
  auto count = [](int s, int r) { return int64_t{s + r + 1}; };
  std::vector<int64_t> send(p), recv(p);
  int64_t ns = 0, nr = 0;
  for (int r = 0; r < p; ++r) ns += send[r] = count(me, r);
  for (int s = 0; s < p; ++s) nr += recv[s] = count(s, me);
  Tensor in = Tensor::Empty({ns}, DType::kF64), out = Tensor::Empty({nr}, DType::kF64);
  for (int r = 0, at = 0; r < p; ++r)
    for (int64_t i = 0; i < send[r]; ++i) in.data<double>()[at++] = 100.0 * me + r;
  ASSERT_TRUE(w.AllToAllV(in, send, out, recv).ok());
  for (int s = 0, at = 0; s < p; ++s)
    for (int64_t i = 0; i < recv[s]; ++i) EXPECT_EQ(out.Get(at++), 100.0 * s + me);
}

TEST(Communicator, RingSendRecvBroadcastBarrierAsync) {
  Communicator& w = testing::World();
  const int p = w.size(), me = w.rank();
  Tensor to_next = RankTensor(me, 9, DType::kF32), from_prev = Tensor::Empty({9}, DType::kF32);
  // Start the receive first, then the send, and wait in the other order.
  CommHandle recv = w.StartRecv(from_prev, (me + p - 1) % p, /*tag=*/7);
  CommHandle send = w.StartSend(to_next, (me + 1) % p, /*tag=*/7);
  ASSERT_TRUE(send.Wait().ok());
  ASSERT_TRUE(recv.Wait().ok());
  for (int i = 0; i < 9; ++i) EXPECT_EQ(from_prev.Get(i), static_cast<float>(Value((me + p - 1) % p, i)));

  Tensor b = me == p - 1 ? RankTensor(me, 4, DType::kI64) : Tensor::Zeros({4}, DType::kI64);
  ASSERT_TRUE(w.Broadcast(b, p - 1).ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b.Get(i), static_cast<int64_t>(Value(p - 1, i)));

  // Several operations in flight at once, completed in reverse order; a late
  // rank (sleeping) only delays the others.
  if (me == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Tensor x = RankTensor(me, 3, DType::kF64), y = RankTensor(me, 3, DType::kF64);
  CommHandle hx = w.StartAllReduce(x), hy = w.StartAllReduce(y, ReduceOp::kMax), hb = w.StartBarrier();
  ASSERT_TRUE(hb.Wait().ok());
  ASSERT_TRUE(hy.Wait().ok());
  ASSERT_TRUE(hx.Wait().ok());
  EXPECT_EQ(y.Get(2), Value(p - 1, 2));
}

TEST(Communicator, SplitGroupsCountAndTrace) {
  Communicator& w = testing::World();
  if (w.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int me = w.rank();
  auto sub = w.Split(me % 2, -me);  // key -me: reversed order inside each group
  ASSERT_TRUE(sub.ok());
  Communicator& g = **sub;
  std::vector<int> expect;
  for (int r = w.size() - 1; r >= 0; --r)
    if (r % 2 == me % 2) expect.push_back(r);
  EXPECT_EQ(g.world_ranks(), expect);
  EXPECT_EQ(g.world_ranks()[g.rank()], me);

  std::vector<CommEvent> trace;
  g.set_trace(&trace);
  Tensor t = Tensor::Zeros({10}, DType::kF32), out = Tensor::Empty({10 * g.size()}, DType::kF32);
  ASSERT_TRUE(g.AllReduce(t).ok());
  ASSERT_TRUE(g.AllGather(t, out).ok());
  ASSERT_TRUE(g.Barrier().ok());
  EXPECT_EQ(g.counters().Calls(CommOp::kAllReduce), 1);
  EXPECT_EQ(g.counters().Bytes(CommOp::kAllReduce), 40);
  EXPECT_EQ(g.counters().Bytes(CommOp::kAllGather), 40);
  EXPECT_EQ(g.counters().Calls(CommOp::kBarrier), 1);
  ASSERT_EQ(trace.size(), 3u);
  EXPECT_EQ(trace[1].op, CommOp::kAllGather);
  EXPECT_EQ(w.counters().Calls(CommOp::kAllReduce) > 0, true);  // the world counts its own calls only
}

TEST(Communicator, MismatchedShapesAreClearErrors) {
  Communicator& w = testing::World();
  Tensor in = Tensor::Zeros({w.size() * 3 + 1}, DType::kF32), out = Tensor::Empty({3}, DType::kF32);
  absl::Status s = w.ReduceScatter(in, out);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("reduce_scatter"), std::string::npos) << s.message();
  Tensor h = Tensor::Zeros({4}, DType::kBF16), h32 = Tensor::Empty({4}, DType::kF32);
  Tensor hs = Tensor::Zeros({w.size() * 4}, DType::kBF16);
  s = w.ReduceScatter(hs, h32);
  EXPECT_NE(s.message().find("bf16"), std::string::npos) << s.message();
  s = w.Send(h, w.size() + 3);
  EXPECT_NE(s.message().find("not in a group"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace loom
