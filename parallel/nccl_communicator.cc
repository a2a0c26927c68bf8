// parallel/nccl_communicator.h. The library globs parallel/*.cc in every
// build, so the NCCL code sits inside LOOM_CUDA; a CPU build compiles the
// stub at the bottom, which says what is missing.
#include "parallel/nccl_communicator.h"

#if LOOM_CUDA

#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

#include "absl/strings/str_join.h"

namespace loom {

bool BuiltWithNccl() { return true; }

namespace {

absl::Status Error(const std::string& message) { return absl::InternalError("[comm] nccl: " + message); }

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return Error(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

bool NcclType(DType dtype, ncclDataType_t* type) {
  switch (dtype) {
    case DType::kF32: *type = ncclFloat32; return true;
    case DType::kF64: *type = ncclFloat64; return true;
    case DType::kBF16: *type = ncclBfloat16; return true;
    case DType::kF16: *type = ncclFloat16; return true;
    case DType::kI32: *type = ncclInt32; return true;
    case DType::kI64: *type = ncclInt64; return true;
  }
  return false;
}

// Operations launched together (one collective, or one group of queued
// sends and receives): complete once `event`, recorded after them on the
// communicator's stream, has completed. Holds the tensors until then.
struct Launch {
  cudaEvent_t event = nullptr;
  bool launched = false;
  std::vector<Tensor> keep;
  ~Launch() {
    if (event) cudaEventDestroy(event);
  }
};

class NcclCommunicator;

class NcclPending : public CommHandle::Pending {
 public:
  NcclPending(NcclCommunicator* comm, CommOp op, std::shared_ptr<Launch> launch)
      : comm_(comm), op_(op), launch_(std::move(launch)) {}
  absl::Status Wait() override;
  bool Test() override;

 private:
  NcclCommunicator* comm_;
  CommOp op_;
  std::shared_ptr<Launch> launch_;
};

// Where one operation's tensors are.
enum class Place { kGpu, kCpu, kMixed, kOtherGpu };

class NcclCommunicator : public Communicator {
 public:
  // Joins the group of `host` on the current device (collective over it).
  static absl::StatusOr<std::unique_ptr<Communicator>> Create(std::unique_ptr<Communicator> host, double timeout_s) {
    if (host->backend() != "mpi")
      return Error(absl::StrCat("the host communicator must be MPI's (it carries the unique id and CPU tensors), not ",
                                host->backend()));
    int device = 0;
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&device), "cudaGetDevice"));
    static_assert(sizeof(ncclUniqueId) % sizeof(int32_t) == 0, "the unique id travels as int32 words");
    Tensor words = Tensor::Zeros({static_cast<int64_t>(sizeof(ncclUniqueId) / sizeof(int32_t))}, DType::kI32);
    ncclUniqueId id;
    if (host->rank() == 0) {
      if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
        return Error(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
      std::memcpy(words.raw(), &id, sizeof(id));
    }
    LOOM_RETURN_IF_ERROR(host->Broadcast(words, 0));
    std::memcpy(&id, words.raw(), sizeof(id));
    ncclComm_t comm = nullptr;
    if (ncclResult_t r = ncclCommInitRank(&comm, host->size(), id, host->rank()); r != ncclSuccess)
      return Error(absl::StrCat("ncclCommInitRank (rank ", host->rank(), " of ", host->size(), " on cuda:", device,
                                "): ", ncclGetErrorString(r), ". ", ncclGetLastError(nullptr)));
    return Wrap(std::move(host), comm, device, timeout_s);
  }

  ~NcclCommunicator() override {
    if (!aborted_) {
      (void)FlushP2p();
      cudaSetDevice(device_);
      cudaStreamSynchronize(stream_);
      ncclCommDestroy(comm_);
    }
    cudaEventDestroy(ready_);
    cudaFree(scratch_);
    cudaStreamDestroy(stream_);
  }

  std::string backend() const override { return "nccl"; }

