// Every collective of a Communicator on tensors of one device, checked value
// by value against what each rank put in, with the counters each call must
// leave. Shared by tests/gpu/nccl_communicator_test.cc (NCCL, one rank) and
// tests/parallel/communicator_gpu_mpi.cc (MPI staged through pinned memory,
// and NCCL when every rank has a GPU of its own). EXPECT only: on several
// ranks no check may return early while the others wait in a collective.
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "parallel/communicator.h"

namespace loom::testing {

// Distinct values per rank and element, exact in f32 (and bf16 for small i).
inline double CollectiveValue(int rank, int64_t i) { return 1000.0 * rank + i + 0.25; }

inline Tensor OnDevice(const Tensor& cpu, Device device) {
  Tensor t = Tensor::Empty(cpu.shape(), cpu.dtype(), device);
  t.CopyFrom(cpu);
  return t;
}
inline Tensor OnCpu(const Tensor& t) {
  Tensor c = Tensor::Empty(t.shape(), t.dtype());
  c.CopyFrom(t);
  return c;
}
inline Tensor ValueTensor(int rank, int64_t n, DType dtype, Device device) {
  Tensor t = Tensor::Empty({n}, DType::kF64);
  for (int64_t i = 0; i < n; ++i) t.data<double>()[i] = CollectiveValue(rank, i);
  return OnDevice(t.To(dtype), device);
}
// An output filled with -1 first, so that an element nobody wrote fails.
inline Tensor Poisoned(int64_t n, DType dtype, Device device) {
  Tensor t = Tensor::Empty({n}, DType::kF64);
  t.Fill(-1.0);
  return OnDevice(t.To(dtype), device);
}

// Runs all_reduce (sum f64, sum f32, max i64), reduce_scatter, all_gather
// (bf16), all_to_all, all_to_allv, a ring of send/recv, broadcast and
// barrier on `c` with tensors on `device`, and checks values and counters.
inline void CheckEveryCollective(Communicator& c, Device device) {
  const int p = c.size(), me = c.rank();
  const int64_t n = 37;
  c.ResetCounters();
  std::vector<CommEvent> trace;
  c.set_trace(&trace);
  int64_t all_reduce_bytes = 0;

  for (DType dtype : {DType::kF64, DType::kF32}) {
    Tensor t = ValueTensor(me, n, dtype, device);
    all_reduce_bytes += static_cast<int64_t>(t.nbytes());
    EXPECT_TRUE(c.AllReduce(t).ok()) << DTypeName(dtype);
    const Tensor got = OnCpu(t);
    for (int64_t i = 0; i < n; ++i) {
      double expect = 0;
      for (int r = 0; r < p; ++r) expect += CollectiveValue(r, i);
      EXPECT_EQ(got.Get(i), expect) << "all_reduce " << DTypeName(dtype) << " element " << i;
    }
  }
  {
    Tensor m = OnDevice(Tensor::FromVector<int64_t>({me, -me, 7}, {3}), device);
    all_reduce_bytes += static_cast<int64_t>(m.nbytes());
    EXPECT_TRUE(c.AllReduce(m, ReduceOp::kMax).ok());
    const Tensor got = OnCpu(m);
    EXPECT_EQ(got.Get(0), p - 1);
    EXPECT_EQ(got.Get(1), 0);
    EXPECT_EQ(got.Get(2), 7);
  }
  // reduce_scatter: rank r gets the sum over ranks of slice r.
  const Tensor in = ValueTensor(me, p * n, DType::kF32, device);
  {
    Tensor out = Poisoned(n, DType::kF32, device);
    EXPECT_TRUE(c.ReduceScatter(in, out).ok());
    const Tensor got = OnCpu(out);
    for (int64_t i = 0; i < n; ++i) {
      double expect = 0;
      for (int r = 0; r < p; ++r) expect += CollectiveValue(r, me * n + i);
      EXPECT_EQ(got.Get(i), expect) << "reduce_scatter element " << i;
    }
  }
  // all_gather moves any dtype: bf16 here.
  {
    const Tensor mine = ValueTensor(me, n, DType::kBF16, device);
    Tensor all = Poisoned(p * n, DType::kBF16, device);
    EXPECT_TRUE(c.AllGather(mine, all).ok());
    const Tensor got = OnCpu(all);
    for (int r = 0; r < p; ++r) {
      const Tensor want = ValueTensor(r, n, DType::kBF16, Device::Cpu());
      for (int64_t i = 0; i < n; ++i) EXPECT_EQ(got.Get(r * n + i), want.Get(i)) << "all_gather from " << r << " element " << i;
    }
  }
  // all_to_all: slice r of rank s's input (CollectiveValue(s, r·n + i)) lands in slice s of rank r.
  {
    Tensor out = Poisoned(p * n, DType::kF32, device);
    EXPECT_TRUE(c.AllToAll(in, out).ok());
    const Tensor got = OnCpu(out);
    for (int s = 0; s < p; ++s)
      for (int64_t i = 0; i < n; ++i)
        EXPECT_EQ(got.Get(s * n + i), CollectiveValue(s, me * n + i)) << "all_to_all from " << s << " element " << i;
  }
  // all_to_allv: rank s sends s + r + 1 elements to rank r, valued 100·s + r.
  int64_t a2av_sent = 0;
  {
    std::vector<int64_t> send(p), recv(p);
    int64_t ns = 0, nr = 0;
    for (int r = 0; r < p; ++r) ns += send[r] = me + r + 1;
    for (int s = 0; s < p; ++s) nr += recv[s] = s + me + 1;
    Tensor host = Tensor::Empty({ns}, DType::kF64);
    for (int r = 0, at = 0; r < p; ++r)
      for (int64_t i = 0; i < send[r]; ++i) host.data<double>()[at++] = 100.0 * me + r;
    Tensor out = Poisoned(nr, DType::kF64, device);
    EXPECT_TRUE(c.AllToAllV(OnDevice(host, device), send, out, recv).ok());
    a2av_sent = ns * 8;
    const Tensor got = OnCpu(out);
    for (int s = 0, at = 0; s < p; ++s)
      for (int64_t i = 0; i < recv[s]; ++i, ++at) EXPECT_EQ(got.Get(at), 100.0 * s + me) << "all_to_allv from " << s;
  }
  // A ring: receive from the left, send to the right, both in flight at once
  // (one rank: to and from itself).
  const int right = (me + 1) % p, left = (me + p - 1) % p;
  {
    const Tensor out = ValueTensor(me, n, DType::kF32, device);
    Tensor got_dev = Poisoned(n, DType::kF32, device);
    CommHandle r = c.StartRecv(got_dev, left, 5);
    CommHandle s = c.StartSend(out, right, 5);
    EXPECT_TRUE(s.Wait().ok());
    EXPECT_TRUE(r.Wait().ok());
    const Tensor got = OnCpu(got_dev);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(got.Get(i), CollectiveValue(left, i)) << "ring recv element " << i;
  }
  {
    const int root = p - 1;
    Tensor t = me == root ? ValueTensor(me, n, DType::kF32, device) : Poisoned(n, DType::kF32, device);
    EXPECT_TRUE(c.Broadcast(t, root).ok());
    const Tensor got = OnCpu(t);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(got.Get(i), CollectiveValue(root, i)) << "broadcast element " << i;
  }
  EXPECT_TRUE(c.Barrier().ok());

  const CommCounters& k = c.counters();
  EXPECT_EQ(k.Calls(CommOp::kAllReduce), 3);
  EXPECT_EQ(k.Bytes(CommOp::kAllReduce), all_reduce_bytes);
  EXPECT_EQ(k.Calls(CommOp::kReduceScatter), 1);
  EXPECT_EQ(k.Bytes(CommOp::kReduceScatter), p * n * 4);
  EXPECT_EQ(k.Calls(CommOp::kAllGather), 1);
  EXPECT_EQ(k.Bytes(CommOp::kAllGather), n * 2);
  EXPECT_EQ(k.Calls(CommOp::kAllToAll), 2);
  EXPECT_EQ(k.Bytes(CommOp::kAllToAll), p * n * 4 + a2av_sent);
  EXPECT_EQ(k.Calls(CommOp::kSend), 1);
  EXPECT_EQ(k.Bytes(CommOp::kSend), n * 4);
  EXPECT_EQ(k.Calls(CommOp::kRecv), 1);
  EXPECT_EQ(k.Calls(CommOp::kBroadcast), 1);
  EXPECT_EQ(k.Bytes(CommOp::kBroadcast), n * 4);
  EXPECT_EQ(k.Calls(CommOp::kBarrier), 1);
  // The trace records every call in order; sends and receives name their peer.
  EXPECT_EQ(trace.size(), 11u);
  for (const CommEvent& e : trace) {
    if (e.op == CommOp::kSend) {
      EXPECT_EQ(e.peer, right);
    }
    if (e.op == CommOp::kRecv) {
      EXPECT_EQ(e.peer, left);
    }
  }
  c.set_trace(nullptr);
}

}  // namespace loom::testing
