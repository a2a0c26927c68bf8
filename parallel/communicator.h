// Collective communication over a process group (DESIGN.md, Communicator).
//
// Every operation starts asynchronously and returns a CommHandle; Wait() on
// it completes the operation and returns its status. The blocking forms are
// Start...(...).Wait(). A wait that outlasts the group's timeout fails with a
// message naming the ranks that stopped answering (see MpiCommunicator).
//
// Shapes: tensors are contiguous; only their element count matters.
//   all_reduce      t [n] in place
//   reduce_scatter  in [size·n] -> out [n], rank r gets the sum of slice r
//   all_gather      in [n] -> out [size·n], slice r from rank r
//   all_to_all      in [size·n] -> out [size·n], slice r of in goes to rank r,
//                   slice r of out came from rank r
//   all_to_allv     as all_to_all with per-peer element counts (slices in
//                   rank order)
//   broadcast       t from root to every rank, in place
//
// Counters: per operation kind, the number of calls and the bytes of this
// rank's payload (all_reduce, broadcast: the tensor; reduce_scatter: the
// input; all_gather: the local input; all_to_all(v): what this rank sends;
// send/recv: the message). With a trace attached, every call is also
// recorded (kind, bytes, peer) so tests can assert what a scheme sends.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom {

enum class CommOp : int { kAllReduce, kReduceScatter, kAllGather, kAllToAll, kSend, kRecv, kBroadcast, kBarrier };
constexpr int kCommOps = 8;
const char* CommOpName(CommOp op);

enum class ReduceOp { kSum, kMax };

struct CommCounters {
  std::array<int64_t, kCommOps> calls{};
  std::array<int64_t, kCommOps> bytes{};
  int64_t Calls(CommOp op) const { return calls[static_cast<int>(op)]; }
  int64_t Bytes(CommOp op) const { return bytes[static_cast<int>(op)]; }
};

struct CommEvent {
  CommOp op;
  int64_t bytes;
  int peer;  // group rank of the peer (send, recv, broadcast root); -1 otherwise
};

// An operation in flight. Destroying a handle that was not waited on waits
// (and aborts on error: an unchecked failed collective is a bug).
class CommHandle {
 public:
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual absl::Status Wait() = 0;
    virtual bool Test() = 0;  // true once complete (drives progress)
  };

  CommHandle() = default;  // already complete
  explicit CommHandle(std::unique_ptr<Pending> pending) : pending_(std::move(pending)) {}
  explicit CommHandle(absl::Status error) : error_(std::move(error)) {}
  CommHandle(CommHandle&&) = default;
  CommHandle& operator=(CommHandle&& other);
  ~CommHandle();

  absl::Status Wait();
  bool Done();  // non-blocking; also lets the backend make progress

 private:
  std::unique_ptr<Pending> pending_;
  absl::Status error_;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // World rank of each group member (messages name world ranks).
  const std::vector<int>& world_ranks() const { return world_ranks_; }
  virtual std::string backend() const = 0;

  virtual CommHandle StartAllReduce(Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  virtual CommHandle StartReduceScatter(const Tensor& in, Tensor& out, ReduceOp op = ReduceOp::kSum) = 0;
  virtual CommHandle StartAllGather(const Tensor& in, Tensor& out) = 0;
  // Equal splits: StartAllToAllV with in.numel() / size() elements to and
  // from every rank (an error unless in and out hold the same multiple of size()).
  CommHandle StartAllToAll(const Tensor& in, Tensor& out);
  virtual CommHandle StartAllToAllV(const Tensor& in, const std::vector<int64_t>& send_counts, Tensor& out,
                                    const std::vector<int64_t>& recv_counts) = 0;
  virtual CommHandle StartSend(const Tensor& t, int peer, int tag = 0) = 0;
  virtual CommHandle StartRecv(Tensor& t, int peer, int tag = 0) = 0;
  virtual CommHandle StartBroadcast(Tensor& t, int root) = 0;
  virtual CommHandle StartBarrier() = 0;

  absl::Status AllReduce(Tensor& t, ReduceOp op = ReduceOp::kSum) { return StartAllReduce(t, op).Wait(); }
  absl::Status ReduceScatter(const Tensor& in, Tensor& out, ReduceOp op = ReduceOp::kSum) {
    return StartReduceScatter(in, out, op).Wait();
  }
  absl::Status AllGather(const Tensor& in, Tensor& out) { return StartAllGather(in, out).Wait(); }
  absl::Status AllToAll(const Tensor& in, Tensor& out) { return StartAllToAll(in, out).Wait(); }
  absl::Status AllToAllV(const Tensor& in, const std::vector<int64_t>& send_counts, Tensor& out,
                         const std::vector<int64_t>& recv_counts) {
    return StartAllToAllV(in, send_counts, out, recv_counts).Wait();
  }
  absl::Status Send(const Tensor& t, int peer, int tag = 0) { return StartSend(t, peer, tag).Wait(); }
  absl::Status Recv(Tensor& t, int peer, int tag = 0) { return StartRecv(t, peer, tag).Wait(); }
  absl::Status Broadcast(Tensor& t, int root) { return StartBroadcast(t, root).Wait(); }
  absl::Status Barrier() { return StartBarrier().Wait(); }

  // A sub-group of the ranks passing the same color, ordered by key
  // (MPI_Comm_split). Collective over this group.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) = 0;

  const CommCounters& counters() const { return counters_; }
  void ResetCounters() { counters_ = {}; }
  void set_trace(std::vector<CommEvent>* trace) { trace_ = trace; }

 protected:
  void Count(CommOp op, int64_t bytes, int peer = -1);
  int rank_ = 0, size_ = 1;
  std::vector<int> world_ranks_{0};

 private:
  CommCounters counters_;
  std::vector<CommEvent>* trace_ = nullptr;
};

}  // namespace loom