  CommHandle StartAllReduce(Tensor& t, ReduceOp op) override {
    Count(CommOp::kAllReduce, t.nbytes());
    switch (Locate({&t})) {
      case Place::kCpu: return host_->StartAllReduce(t, op);
      case Place::kGpu: break;
      default: return Misplaced("all_reduce", {&t});
    }
    ncclDataType_t type;
    if (!NcclType(t.dtype(), &type)) return Unsupported("all_reduce", t.dtype());
    return Enqueue(CommOp::kAllReduce, {t}, [&] {
      return ncclAllReduce(t.raw(), t.raw(), t.numel(), type, NcclOp(op), comm_, stream_);
    });
  }

  CommHandle StartReduceScatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    Count(CommOp::kReduceScatter, in.nbytes());
    switch (Locate({&in, &out})) {
      case Place::kCpu: return host_->StartReduceScatter(in, out, op);
      case Place::kGpu: break;
      default: return Misplaced("reduce_scatter", {&in, &out});
    }
    ncclDataType_t type;
    if (!NcclType(in.dtype(), &type) || in.dtype() != out.dtype()) return Unsupported("reduce_scatter", in.dtype());
    if (in.numel() != out.numel() * size_)
      return CommHandle(Error(absl::StrCat("reduce_scatter: input has ", in.numel(), " elements, not ", size_,
                                           " x output's ", out.numel())));
    return Enqueue(CommOp::kReduceScatter, {in, out}, [&] {
      return ncclReduceScatter(in.raw(), out.raw(), out.numel(), type, NcclOp(op), comm_, stream_);
    });
  }

  CommHandle StartAllGather(const Tensor& in, Tensor& out) override {
    Count(CommOp::kAllGather, in.nbytes());
    switch (Locate({&in, &out})) {
      case Place::kCpu: return host_->StartAllGather(in, out);
      case Place::kGpu: break;
      default: return Misplaced("all_gather", {&in, &out});
    }
    if (in.dtype() != out.dtype()) return Unsupported("all_gather", in.dtype());
    if (out.numel() != in.numel() * size_)
      return CommHandle(Error(absl::StrCat("all_gather: output has ", out.numel(), " elements, not ", size_,
                                           " x input's ", in.numel())));
    // Bytes, so that every dtype moves.
    return Enqueue(CommOp::kAllGather, {in, out},
                   [&] { return ncclAllGather(in.raw(), out.raw(), in.nbytes(), ncclUint8, comm_, stream_); });
  }

  // One group of a send and a receive per peer (NCCL has no all-to-all).
  CommHandle StartAllToAllV(const Tensor& in, const std::vector<int64_t>& send_counts, Tensor& out,
                            const std::vector<int64_t>& recv_counts) override {
    const Place place = Locate({&in, &out});
    if (place == Place::kCpu) {
      int64_t sent = 0;
      for (int64_t c : send_counts) sent += c;
      Count(CommOp::kAllToAll, sent * static_cast<int64_t>(DTypeSize(in.dtype())));
      return host_->StartAllToAllV(in, send_counts, out, recv_counts);
    }
    if (place != Place::kGpu || in.dtype() != out.dtype()) {
      Count(CommOp::kAllToAll, in.nbytes());
      return place != Place::kGpu ? Misplaced("all_to_all", {&in, &out}) : Unsupported("all_to_all", in.dtype());
    }
    if (static_cast<int>(send_counts.size()) != size_ || static_cast<int>(recv_counts.size()) != size_)
      return CommHandle(Error(absl::StrCat("all_to_allv: ", send_counts.size(), " send and ", recv_counts.size(),
                                           " receive counts for a group of ", size_)));
    int64_t s_total = 0, r_total = 0;
    for (int i = 0; i < size_; ++i) {
      s_total += send_counts[i];
      r_total += recv_counts[i];
    }
    if (s_total != in.numel() || r_total != out.numel())
      return CommHandle(Error(absl::StrCat("all_to_allv: counts sum to ", s_total, " sent and ", r_total,
                                           " received, tensors hold ", in.numel(), " and ", out.numel())));
    const size_t element = DTypeSize(in.dtype());
    Count(CommOp::kAllToAll, s_total * static_cast<int64_t>(element));
    return Enqueue(CommOp::kAllToAll, {in, out}, [&]() -> ncclResult_t {
      char* src = static_cast<char*>(in.raw());
      char* dst = static_cast<char*>(out.raw());
      if (ncclResult_t r = ncclGroupStart(); r != ncclSuccess) return r;
      ncclResult_t first = ncclSuccess;
      int64_t s = 0, d = 0;  // element offsets of this peer's slices
      for (int peer = 0; peer < size_; s += send_counts[peer], d += recv_counts[peer], ++peer) {
        const size_t sb = send_counts[peer] * element, rb = recv_counts[peer] * element;
        if (sb > 0 && first == ncclSuccess) first = ncclSend(src + s * element, sb, ncclUint8, peer, comm_, stream_);
        if (rb > 0 && first == ncclSuccess) first = ncclRecv(dst + d * element, rb, ncclUint8, peer, comm_, stream_);
      }
      const ncclResult_t end = ncclGroupEnd();
      return first != ncclSuccess ? first : end;
    });
  }

