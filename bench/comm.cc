// mpirun -np P loom-bench --what=comm [--comm_min_bytes=1024] [--comm_max_bytes=268435456]
//     [--comm_ops=all_reduce,all_gather,reduce_scatter,all_to_all,sendrecv]
//     [--comm_backends=mpi,nccl,mpi-staged] [--comm_seconds=0.05] [--steps N] [--json]
// Collective bandwidth as nccl-tests reports it, per backend, operation and
// size (f32 elements, sizes from --comm_min_bytes to --comm_max_bytes by
// powers of 4):
//   bytes     nccl-tests' "size": the whole buffer (all_reduce: the tensor;
//             all_gather: the gathered output; reduce_scatter: the input;
//             all_to_all: one rank's input; sendrecv: one message), rounded
//             down so that every rank's slice is whole
//   time_us   one operation, started and waited on; the mean over the
//             timed calls (batches of --steps, doubling until the slowest
//             rank has spent --comm_seconds, at most 1000 calls), the
//             slowest rank's
//   algbw     bytes / time
//   busbw     algbw · 2(n−1)/n for all_reduce; · (n−1)/n for all_gather,
//             reduce_scatter and all_to_all; · 1 for sendrecv (each rank
//             sends to rank+1 and receives from rank−1, both in flight)
//   errors    elements that differ from the expected values in a separate
//             check pass before timing (summed over ranks); must be 0
// Backends: "mpi" (CPU tensors), "nccl" (GPU tensors, one GPU per rank) and
// "mpi-staged" (GPU tensors through pinned host memory, GPUs may be shared);
// the GPU ones only in CUDA builds where every rank sees a GPU, each
// skipped with its reason otherwise.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench.h"
#include "parallel/communicator_factory.h"
#include "parallel/mpi_communicator.h"
#include "runtime/cuda_runtime.h"
#include "runtime/timer.h"

ABSL_FLAG(int64_t, comm_min_bytes, 1024, "smallest message size in bytes (sizes go up by powers of 4)");
ABSL_FLAG(int64_t, comm_max_bytes, int64_t{256} << 20, "largest message size in bytes");
ABSL_FLAG(std::string, comm_ops, "all_reduce,all_gather,reduce_scatter,all_to_all,sendrecv",
          "operations, comma separated");
ABSL_FLAG(std::string, comm_backends, "mpi,nccl,mpi-staged", "backends, comma separated: mpi, nccl, mpi-staged");
ABSL_FLAG(double, comm_seconds, 0.05, "time each size for at least this long (and at least --steps repetitions)");

