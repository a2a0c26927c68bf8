#include "parallel/mpi_communicator.h"

#include <mpi.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <climits>
#include <deque>
#include <cstdlib>
#include <functional>
#include <thread>

#include "absl/strings/str_join.h"
#include "runtime/cuda_runtime.h"
#include "runtime/log.h"

namespace loom {

const char* CommOpName(CommOp op) {
  static const char* const kNames[kCommOps] = {"all_reduce", "reduce_scatter", "all_gather", "all_to_all",
                                               "send",       "recv",           "broadcast",  "barrier"};
  return kNames[static_cast<int>(op)];
}

CommHandle& CommHandle::operator=(CommHandle&& other) {
  if (this != &other) {
    if (pending_) LOOM_CHECK(Wait().ok(), "[comm] a replaced handle's operation failed");
    pending_ = std::move(other.pending_);
    error_ = std::move(other.error_);
  }
  return *this;
}

CommHandle::~CommHandle() {
  if (pending_) {
    const absl::Status status = pending_->Wait();
    LOOM_CHECK(status.ok(), "[comm] an operation nobody waited on failed: ", status.message());
  }
}

absl::Status CommHandle::Wait() {
  if (!pending_) return error_;
  absl::Status status = pending_->Wait();
  pending_.reset();
  return status;
}

bool CommHandle::Done() { return !pending_ || pending_->Test(); }

void Communicator::Count(CommOp op, int64_t bytes, int peer) {
  counters_.calls[static_cast<int>(op)] += 1;
  counters_.bytes[static_cast<int>(op)] += bytes;
  if (trace_) trace_->push_back({op, bytes, peer});
}

CommHandle Communicator::StartAllToAll(const Tensor& in, Tensor& out) {
  if (in.numel() % size_ != 0 || in.numel() != out.numel()) {
    Count(CommOp::kAllToAll, in.nbytes());
    return CommHandle(absl::InternalError(absl::StrCat("[comm] all_to_all: input has ", in.numel(),
                                                       " elements and output ", out.numel(),
                                                       "; both must be the same multiple of the group size ", size_)));
  }
  const std::vector<int64_t> counts(size_, in.numel() / size_);
  return StartAllToAllV(in, counts, out, counts);
}

namespace {

constexpr int kProbeTag = 1, kReplyTag = 2;

// Liveness probes travel over one duplicate of MPI_COMM_WORLD, whatever
// group timed out, and a rank answers them from inside any wait on any
// group. A rank that waits on the stopped rank in one group (a TP peer in the
// TP all-reduce) still answers the rank that probes it from another (its DP
// peer), and probing the whole world names the rank that is really silent,
// on every rank. Created by MpiWorld (collective; every rank calls it first).
MPI_Comm WorldWatch() {
  static const MPI_Comm watch = [] {
    MPI_Comm c;
    MPI_Comm_dup(MPI_COMM_WORLD, &c);
    return c;
  }();
  return watch;
}

// Probes from ranks that timed out: answer that this rank is alive, echoing
// the probe's round (so a late reply is not taken for a later round's).
void AnswerProbes() {
  const MPI_Comm watch = WorldWatch();
  static std::deque<int> replies;  // the buffers of sends whose requests are freed
  for (;;) {
    int flag = 0;
    MPI_Status status;
    MPI_Iprobe(MPI_ANY_SOURCE, kProbeTag, watch, &flag, &status);
    if (!flag) return;
    int round = 0;
    MPI_Recv(&round, 1, MPI_INT, status.MPI_SOURCE, kProbeTag, watch, MPI_STATUS_IGNORE);
    replies.push_back(round);
    MPI_Request request;
    MPI_Isend(&replies.back(), 1, MPI_INT, status.MPI_SOURCE, kReplyTag, watch, &request);
    MPI_Request_free(&request);
  }
}

absl::Status Error(const std::string& message) { return absl::InternalError("[comm] " + message); }

// The MPI type of a tensor's elements. bf16 and f16 travel as 16-bit
// words and reduce with the ops below.
bool MpiType(DType dtype, MPI_Datatype* type) {
  switch (dtype) {
    case DType::kF32: *type = MPI_FLOAT; return true;
    case DType::kF64: *type = MPI_DOUBLE; return true;
    case DType::kI32: *type = MPI_INT32_T; return true;
    case DType::kI64: *type = MPI_INT64_T; return true;
    case DType::kBF16: case DType::kF16: *type = MPI_UINT16_T; return true;
  }
  return false;
}

// Sum or max of 16-bit floats, which MPI has no type for: each pair is
// widened to f32, combined and rounded back (as NCCL reduces bf16 and f16).
template <typename H, float (*kToFloat)(H), H (*kFromFloat)(float), bool kMax>
void Reduce16(void* in, void* inout, int* len, MPI_Datatype*) {
  const H* a = static_cast<const H*>(in);
  H* b = static_cast<H*>(inout);
  for (int i = 0; i < *len; ++i) {
    const float x = kToFloat(a[i]), y = kToFloat(b[i]);
    b[i] = kFromFloat(kMax ? std::max(x, y) : x + y);
  }
}

MPI_Op CreateOp(MPI_User_function* f) {
  MPI_Op op;
  MPI_Op_create(f, /*commute=*/1, &op);
  return op;
}

// The MPI reduction of `op` on `dtype` elements (created once, after MPI_Init).
MPI_Op MpiOp(ReduceOp op, DType dtype) {
  const bool max = op == ReduceOp::kMax;
  if (dtype == DType::kBF16) {
    static const MPI_Op sum = CreateOp(Reduce16<bf16, Bf16ToFloat, FloatToBf16, false>);
    static const MPI_Op mx = CreateOp(Reduce16<bf16, Bf16ToFloat, FloatToBf16, true>);
    return max ? mx : sum;
  }
  if (dtype == DType::kF16) {
    static const MPI_Op sum = CreateOp(Reduce16<f16, F16ToFloat, FloatToF16, false>);
    static const MPI_Op mx = CreateOp(Reduce16<f16, F16ToFloat, FloatToF16, true>);
    return max ? mx : sum;
  }
  return max ? MPI_MAX : MPI_SUM;
}

// A tensor's bytes as MPI sees them: the tensor itself on the CPU, else a
// page-locked host copy written back to the device when the operation ends.
class HostBuffer {
 public:
  HostBuffer(const Tensor& t, bool read) : tensor_(t) {
    if (t.device().is_cpu() || t.nbytes() == 0) {
      ptr_ = t.raw();
      return;
    }
    ptr_ = CudaHostAlloc(t.nbytes());
    pinned_ = true;
    if (read) CudaMemcpy(ptr_, t.raw(), t.nbytes());
  }
  HostBuffer(HostBuffer&& other) noexcept : tensor_(other.tensor_), ptr_(other.ptr_), pinned_(other.pinned_) {
    other.pinned_ = false;
  }
  ~HostBuffer() {
    if (pinned_) CudaHostFree(ptr_);
  }
  void* ptr() const { return ptr_; }
  void WriteBack() const {
    if (pinned_) CudaMemcpy(tensor_.raw(), ptr_, tensor_.nbytes());
  }

