#include "parallel/solo_communicator.h"

#include <cstdlib>

namespace loom {
namespace {

absl::Status Mismatch(const char* what, const Tensor& in, const Tensor& out) {
  if (in.numel() == out.numel() && in.dtype() == out.dtype()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("[comm] ", what, ": input ", ShapeString(in.shape()), " ",
                                          DTypeName(in.dtype()), " and output ", ShapeString(out.shape()), " ",
                                          DTypeName(out.dtype()), " differ in a world of one"));
}

CommHandle Copy(const char* what, const Tensor& in, Tensor& out) {
  absl::Status s = Mismatch(what, in, out);
  if (!s.ok()) return CommHandle(s);
  if (in.raw() != out.raw()) out.CopyFrom(in);
  return CommHandle();
}

class SoloCommunicator : public Communicator {
 public:
  std::string backend() const override { return "solo"; }
  CommHandle StartAllReduce(Tensor& t, ReduceOp) override {
    Count(CommOp::kAllReduce, t.nbytes());
    return CommHandle();
  }
  CommHandle StartReduceScatter(const Tensor& in, Tensor& out, ReduceOp) override {
    Count(CommOp::kReduceScatter, in.nbytes());
    return Copy("reduce_scatter", in, out);
  }
  CommHandle StartAllGather(const Tensor& in, Tensor& out) override {
    Count(CommOp::kAllGather, in.nbytes());
    return Copy("all_gather", in, out);
  }
  CommHandle StartAllToAllV(const Tensor& in, const std::vector<int64_t>&, Tensor& out,
                            const std::vector<int64_t>&) override {
    Count(CommOp::kAllToAll, in.nbytes());
    return Copy("all_to_allv", in, out);
  }
  CommHandle StartSend(const Tensor& t, int peer, int) override {
    Count(CommOp::kSend, t.nbytes(), peer);
    return CommHandle(absl::InternalError("[comm] send in a world of one: no peer"));
  }
  CommHandle StartRecv(Tensor& t, int peer, int) override {
    Count(CommOp::kRecv, t.nbytes(), peer);
    return CommHandle(absl::InternalError("[comm] recv in a world of one: no peer"));
  }
  CommHandle StartBroadcast(Tensor& t, int) override {
    Count(CommOp::kBroadcast, t.nbytes(), 0);
    return CommHandle();
  }
  CommHandle StartBarrier() override {
    Count(CommOp::kBarrier, 0);
    return CommHandle();
  }
  absl::StatusOr<std::unique_ptr<Communicator>> Split(int, int) override {
    return std::unique_ptr<Communicator>(new SoloCommunicator());
  }
};

}  // namespace

std::unique_ptr<Communicator> SoloWorld() { return std::make_unique<SoloCommunicator>(); }

bool LaunchedByParallelLauncher() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "SLURM_STEP_ID"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

int LauncherRank() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"})
    if (const char* value = std::getenv(var)) return std::atoi(value);
  return -1;
}

}  // namespace loom