  CommHandle StartSend(const Tensor& t, int peer, int tag) override {
    Count(CommOp::kSend, t.nbytes(), peer);
    switch (Locate({&t})) {
      case Place::kCpu: return host_->StartSend(t, peer, tag);
      case Place::kGpu: return QueueP2p(true, t, peer);
      default: return Misplaced("send", {&t});
    }
  }

  CommHandle StartRecv(Tensor& t, int peer, int tag) override {
    Count(CommOp::kRecv, t.nbytes(), peer);
    switch (Locate({&t})) {
      case Place::kCpu: return host_->StartRecv(t, peer, tag);
      case Place::kGpu: return QueueP2p(false, t, peer);
      default: return Misplaced("recv", {&t});
    }
  }

  CommHandle StartBroadcast(Tensor& t, int root) override {
    Count(CommOp::kBroadcast, t.nbytes(), root);
    switch (Locate({&t})) {
      case Place::kCpu: return host_->StartBroadcast(t, root);
      case Place::kGpu: break;
      default: return Misplaced("broadcast", {&t});
    }
    if (root < 0 || root >= size_) return BadPeer("broadcast", root);
    return Enqueue(CommOp::kBroadcast, {t},
                   [&] { return ncclBroadcast(t.raw(), t.raw(), t.nbytes(), ncclUint8, root, comm_, stream_); });
  }

  // NCCL has no barrier: a one-word all-reduce on the NCCL stream, so that
  // the barrier also orders after this rank's earlier NCCL work.
  CommHandle StartBarrier() override {
    Count(CommOp::kBarrier, 0);
    return Enqueue(CommOp::kBarrier, {}, [&] {
      return ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_);
    });
  }

  absl::StatusOr<std::unique_ptr<Communicator>> Split(int color, int key) override {
    if (aborted_) return Aborted("split");
    LOOM_RETURN_IF_ERROR(FlushP2p());
    LOOM_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> host_sub, host_->Split(color, key));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    ncclComm_t sub = nullptr;
    if (ncclResult_t r = ncclCommSplit(comm_, color, key, &sub, nullptr); r != ncclSuccess)
      return Error(absl::StrCat("ncclCommSplit(color ", color, ", key ", key, "): ", ncclGetErrorString(r), ". ",
                                ncclGetLastError(comm_)));
    int nccl_rank = -1;
    ncclCommUserRank(sub, &nccl_rank);
    if (nccl_rank != host_sub->rank()) {
      ncclCommDestroy(sub);
      return Error(absl::StrCat("ncclCommSplit ordered this rank ", nccl_rank, " where MPI_Comm_split put it at ",
                                host_sub->rank()));
    }
    return Wrap(std::move(host_sub), sub, device_, timeout_s_);
#else
    // Before NCCL 2.18: a fresh unique id per sub-group.
    return Create(std::move(host_sub), timeout_s_);