namespace loom {
namespace {

// Element i of rank r's input: small integers, so that sums are exact in f32.
float InValue(int r, int64_t i) { return static_cast<float>(r + 1 + i % 8); }

struct Buffers {
  Tensor in, out;  // on the benchmarked device; `out` is `in` for all_reduce
  int64_t slice;   // elements of one rank's slice
};

// One benchmark case: nccl-tests' struct testColl, as a table entry.
struct Collective {
  const char* name;
  double (*bus_factor)(int n);
  // In and out element counts for a size of `elements` f32s; returns the slice.
  int64_t (*shape)(int64_t elements, int n, int64_t* in, int64_t* out);
  absl::Status (*run)(Communicator& c, Buffers& b);
  // Expected output element k on rank `me`.
  double (*expect)(int me, int n, int64_t slice, int64_t k);
};

double SumOverRanks(int n, int64_t i) { return n * (n + 1) / 2.0 + n * static_cast<double>(i % 8); }

const Collective kCollectives[] = {
    {"all_reduce", [](int n) { return 2.0 * (n - 1) / n; },
     [](int64_t e, int n, int64_t* in, int64_t* out) { return *in = *out = e; },
     [](Communicator& c, Buffers& b) { return c.AllReduce(b.in); },
     [](int, int n, int64_t, int64_t k) { return SumOverRanks(n, k); }},
    {"all_gather", [](int n) { return (n - 1.0) / n; },
     [](int64_t e, int n, int64_t* in, int64_t* out) {
       *in = e / n;
       *out = *in * n;
       return *in;
     },
     [](Communicator& c, Buffers& b) { return c.AllGather(b.in, b.out); },
     [](int, int, int64_t slice, int64_t k) { return static_cast<double>(InValue(k / slice, k % slice)); }},
    {"reduce_scatter", [](int n) { return (n - 1.0) / n; },
     [](int64_t e, int n, int64_t* in, int64_t* out) {
       *out = e / n;
       *in = *out * n;
       return *out;
     },
     [](Communicator& c, Buffers& b) { return c.ReduceScatter(b.in, b.out); },
     [](int me, int n, int64_t slice, int64_t k) { return SumOverRanks(n, me * slice + k); }},
    {"all_to_all", [](int n) { return (n - 1.0) / n; },
     [](int64_t e, int n, int64_t* in, int64_t* out) {
       *in = *out = e / n * n;
       return e / n;
     },
     [](Communicator& c, Buffers& b) { return c.AllToAll(b.in, b.out); },
     [](int me, int, int64_t slice, int64_t k) {
       return static_cast<double>(InValue(k / slice, me * slice + k % slice));
     }},
    {"sendrecv", [](int) { return 1.0; }, [](int64_t e, int, int64_t* in, int64_t* out) { return *in = *out = e; },
     [](Communicator& c, Buffers& b) -> absl::Status {
       const int n = c.size(), me = c.rank();
       CommHandle recv = c.StartRecv(b.out, (me + n - 1) % n);
       CommHandle send = c.StartSend(b.in, (me + 1) % n);
       absl::Status s = send.Wait();
       absl::Status r = recv.Wait();
       return s.ok() ? r : s;
     },
     [](int me, int n, int64_t, int64_t k) { return static_cast<double>(InValue((me + n - 1) % n, k)); }},
};

struct Row {
  std::string backend, op;
  int ranks = 0;
  int64_t bytes = 0, iters = 0;
  double seconds = 0, errors = 0;
};

Tensor OnDevice(const Tensor& cpu, Device device) {
  if (device.is_cpu()) return cpu;
  Tensor t = Tensor::Empty(cpu.shape(), cpu.dtype(), device);
  t.CopyFrom(cpu);
  return t;
}

// The slowest rank's value (or the sum) over `control`, the MPI world.
absl::StatusOr<double> Reduce(Communicator& control, double value, ReduceOp op) {
  Tensor t = Tensor::FromVector<double>({value}, {1});
  LOOM_RETURN_IF_ERROR(control.AllReduce(t, op));
  return t.Get(0);
}

absl::StatusOr<Row> Measure(Communicator& control, Communicator& c, const std::string& backend, Device device,
                            const Collective& coll, int64_t bytes) {
  const int n = c.size(), me = c.rank();
  int64_t in_n = 0, out_n = 0;
  const int64_t slice = coll.shape(std::max<int64_t>(bytes / 4, n), n, &in_n, &out_n);
  Row row{backend, coll.name, n};
  row.bytes = std::string(coll.name) == "all_gather" ? out_n * 4 : in_n * 4;

  // The check pass: known inputs, one call, every output element compared.
  Tensor in_host = Tensor::Empty({in_n}, DType::kF32);
  float* x = in_host.data<float>();
  for (int64_t i = 0; i < in_n; ++i) x[i] = InValue(me, i);
  Buffers b{OnDevice(in_host, device), Tensor(), slice};
  const bool in_place = std::string(coll.name) == "all_reduce";
  b.out = in_place ? b.in : Tensor::Zeros({out_n}, DType::kF32, device);
  LOOM_RETURN_IF_ERROR(coll.run(c, b));
  Tensor out_host = Tensor::Empty({out_n}, DType::kF32);
  out_host.CopyFrom(b.out);
  const float* y = out_host.data<float>();
  int64_t errors = 0;
  for (int64_t k = 0; k < out_n; ++k) errors += y[k] != coll.expect(me, n, slice, k);
  LOOM_ASSIGN_OR_RETURN(row.errors, Reduce(control, static_cast<double>(errors), ReduceOp::kSum));

  // Timing: batches of calls, doubling, until the slowest rank has spent
  // --comm_seconds (or 1000 calls); every rank agrees after each batch.
  LOOM_RETURN_IF_ERROR(coll.run(c, b));  // warm-up
  const double target = absl::GetFlag(FLAGS_comm_seconds);
  double spent = 0, slowest = 0;
  for (int64_t batch = std::max(1, absl::GetFlag(FLAGS_steps));; batch = std::min(row.iters, 1000 - row.iters)) {
    LOOM_RETURN_IF_ERROR(c.Barrier());
    Timer timer;
    for (int64_t i = 0; i < batch; ++i) LOOM_RETURN_IF_ERROR(coll.run(c, b));
    spent += timer.Seconds();
    row.iters += batch;
    LOOM_ASSIGN_OR_RETURN(slowest, Reduce(control, spent, ReduceOp::kMax));
    if (slowest >= target || row.iters >= 1000) break;
  }
  row.seconds = slowest / row.iters;
  return row;
}

void Print(const Row& r, const Collective& coll, bool json) {
  const double algbw = r.bytes / r.seconds / 1e9, busbw = algbw * coll.bus_factor(r.ranks);
  if (json) {
    std::printf(
        "{\"bench\": \"comm\", \"backend\": \"%s\", \"op\": \"%s\", \"ranks\": %d, \"bytes\": %lld, \"iters\": %lld, "
        "\"time_us\": %.3f, \"algbw_gbps\": %.4f, \"busbw_gbps\": %.4f, \"errors\": %.0f}\n",
        r.backend.c_str(), r.op.c_str(), r.ranks, static_cast<long long>(r.bytes), static_cast<long long>(r.iters),
        r.seconds * 1e6, algbw, busbw, r.errors);
  } else {
    std::printf("%-10s %-14s %5d %12lld %6lld %12.2f %10.3f %10.3f %7.0f\n", r.backend.c_str(), r.op.c_str(), r.ranks,
                static_cast<long long>(r.bytes), static_cast<long long>(r.iters), r.seconds * 1e6, algbw, busbw,
                r.errors);
  }
  std::fflush(stdout);
}

int BenchComm(const config::Config& config) {
  auto control_or = MpiWorld(/*timeout_s=*/600);
  if (!control_or.ok()) {
    std::fprintf(stderr, "loom-bench: %s\n", std::string(control_or.status().message()).c_str());
    return 1;
  }
  Communicator& control = **control_or;
  const bool lead = control.rank() == 0, json = absl::GetFlag(FLAGS_json);
  const int64_t min_bytes = absl::GetFlag(FLAGS_comm_min_bytes), max_bytes = absl::GetFlag(FLAGS_comm_max_bytes);
  if (min_bytes < 4 || max_bytes < min_bytes) {
    if (lead) std::fprintf(stderr, "loom-bench: --comm_min_bytes must be >= 4 and <= --comm_max_bytes\n");
    return 2;
  }
  std::vector<const Collective*> ops;
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_comm_ops), ',')) {
    const Collective* found = nullptr;
    for (const Collective& c : kCollectives)
      if (name == c.name) found = &c;
    if (!found) {
      if (lead) std::fprintf(stderr, "loom-bench: --comm_ops: '%s' is not one of all_reduce, all_gather, "
                                     "reduce_scatter, all_to_all, sendrecv\n", std::string(name).c_str());
      return 2;
    }
    ops.push_back(found);
  }
  // Every rank must see a GPU for the GPU backends (the same answer everywhere).
  auto min_gpus = Reduce(control, -CudaDeviceCount(), ReduceOp::kMax);
  if (!min_gpus.ok()) return 1;
  const bool gpus = -*min_gpus > 0;
  if (!json && lead)
    std::printf("%-10s %-14s %5s %12s %6s %12s %10s %10s %7s\n", "backend", "op", "ranks", "bytes", "iters",
                "time_us", "algbw GB/s", "busbw GB/s", "errors");
  for (absl::string_view backend_name : absl::StrSplit(absl::GetFlag(FLAGS_comm_backends), ',')) {
    const std::string backend(backend_name);
    std::unique_ptr<Communicator> owned;
    Device device = Device::Cpu();
    if (backend == "mpi") {
      auto w = MpiWorld(600);
      if (!w.ok()) return 1;
      owned = std::move(*w);
    } else if (backend == "nccl" || backend == "mpi-staged") {
      if (!gpus) {
        if (lead) std::fprintf(stderr, "loom-bench: %s skipped: a rank sees no GPU%s\n", backend.c_str(),
                               BuiltWithCuda() ? "" : " (CPU-only build)");
        continue;
      }
      config::ParallelConfig parallel = config.parallel();
      parallel.set_backend(backend == "nccl" ? "nccl" : "mpi");
      parallel.set_timeout_s(600);
      auto w = MakeWorld(parallel, /*gpu_tensors=*/true);
      if (!w.ok()) {
        if (lead) std::fprintf(stderr, "loom-bench: %s skipped: %s\n", backend.c_str(),
                               std::string(w.status().message()).c_str());
        continue;
      }
      owned = std::move(*w);
      device = Device::Cuda(SelectLocalGpu());
    } else {
      if (lead) std::fprintf(stderr, "loom-bench: --comm_backends: '%s' is not mpi, nccl or mpi-staged\n",
                             backend.c_str());
      return 2;
    }
    for (const Collective* coll : ops) {
      for (int64_t bytes = min_bytes; bytes <= max_bytes; bytes *= 4) {
        auto row = Measure(control, *owned, backend, device, *coll, bytes);
        if (!row.ok()) {
          std::fprintf(stderr, "loom-bench: %s %s %lld bytes: %s\n", backend.c_str(), coll->name,
                       static_cast<long long>(bytes), std::string(row.status().message()).c_str());
          return 1;
        }
        if (lead) Print(*row, *coll, json);
      }
    }
  }
  return 0;
}

LOOM_BENCHMARK("comm", "collective time and bus bandwidth (nccl-tests' definition) by size and backend", BenchComm);

}  // namespace
}  // namespace loom
