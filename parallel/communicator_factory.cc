#include "parallel/communicator_factory.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"
#include "runtime/cuda_runtime.h"
#include "runtime/log.h"

#if LOOM_CUDA
#include <cuda_runtime.h>
#endif

namespace loom {
namespace {

bool EnvInt(const char* name, int* value) {
  const char* s = std::getenv(name);
  return s != nullptr && absl::SimpleAtoi(s, value);
}

// What every rank tells the others before the backend is chosen, as int32
// words (the world communicator moves tensors): the GPU it selected (-1:
// none), how many it sees, that GPU's UUID, and its host name.
constexpr int kUuidWords = 4, kHostWords = 16;
constexpr int kFactWords = 2 + kUuidWords + kHostWords;

struct RankFacts {
  int gpu = -1, visible = 0;
  std::string uuid;  // 16 raw bytes, "" without a GPU
  std::string host;
};

std::vector<int32_t> MyFacts(int gpu) {
  std::vector<int32_t> words(kFactWords, 0);
  words[0] = gpu;
  words[1] = CudaDeviceCount();
#if LOOM_CUDA
  if (gpu >= 0) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, gpu) == cudaSuccess) std::memcpy(&words[2], prop.uuid.bytes, 16);
  }
#endif
  char host[kHostWords * 4] = {};
  gethostname(host, sizeof(host) - 1);
  std::memcpy(&words[2 + kUuidWords], host, sizeof(host));
  return words;
}

RankFacts ReadFacts(const int32_t* w) {
  RankFacts f;
  f.gpu = w[0];
  f.visible = w[1];
  if (f.gpu >= 0) f.uuid.assign(reinterpret_cast<const char*>(&w[2]), 16);
  const char* host = reinterpret_cast<const char*>(&w[2 + kUuidWords]);
  f.host.assign(host, strnlen(host, kHostWords * 4));
  return f;
}

// Why NCCL cannot serve this world ("" when it can), from every rank's
// facts, so that every rank reaches the same answer.
std::string WhyNotNccl(const std::vector<RankFacts>& ranks, bool gpu_tensors) {
  if (!BuiltWithNccl()) return "Loom was built without CUDA, so without NCCL (configure with -DLOOM_CUDA=ON)";
  if (!gpu_tensors) return "this run keeps its tensors on the CPU and NCCL moves GPU tensors only";
  for (size_t r = 0; r < ranks.size(); ++r)
    if (ranks[r].gpu < 0) return absl::StrCat("world rank ", r, " on node ", ranks[r].host, " sees no GPU");
  // Ranks per GPU, by node in order of first appearance.
  std::vector<std::string> nodes;
  std::map<std::string, std::map<std::string, int>> users;  // node -> uuid -> ranks
  std::map<std::string, int> ranks_on;
  for (const RankFacts& f : ranks) {
    if (!ranks_on.count(f.host)) nodes.push_back(f.host);
    ++ranks_on[f.host];
    ++users[f.host][f.uuid];
  }
  for (const std::string& node : nodes) {
    const int gpus = static_cast<int>(users[node].size());
    if (ranks_on[node] > gpus)
      return absl::StrCat(ranks_on[node], " ranks on node ", node, " share ", gpus, gpus == 1 ? " GPU" : " GPUs",
                          "; NCCL refuses that");
  }
  return "";
}

}  // namespace

namespace {

// This rank's index among the ranks of its node (size: false) or their
// number (size: true): the launcher's variables, else MPI's shared-memory
// split; 0 and 1 for one process without MPI.
int NodeRankOrSize(bool size) {
  static const std::vector<const char*> kRankVars = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
  static const std::vector<const char*> kSizeVars = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"};
  int value = 0;
  for (const char* name : size ? kSizeVars : kRankVars)
    if (EnvInt(name, &value)) return value;
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return size ? 1 : 0;
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  if (size) MPI_Comm_size(node, &value);
  else MPI_Comm_rank(node, &value);
  MPI_Comm_free(&node);
  return value;
}

}  // namespace

int LocalRank() { return NodeRankOrSize(/*size=*/false); }
int LocalSize() { return NodeRankOrSize(/*size=*/true); }

int SelectLocalGpu() {
  static const int selected = [] {
    const int visible = CudaDeviceCount();
    return visible == 0 ? -1 : LocalRank() % visible;
  }();
#if LOOM_CUDA
  if (selected >= 0) cudaSetDevice(selected);
#endif
  return selected;
}

absl::StatusOr<std::unique_ptr<Communicator>> MakeWorld(const config::ParallelConfig& parallel, bool gpu_tensors) {
  LOOM_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> world, MpiWorld(parallel.timeout_s()));
  // srun without PMI starts N singletons: each would train the whole model alone.
  int step_tasks = 0, mpirun_size = 0;
  if (world->size() == 1 && !EnvInt("OMPI_COMM_WORLD_SIZE", &mpirun_size) &&
      EnvInt("SLURM_STEP_NUM_TASKS", &step_tasks) && step_tasks > 1)
    return absl::InvalidArgumentError(absl::StrCat(
        "[comm] srun started ", step_tasks, " tasks but MPI sees a world of 1: launch with srun --mpi=pmix (or "
        "--mpi=pmi2, whichever `srun --mpi=list` offers and Open MPI was built with) so that the tasks join"));
  const std::string& backend = parallel.backend();
  if (backend == "mpi" || (backend == "auto" && !gpu_tensors)) return world;

  const int gpu = gpu_tensors || backend == "nccl" ? SelectLocalGpu() : -1;
  const std::vector<int32_t> mine = MyFacts(gpu);
  Tensor in = Tensor::FromVector<int32_t>(mine, {kFactWords});
  Tensor all = Tensor::Empty({kFactWords * world->size()}, DType::kI32);
  LOOM_RETURN_IF_ERROR(world->AllGather(in, all));
  world->ResetCounters();
  std::vector<RankFacts> facts;
  for (int r = 0; r < world->size(); ++r) facts.push_back(ReadFacts(all.data<int32_t>() + r * kFactWords));
  const std::string why = WhyNotNccl(facts, gpu_tensors);
  if (!why.empty()) {
    if (backend == "nccl")
      return absl::InvalidArgumentError(absl::StrCat("parallel.backend=nccl: ", why, "; use parallel.backend=mpi"));
    if (world->rank() == 0) LogInfo("[comm] parallel.backend=auto chose MPI: ", why);
    return world;
  }
  const double timeout_s = parallel.timeout_s();
  return MakeNcclCommunicator(std::move(world), timeout_s);
}

}  // namespace loom