#endif
  }

  // Launches the queued sends and receives as one group.
  absl::Status FlushP2p() {
    if (queue_.empty()) return absl::OkStatus();
    std::vector<P2p> queue = std::move(queue_);
    queue_.clear();
    std::shared_ptr<Launch> launch = std::move(queued_);
    queued_.reset();
    LOOM_RETURN_IF_ERROR(Prepare());
    ncclResult_t r = ncclGroupStart();
    for (const P2p& m : queue) {
      if (r != ncclSuccess) break;
      r = m.send ? ncclSend(m.tensor.raw(), m.tensor.nbytes(), ncclUint8, m.peer, comm_, stream_)
                 : ncclRecv(m.tensor.raw(), m.tensor.nbytes(), ncclUint8, m.peer, comm_, stream_);
    }
    const ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess) r = end;
    if (r != ncclSuccess) return NcclError("send/recv group", r);
    return Record(*launch);
  }

  // Completes `launch`: polls its event, the NCCL error state and the clock.
  absl::Status WaitFor(Launch& launch, CommOp op) {
    if (!launch.launched) LOOM_RETURN_IF_ERROR(FlushP2p());
    if (!launch.launched) return Error(absl::StrCat(CommOpName(op), ": its send/recv group failed to launch (see the first error)"));
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    for (int spin = 0;; ++spin) {
      if (aborted_) return Aborted(CommOpName(op));
      const cudaError_t e = cudaEventQuery(launch.event);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return CudaStatus(e, CommOpName(op));
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        const std::string detail = ncclGetLastError(comm_);
        Abort();
        return Error(absl::StrCat(CommOpName(op), " in ", GroupName(), " failed: ", ncclGetErrorString(async), ". ",
                                  detail, "; the NCCL communicator was aborted"));
      }
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      if (waited > timeout_s_) {
        Abort();
        return absl::DeadlineExceededError(absl::StrCat(
            "[comm] world rank ", world_ranks_[rank_], ": nccl ", CommOpName(op), " in ", GroupName(), " waited ",
            static_cast<int>(waited), " s (parallel.timeout_s = ", timeout_s_,
            ") for a rank of the group that stopped answering (stopped, hung or dead); the NCCL communicator was "
            "aborted"));
      }
      if (spin < 2000) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(spin < 20000 ? 20 : 200));
      }
    }
  }

  bool TestDone(Launch& launch) {
    if (!launch.launched && (!FlushP2p().ok() || !launch.launched)) return true;  // Wait() reports the error
    return aborted_ || cudaEventQuery(launch.event) != cudaErrorNotReady;
  }

 private:
  struct P2p {
    bool send;
    Tensor tensor;
    int peer;
  };

  NcclCommunicator(std::unique_ptr<Communicator> host, ncclComm_t comm, int device, double timeout_s)
      : host_(std::move(host)), comm_(comm), device_(device), timeout_s_(timeout_s) {
    rank_ = host_->rank();
    size_ = host_->size();
    world_ranks_ = host_->world_ranks();
  }

  static absl::StatusOr<std::unique_ptr<Communicator>> Wrap(std::unique_ptr<Communicator> host, ncclComm_t comm,
                                                            int device, double timeout_s) {
    std::unique_ptr<NcclCommunicator> c(new NcclCommunicator(std::move(host), comm, device, timeout_s));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device), "cudaSetDevice"));
    LOOM_RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&c->ready_, cudaEventDisableTiming), "cudaEventCreate"));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&c->scratch_, sizeof(int32_t)), "cudaMalloc"));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaMemset(c->scratch_, 0, sizeof(int32_t)), "cudaMemset"));
    return std::unique_ptr<Communicator>(std::move(c));
  }

  static ncclRedOp_t NcclOp(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

  std::string GroupName() const {
    return absl::StrCat("a group of ", size_, " (world ranks ", absl::StrJoin(world_ranks_, ", "), ")");
  }

  Place Locate(std::initializer_list<const Tensor*> tensors) const {
    int gpu = 0, cpu = 0, other = 0;
    for (const Tensor* t : tensors) {
      if (t->device().is_cpu()) {
        ++cpu;
      } else if (t->device().index == device_) {
        ++gpu;
      } else {
        ++other;
      }
    }
    if (other > 0) return Place::kOtherGpu;
    if (gpu > 0 && cpu > 0) return Place::kMixed;
    return gpu > 0 ? Place::kGpu : Place::kCpu;
  }

  // The legacy default stream's work so far happens before the next launch.
  absl::Status Prepare() {
    if (aborted_) return Aborted("launch");
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(ready_, cudaStreamLegacy), "cudaEventRecord"));
    return CudaStatus(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent");
  }

  absl::Status Record(Launch& launch) {
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&launch.event, cudaEventDisableTiming), "cudaEventCreate"));
    LOOM_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(launch.event, stream_), "cudaEventRecord"));
    launch.launched = true;
    return absl::OkStatus();
  }

  // Launches one collective (`issue` makes the NCCL calls) after the queued
  // point-to-point messages, which were started first.
  template <typename Issue>
  CommHandle Enqueue(CommOp op, std::vector<Tensor> tensors, Issue issue) {
    if (absl::Status s = FlushP2p(); !s.ok()) return CommHandle(s);
    if (absl::Status s = Prepare(); !s.ok()) return CommHandle(s);
    if (ncclResult_t r = issue(); r != ncclSuccess) return CommHandle(NcclError(CommOpName(op), r));
    auto launch = std::make_shared<Launch>();
    launch->keep = std::move(tensors);
    if (absl::Status s = Record(*launch); !s.ok()) return CommHandle(s);
    return CommHandle(std::make_unique<NcclPending>(this, op, std::move(launch)));
  }

  // A GPU message joins the queue that the next flush launches as one group.
  CommHandle QueueP2p(bool send, const Tensor& t, int peer) {
    const CommOp op = send ? CommOp::kSend : CommOp::kRecv;
    if (peer < 0 || peer >= size_) return BadPeer(CommOpName(op), peer);
    if (aborted_) return CommHandle(Aborted(CommOpName(op)));
    if (!queued_) queued_ = std::make_shared<Launch>();
    queued_->keep.push_back(t);
    queue_.push_back({send, t, peer});
    return CommHandle(std::make_unique<NcclPending>(this, op, queued_));
  }

  void Abort() {
    if (aborted_) return;
    aborted_ = true;
    ncclCommAbort(comm_);
  }

  absl::Status Aborted(const std::string& what) const {
    return Error(absl::StrCat(what, " in ", GroupName(),
                              ": the NCCL communicator was aborted after an earlier failure (see the first error)"));
  }
  absl::Status NcclError(const std::string& what, ncclResult_t r) const {
    return Error(absl::StrCat(what, " in ", GroupName(), ": ", ncclGetErrorString(r), ". ", ncclGetLastError(comm_)));
  }
  CommHandle Unsupported(const char* what, DType dtype) {
    return CommHandle(Error(absl::StrCat(what, " of ", DTypeName(dtype),
                                         " tensors is not supported by the NCCL backend (mismatched dtypes)")));
  }
  CommHandle BadPeer(const char* what, int peer) {
    return CommHandle(Error(absl::StrCat(what, ": peer ", peer, " is not in a group of ", size_)));
  }
  CommHandle Misplaced(const char* what, std::initializer_list<const Tensor*> tensors) {
    std::vector<std::string> where;
    for (const Tensor* t : tensors) where.push_back(t->device().ToString());
    return CommHandle(Error(absl::StrCat(what, ": tensors on ", absl::StrJoin(where, " and "),
                                         "; this communicator takes tensors all on its GPU cuda:", device_,
                                         " or all on the CPU")));
  }

  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_;
  int device_;
  double timeout_s_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  void* scratch_ = nullptr;
  bool aborted_ = false;
  std::vector<P2p> queue_;
  std::shared_ptr<Launch> queued_;
};

absl::Status NcclPending::Wait() { return comm_->WaitFor(*launch_, op_); }
bool NcclPending::Test() { return comm_->TestDone(*launch_); }

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(std::unique_ptr<Communicator> host,
                                                                   double timeout_s) {
  return NcclCommunicator::Create(std::move(host), timeout_s);
}

}  // namespace loom

#else  // !LOOM_CUDA

namespace loom {

bool BuiltWithNccl() { return false; }

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(std::unique_ptr<Communicator>, double) {
  return absl::FailedPreconditionError(
      "[comm] the NCCL backend: Loom was built without CUDA (configure with -DLOOM_CUDA=ON), so there is no NCCL; "
      "use parallel.backend=mpi");
}

}  // namespace loom

#endif  // LOOM_CUDA