 private:
  Tensor tensor_;
  void* ptr_ = nullptr;
  bool pinned_ = false;
};

class MpiCommunicator;

class MpiPending : public CommHandle::Pending {
 public:
  MpiPending(MpiCommunicator* comm, CommOp op) : comm_(comm), op_(op) {}
  absl::Status Wait() override;
  bool Test() override;

  std::vector<MPI_Request> requests;
  std::vector<HostBuffer> buffers;  // kept alive until the end
  std::vector<const HostBuffer*> outputs;

 private:
  MpiCommunicator* comm_;
  CommOp op_;
};

class MpiCommunicator : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, double timeout_s) : comm_(comm), timeout_s_(timeout_s) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Group group, world;
    MPI_Comm_group(comm_, &group);
    MPI_Comm_group(MPI_COMM_WORLD, &world);
    std::vector<int> members(size_);
    for (int i = 0; i < size_; ++i) members[i] = i;
    world_ranks_.assign(size_, 0);
    MPI_Group_translate_ranks(group, size_, members.data(), world, world_ranks_.data());
    MPI_Group_free(&group);
    MPI_Group_free(&world);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }

  std::string backend() const override { return "mpi"; }

  CommHandle StartAllReduce(Tensor& t, ReduceOp op) override {
    Count(CommOp::kAllReduce, t.nbytes());
    MPI_Datatype type;
    if (!MpiType(t.dtype(), &type)) return Unsupported("all_reduce", t.dtype());
    if (t.numel() > INT_MAX) return TooLarge("all_reduce", t.numel());
    auto p = std::make_unique<MpiPending>(this, CommOp::kAllReduce);
    const HostBuffer& b = Stage(*p, t, true, true);
    p->requests.resize(1);
    MPI_Iallreduce(MPI_IN_PLACE, b.ptr(), static_cast<int>(t.numel()), type, MpiOp(op, t.dtype()), comm_,
                   &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartReduceScatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    Count(CommOp::kReduceScatter, in.nbytes());
    MPI_Datatype type;
    if (!MpiType(in.dtype(), &type) || in.dtype() != out.dtype()) return Unsupported("reduce_scatter", in.dtype());
    if (in.numel() != out.numel() * size_)
      return CommHandle(Error(absl::StrCat("reduce_scatter: input has ", in.numel(), " elements, not ", size_,
                                           " x output's ", out.numel())));
    if (in.numel() > INT_MAX) return TooLarge("reduce_scatter", in.numel());
    auto p = std::make_unique<MpiPending>(this, CommOp::kReduceScatter);
    const HostBuffer& bi = Stage(*p, in, true, false);
    const HostBuffer& bo = Stage(*p, out, false, true);
    p->requests.resize(1);
    MPI_Ireduce_scatter_block(bi.ptr(), bo.ptr(), static_cast<int>(out.numel()), type, MpiOp(op, in.dtype()),
                              comm_, &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartAllGather(const Tensor& in, Tensor& out) override {
    Count(CommOp::kAllGather, in.nbytes());
    MPI_Datatype type;
    if (!MpiType(in.dtype(), &type) || in.dtype() != out.dtype()) return Unsupported("all_gather", in.dtype());
    if (out.numel() != in.numel() * size_)
      return CommHandle(Error(absl::StrCat("all_gather: output has ", out.numel(), " elements, not ", size_,
                                           " x input's ", in.numel())));
    if (out.numel() > INT_MAX) return TooLarge("all_gather", out.numel());
    auto p = std::make_unique<MpiPending>(this, CommOp::kAllGather);
    const HostBuffer& bi = Stage(*p, in, true, false);
    const HostBuffer& bo = Stage(*p, out, false, true);
    p->requests.resize(1);
    MPI_Iallgather(bi.ptr(), static_cast<int>(in.numel()), type, bo.ptr(), static_cast<int>(in.numel()), type, comm_,
                   &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartAllToAllV(const Tensor& in, const std::vector<int64_t>& send_counts, Tensor& out,
                            const std::vector<int64_t>& recv_counts) override {
    MPI_Datatype type;
    if (!MpiType(in.dtype(), &type) || in.dtype() != out.dtype()) {
      Count(CommOp::kAllToAll, in.nbytes());
      return Unsupported("all_to_all", in.dtype());
    }
    if (static_cast<int>(send_counts.size()) != size_ || static_cast<int>(recv_counts.size()) != size_)
      return CommHandle(Error(absl::StrCat("all_to_allv: ", send_counts.size(), " send and ", recv_counts.size(),
                                           " receive counts for a group of ", size_)));
    std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
    int64_t s_total = 0, r_total = 0;
    for (int i = 0; i < size_; ++i) {
      if (s_total > INT_MAX || r_total > INT_MAX) return TooLarge("all_to_allv", std::max(s_total, r_total));
      sd[i] = static_cast<int>(s_total);
      rd[i] = static_cast<int>(r_total);
      sc[i] = static_cast<int>(send_counts[i]);
      rc[i] = static_cast<int>(recv_counts[i]);
      s_total += send_counts[i];
      r_total += recv_counts[i];
    }
    if (s_total != in.numel() || r_total != out.numel())
      return CommHandle(Error(absl::StrCat("all_to_allv: counts sum to ", s_total, " sent and ", r_total,
                                           " received, tensors hold ", in.numel(), " and ", out.numel())));
    Count(CommOp::kAllToAll, static_cast<int64_t>(s_total * DTypeSize(in.dtype())));
    auto p = std::make_unique<MpiPending>(this, CommOp::kAllToAll);
    const HostBuffer& bi = Stage(*p, in, true, false);
    const HostBuffer& bo = Stage(*p, out, false, true);
    p->requests.resize(1);
    MPI_Ialltoallv(bi.ptr(), sc.data(), sd.data(), type, bo.ptr(), rc.data(), rd.data(), type, comm_,
                   &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartSend(const Tensor& t, int peer, int tag) override {
    Count(CommOp::kSend, t.nbytes(), peer);
    if (peer < 0 || peer >= size_) return BadPeer("send", peer);
    if (t.nbytes() > INT_MAX) return TooLarge("send", t.nbytes());
    auto p = std::make_unique<MpiPending>(this, CommOp::kSend);
    const HostBuffer& b = Stage(*p, t, true, false);
    p->requests.resize(1);
    MPI_Isend(b.ptr(), static_cast<int>(t.nbytes()), MPI_BYTE, peer, tag, comm_, &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartRecv(Tensor& t, int peer, int tag) override {
    Count(CommOp::kRecv, t.nbytes(), peer);
    if (peer < 0 || peer >= size_) return BadPeer("recv", peer);
    if (t.nbytes() > INT_MAX) return TooLarge("recv", t.nbytes());
    auto p = std::make_unique<MpiPending>(this, CommOp::kRecv);
    const HostBuffer& b = Stage(*p, t, false, true);
    p->requests.resize(1);
    MPI_Irecv(b.ptr(), static_cast<int>(t.nbytes()), MPI_BYTE, peer, tag, comm_, &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartBroadcast(Tensor& t, int root) override {
    Count(CommOp::kBroadcast, t.nbytes(), root);
    if (root < 0 || root >= size_) return BadPeer("broadcast", root);
    if (t.nbytes() > INT_MAX) return TooLarge("broadcast", t.nbytes());
    auto p = std::make_unique<MpiPending>(this, CommOp::kBroadcast);
    const HostBuffer& b = Stage(*p, t, rank_ == root, rank_ != root);
    p->requests.resize(1);
    MPI_Ibcast(b.ptr(), static_cast<int>(t.nbytes()), MPI_BYTE, root, comm_, &p->requests[0]);
    return CommHandle(std::move(p));
  }

  CommHandle StartBarrier() override {
    Count(CommOp::kBarrier, 0);
    auto p = std::make_unique<MpiPending>(this, CommOp::kBarrier);
    p->requests.resize(1);
    MPI_Ibarrier(comm_, &p->requests[0]);
    return CommHandle(std::move(p));
  }

  absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) override {
    MPI_Comm sub;
    if (MPI_Comm_split(comm_, color, key, &sub) != MPI_SUCCESS) return Error("MPI_Comm_split failed");
    return std::unique_ptr<Communicator>(new MpiCommunicator(sub, timeout_s_));
  }

  // Completes `requests`, answering other ranks' probes meanwhile.
  absl::Status WaitAll(std::vector<MPI_Request>& requests, CommOp op) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    for (int spin = 0;; ++spin) {
      int done = 0;
      MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
      if (done) return absl::OkStatus();
      AnswerProbes();
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      if (waited > timeout_s_) return Unresponsive(op, waited);
      // Yield at first (another rank may share this core), then sleep a
      // little: short waits stay fast, long ones leave the core free.
      if (spin < 2000) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(spin < 20000 ? 50 : 500));
      }
    }
  }

  bool TestAll(std::vector<MPI_Request>& requests) {
    int done = 0;
    MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
    AnswerProbes();
    return done != 0;
  }

 private:
  const HostBuffer& Stage(MpiPending& p, const Tensor& t, bool read, bool write) {
    p.buffers.reserve(2);  // never reallocated: outputs point into it
    p.buffers.emplace_back(t, read);
    if (write) p.outputs.push_back(&p.buffers.back());
    return p.buffers.back();
  }

  CommHandle Unsupported(const char* what, DType dtype) {
    return CommHandle(Error(absl::StrCat(what, " of ", DTypeName(dtype),
                                         " tensors: the input's and the output's dtypes must match")));
  }
  CommHandle TooLarge(const char* what, int64_t n) {
    return CommHandle(Error(absl::StrCat(what, ": ", n, " elements exceed MPI's int count; split the message")));
  }
  CommHandle BadPeer(const char* what, int peer) {
    return CommHandle(Error(absl::StrCat(what, ": peer ", peer, " is not in a group of ", size_)));
  }

  // Asks every rank of the world whether it is alive and names those that do
  // not answer within a grace period (members of this group or not).
  absl::Status Unresponsive(CommOp op, double waited) {
    const MPI_Comm watch = WorldWatch();
    int world_size = 1, me = 0;
    MPI_Comm_size(watch, &world_size);
    MPI_Comm_rank(watch, &me);
    static std::deque<int> rounds;  // probe payloads, alive while the sends are
    rounds.push_back(static_cast<int>(rounds.size()) + 1);
    const int round = rounds.back();
    for (int r = 0; r < world_size; ++r) {
      if (r == me) continue;
      MPI_Request request;
      MPI_Isend(&rounds.back(), 1, MPI_INT, r, kProbeTag, watch, &request);
      MPI_Request_free(&request);
    }
    std::vector<bool> answered(world_size, false);
    answered[me] = true;
    int missing = world_size - 1;
    const auto start = std::chrono::steady_clock::now();
    const double grace = std::min(timeout_s_, 3.0);
    while (missing > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < grace) {
      AnswerProbes();
      int flag = 0;
      MPI_Status status;
      MPI_Iprobe(MPI_ANY_SOURCE, kReplyTag, watch, &flag, &status);
      if (flag) {
        int reply = 0;
        MPI_Recv(&reply, 1, MPI_INT, status.MPI_SOURCE, kReplyTag, watch, MPI_STATUS_IGNORE);
        if (reply == round && !answered[status.MPI_SOURCE]) {
          answered[status.MPI_SOURCE] = true;
          --missing;
        }
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    std::vector<int> silent;
    bool outside = false;
    for (int r = 0; r < world_size; ++r) {
      if (answered[r]) continue;
      silent.push_back(r);
      outside |= std::find(world_ranks_.begin(), world_ranks_.end(), r) == world_ranks_.end();
    }
    std::string who = silent.empty() ? "every rank answered a probe, so the group is alive but out of step "
                                       "(ranks calling different collectives?)"
                                     : absl::StrCat(silent.size() == 1 ? "world rank " : "world ranks ",
                                                    absl::StrJoin(silent, ", "),
                                                    " stopped answering (stopped, hung or dead)",
                                                    outside ? "; a member of this group waits on it in another group"
                                                            : "");
    return absl::DeadlineExceededError(absl::StrCat("[comm] world rank ", world_ranks_[rank_], ": ", CommOpName(op),
                                                    " in a group of ", size_, " waited ",
                                                    static_cast<int>(waited), " s (parallel.timeout_s = ",
                                                    timeout_s_, "): ", who));
  }

  MPI_Comm comm_;
  double timeout_s_;
};

absl::Status MpiPending::Wait() {
  absl::Status status = comm_->WaitAll(requests, op_);
  if (status.ok())
    for (const HostBuffer* b : outputs) b->WriteBack();
  return status;
}

bool MpiPending::Test() { return comm_->TestAll(requests); }

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MpiWorld(double timeout_s) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      return Error("MPI_Init_thread failed");
    std::atexit([] {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Finalize();
    });
  }
  WorldWatch();
  return std::unique_ptr<Communicator>(new MpiCommunicator(MPI_COMM_WORLD, timeout_s));
}

void ExitAfterCommFailure(const absl::Status& status, int code) {
  LogError(status.message());
  std::fflush(stdout);
  std::fflush(stderr);
  // The other ranks time out about now too: let them print before mpirun
  // tears the job down at this rank's exit.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  _exit(code);
}

}  // namespace loom
