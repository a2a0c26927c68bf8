// loom-train --config FILE [--set a.b=v ...]: trains a model on one process
// or, under `mpirun -np N` / `srun`, on N ranks laid out by parallel.tp, cp,
// pp (dp derived; parallel/topology.h). Rank 0 prints one line per log step and appends every step to
// <train.run_dir>/metrics.jsonl. Checkpoints go to checkpoint.dir every
// checkpoint.every steps and whenever SIGTERM (a SLURM preemption) or Ctrl-C
// stops the run at a step boundary; a restarted run resumes from the newest
// checkpoint that verifies and continues bit for bit.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

#include <google/protobuf/text_format.h>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/oracle_export.h"
#include "data/associative_recall.h"
#include "data/gpt_dataset.h"
#include "data/needle.h"
#include "launch/stages.h"
#include "model/memory_estimate.h"
#include "model/model.h"
#include "model/moe.h"
#include "model/pipeline.h"
#include "ops/softmax_attention.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "parallel/communicator_factory.h"
#include "parallel/context_parallel.h"
#include "parallel/data_parallel.h"
#include "parallel/expert_parallel.h"
#include "parallel/mpi_communicator.h"
#include "parallel/process_groups.h"
#include "parallel/solo_communicator.h"
#include "parallel/tensor_parallel.h"
#include "runtime/config.h"
#include "runtime/cuda_runtime.h"
#include "runtime/host_snapshot.h"
#include "runtime/log.h"
#include "runtime/metrics.h"
#include "runtime/tensorboard.h"
#include "runtime/timer.h"
#include "runtime/tool_flags.h"

ABSL_FLAG(bool, dry_run, false,
          "print the layout, parameters, FLOPs per step and memory per rank for the config, then exit without training");
ABSL_FLAG(int, world_size, 0, "with --dry-run: plan for this many ranks (0: the ranks launched)");
ABSL_FLAG(double, peak_tflops, 0,
          "peak dense TFLOP/s of one device for MFU; 0: 989 (H100/H200 dense bf16) on the GPU, no MFU on the CPU");
ABSL_FLAG(bool, export_oracle, false,
          "write <run_dir>/oracle/: the initial weights and every micro-batch trained on, for bench/torch_oracle.py "
          "(docs/oracle.md); one process, fresh runs only");

namespace loom {
namespace {

volatile std::sig_atomic_t g_stop = 0;
volatile std::sig_atomic_t g_signal = 0;
void OnSignal(int sig) {
  g_stop = 1;
  g_signal = sig;
}

std::string HumanCount(double n) {
  if (n >= 1e9) return absl::StrFormat("%.2fB", n / 1e9);
  if (n >= 1e6) return absl::StrFormat("%.2fM", n / 1e6);
  if (n >= 1e3) return absl::StrFormat("%.1fk", n / 1e3);
  return absl::StrFormat("%.0f", n);
}

std::string HumanBytes(double b) {
  if (b >= 1 << 30) return absl::StrFormat("%.2f GiB", b / (1 << 30));
  if (b >= 1 << 20) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  return absl::StrFormat("%.1f KiB", b / 1024);
}

// Batches for training and evaluation, from the built-in recall task or from
// indexed datasets. Sample i of a split is a pure function of (seed, i).
class DataSource {
 public:
  static absl::StatusOr<DataSource> Create(const config::Config& config) {
    DataSource d;
    if (config.data().task() == "recall") {
      d.recall_ = std::make_shared<AssociativeRecall>(config);
      return d;
    }
    if (config.data().task() == "needle") {
      d.needle_ = std::make_shared<Needle>(config);
      return d;
    }
    GptDatasetOptions o;
    for (const auto& p : config.data().paths()) o.sources.push_back({p.prefix(), p.weight()});
    o.split = config.data().split();
    o.seq_len = config.train().seq_len();
    o.seed = config.train().seed();
    o.eod_token = config.data().eod_token();
    o.reset_positions = config.data().reset_positions();
    o.reset_attention = config.data().reset_attention();
    LOOM_ASSIGN_OR_RETURN(std::unique_ptr<GptDataset> text, GptDataset::Open(o));
    if (text->num_tokens(GptDataset::Split::kTrain) == 0)
      return absl::InvalidArgumentError("data.split: the train split has no tokens");
    d.text_ = std::move(text);
    return d;
  }
  const char* name() const {
    return recall_ ? "associative recall" : needle_ ? "needle in a haystack" : "indexed datasets";
  }
  // A built-in task with answers to count (recall or needle).
  bool is_recall() const { return recall_ != nullptr || needle_ != nullptr; }
  double chance() const { return recall_ ? recall_->chance() : needle_ ? needle_->chance() : 0.0; }
  bool has_eval() const { return is_recall() || text_->num_tokens(GptDataset::Split::kValid) > 0; }
  Batch Train(int64_t first, int64_t rows) const {
    if (needle_) return needle_->MakeBatch(Needle::Split::kTrain, first, rows);
    return recall_ ? recall_->MakeBatch(AssociativeRecall::Split::kTrain, first, rows)
                   : text_->MakeBatch(GptDataset::Split::kTrain, first, rows);
  }
  Batch Eval(int64_t first, int64_t rows) const {
    if (needle_) return needle_->MakeBatch(Needle::Split::kEval, first, rows);
    return recall_ ? recall_->MakeBatch(AssociativeRecall::Split::kEval, first, rows)
                   : text_->MakeBatch(GptDataset::Split::kValid, first, rows);
  }

 private:
  std::shared_ptr<AssociativeRecall> recall_;
  std::shared_ptr<Needle> needle_;
  std::shared_ptr<GptDataset> text_;
};

struct EvalResult {
  double loss = 0;  // mean over counted tokens
  Accuracy accuracy;
};

// Mean loss (and answer accuracy) over train.eval_sequences held-out
// sequences, split over the data-parallel ranks and summed over `group`.
// This rank's zig-zag share of a global micro-batch under context
// parallelism (the batch itself otherwise).
absl::StatusOr<Batch> LocalShare(Batch batch, const ProcessGroups& groups) {
  if (groups.layout.cp == 1) return batch;
  LOOM_ASSIGN_OR_RETURN(ZigzagShard shard, ZigzagShardBatch(batch, groups.layout.cp, groups.coords.cp));
  shard.batch.cp_chunks = std::make_shared<CpChunks>(shard.chunks);
  return shard.batch;
}

absl::StatusOr<EvalResult> Evaluate(Model& model, const DataSource& data, const config::Config& config,
                                    const ProcessGroups& groups) {
  Communicator& group = *groups.dp_cp;
  const int dp_rank = groups.coords.dp, dp = groups.layout.dp;
  const int64_t total = config.train().eval_sequences(), micro = config.train().micro_batch();
  const int64_t begin = total * dp_rank / dp, end = total * (dp_rank + 1) / dp;
  Tensor sums = Tensor::Zeros({4}, DType::kF64);  // loss, counted, correct, answers
  double* sum = sums.data<double>();
  std::vector<Batch> batches;
  for (int64_t first = begin; first < end; first += micro) {
    LOOM_ASSIGN_OR_RETURN(Batch batch, LocalShare(data.Eval(first, std::min(micro, end - first)), groups));
    batches.push_back(std::move(batch));
  }
  const Device device = model.dims().device;
  std::vector<Batch> on_device;
  for (const Batch& b : batches) on_device.push_back(b.To(device));
  std::vector<Tensor> predictions(batches.size());
  if (groups.layout.pp == 1) {
    for (size_t i = 0; i < batches.size(); ++i) {
      Tensor predicted = Tensor::Empty({batches[i].tokens_count()}, DType::kI32, device);
      const auto ce = model.Evaluate(on_device[i], 1.0, &predicted);
      predictions[i] = predicted.To(Device::Cpu());
      sum[0] += ce.loss;
      sum[1] += ce.counted;
    }
  } else {
    LOOM_ASSIGN_OR_RETURN(const auto ce, PipelineEvaluate(model, *groups.pp, on_device, &predictions));
    sum[0] += ce.loss;
    sum[1] += ce.counted;
  }
  for (size_t i = 0; i < batches.size(); ++i) {
    if (!predictions[i].defined()) continue;  // not the last pipeline stage
    const Accuracy a = CountCorrect(predictions[i], batches[i].targets);
    sum[2] += a.correct;
    sum[3] += a.total;
  }
  LOOM_RETURN_IF_ERROR(group.AllReduce(sums));
  if (groups.layout.pp > 1) LOOM_RETURN_IF_ERROR(groups.pp->AllReduce(sums));  // from the last stage
  EvalResult r;
  r.loss = sum[0] / std::max(sum[1], 1.0);
  r.accuracy.correct = static_cast<int64_t>(sum[2]);
  r.accuracy.total = static_cast<int64_t>(sum[3]);
  return r;
}

absl::Status WriteFile(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out.good()) return absl::InternalError(absl::StrCat(path.string(), ": cannot write"));
  return absl::OkStatus();
}

// Strings between ranks: the length, then the bytes packed in 64-bit words
// (communicators move typed tensors).
Tensor PackedBytes(const std::string& bytes, int64_t size) {
  Tensor words = Tensor::Zeros({(size + 7) / 8}, DType::kI64);
  if (!bytes.empty()) std::memcpy(words.raw(), bytes.data(), bytes.size());
  return words;
}

std::string UnpackedBytes(const Tensor& words, int64_t size) {
  return size == 0 ? std::string() : std::string(static_cast<const char*>(words.raw()), static_cast<size_t>(size));
}

absl::Status SendBytes(Communicator& comm, int peer, const std::string& bytes) {
  const int64_t n = static_cast<int64_t>(bytes.size());
  LOOM_RETURN_IF_ERROR(comm.Send(Tensor::FromVector<int64_t>({n}, {1}), peer));
  return n == 0 ? absl::OkStatus() : comm.Send(PackedBytes(bytes, n), peer);
}

absl::StatusOr<std::string> RecvBytes(Communicator& comm, int peer) {
  Tensor n = Tensor::Empty({1}, DType::kI64);
  LOOM_RETURN_IF_ERROR(comm.Recv(n, peer));
  const int64_t size = n.data<int64_t>()[0];
  Tensor words = PackedBytes("", size);
  if (size > 0) LOOM_RETURN_IF_ERROR(comm.Recv(words, peer));
  return UnpackedBytes(words, size);
}

// `bytes` of rank `root` on every rank of `comm`.
absl::Status BroadcastBytes(Communicator& comm, int root, std::string& bytes) {
  Tensor n = Tensor::FromVector<int64_t>({static_cast<int64_t>(bytes.size())}, {1});
  LOOM_RETURN_IF_ERROR(comm.Broadcast(n, root));
  const int64_t size = n.data<int64_t>()[0];
  Tensor words = PackedBytes(comm.rank() == root ? bytes : "", size);
  if (size > 0) LOOM_RETURN_IF_ERROR(comm.Broadcast(words, root));
  bytes = UnpackedBytes(words, size);
  return absl::OkStatus();
}

// FindResumePoint (launch/stages.h) on world rank 0, which reads and
// verifies the checkpoints; every rank gets its answer.
absl::StatusOr<ResumePoint> FindResumePointOnRankZero(const config::Config& config, Communicator& world) {
  ResumePoint point;
  absl::Status found;
  if (world.rank() == 0) {
    absl::StatusOr<ResumePoint> p = FindResumePoint(config);
    if (p.ok()) point = *p;
    else found = p.status();
  }
  std::string answer = found.ok() ? absl::StrCat(point.step, " ", point.step_dir) : "error";
  LOOM_RETURN_IF_ERROR(BroadcastBytes(world, 0, answer));
  if (!found.ok()) return found;
  const size_t space = answer.find(' ');
  if (space == std::string::npos || !absl::SimpleAtoi(answer.substr(0, space), &point.step))
    return absl::InternalError("rank 0 could not find the checkpoint to resume from (see its message)");
  point.step_dir = answer.substr(space + 1);
  return point;
}

// The slice of the global tensor that a rank's parameter holds (its TP
// shard, or all of it).
checkpoint::Piece SliceOf(const Param& p) {
  checkpoint::Piece piece;
  piece.global = p.global_shape;
  piece.start.assign(p.global_shape.size(), 0);
  if (p.sharded()) piece.start[p.split_dim] = p.split_start;
  piece.length = p.value.shape();
  return piece;
}

// Keeps the metrics.jsonl records of steps <= `step`, so that a resumed run
// logs no step twice.
absl::Status CutMetricsBack(const std::filesystem::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in.good()) return absl::OkStatus();
  std::string kept, line;
  while (std::getline(in, line)) {
    const size_t at = line.find("\"step\": ");
    if (at != std::string::npos && std::stoll(line.substr(at + 8)) > step) continue;
    kept += line + "\n";
  }
  in.close();
  return WriteFile(path, kept);
}

// A dense checkpoint loads into the MoH model of the same layers (S -> H,
// L -> R, docs/moh.md): the router weights it lacks keep their
// initialisation.
bool DenseToMoh(const std::string& saved, const std::string& now) {
  if (saved.size() != now.size() || saved == now) return false;
  for (size_t i = 0; i < saved.size(); ++i)
    if (saved[i] != now[i] && !(saved[i] == 'S' && now[i] == 'H') && !(saved[i] == 'L' && now[i] == 'R')) return false;
  return true;
}

// The model fields that differ between two configs, "model.hidden 128 -> 256".
std::vector<std::string> ModelDifferences(const config::ModelConfig& saved, const config::ModelConfig& now) {
  std::vector<std::string> diffs;
  const auto* d = config::ModelConfig::descriptor();
  const bool to_moh = DenseToMoh(saved.pattern(), now.pattern());
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    if (f->name() == "recompute") continue;  // memory policy, not shape
    if (to_moh && (f->name() == "pattern" || f->name() == "moh")) continue;
    // Position scaling, changed on purpose to extend a trained model's context.
    if (f->name() == "rope_scaling" || f->name() == "rope_theta") continue;
    std::string a, b;
    google::protobuf::TextFormat::PrintFieldValueToString(saved, f, -1, &a);
    google::protobuf::TextFormat::PrintFieldValueToString(now, f, -1, &b);
    if (a != b) diffs.push_back(absl::StrCat("model.", f->name(), " ", a, " -> ", b));
  }
  return diffs;
}

// --dry-run's plan of a stage's rank: the trainer's tensors for this config
// and layout on `device` (model/memory_estimate.h).
absl::StatusOr<MemoryEstimate> PlanStage(const config::Config& config, const Layout& layout, Device device,
                                         int stage) {
  ModelDims dims = ModelDims::FromConfig(config);
  dims.device = device;
  MemoryEstimateOptions options = MemoryEstimateOptionsFromConfig(config, layout);
  options.pp_rank = stage;
  return EstimateMemory(dims, options);
}

// The plan against the memory of a rank's device (its GPU, or the host),
// shared by the node's ranks that use it.
struct MemoryFit {
  int64_t plan = 0, capacity = 0;
  std::string where;  // "GPU 0", "the host / 2 ranks"
  std::string ToString() const {
    return absl::StrCat(HumanBytes(plan), " a rank planned (--dry-run) of ", HumanBytes(capacity), " (", where, ")");
  }
};

absl::StatusOr<MemoryFit> FitMemory(const config::Config& config, const Layout& layout, Device device) {
  MemoryFit fit;
  for (int stage = 0; stage < layout.pp; ++stage) {
    LOOM_ASSIGN_OR_RETURN(const MemoryEstimate m, PlanStage(config, layout, device, stage));
    fit.plan = std::max(fit.plan, m.total());
  }
  const bool cpu = device.is_cpu();
  const int local = std::max(1, LocalSize()), gpus = cpu ? 1 : std::max(1, CudaDeviceCount());
  const int sharing = (local + gpus - 1) / gpus;  // a node's GPUs go round-robin to its ranks
  const int64_t whole =
      cpu ? int64_t{sysconf(_SC_PHYS_PAGES)} * sysconf(_SC_PAGE_SIZE) : CudaDeviceTotalBytes(device.index);
  fit.capacity = whole / sharing;
  fit.where = cpu ? "the host" : absl::StrCat("GPU ", device.index);
  if (sharing > 1) absl::StrAppend(&fit.where, " / ", sharing, " ranks");
  return fit;
}

class Trainer {
 public:
  Trainer(const config::Config& config, Device device, DataSource data, Communicator& world, ProcessGroups& groups,
          const TrainStagePlan& stage)
      : config_(config),
        moe_parallel_{.stats = groups.dp_cp.get(), .ep = groups.ep.get()},
        dims_(PlacedDims(config, device, &moe_parallel_)),
        world_(world),
        groups_(groups),
        tp_{groups.tp.get(), groups.coords.tp, groups.layout.tp, config.parallel().sequence_parallel()},
        cp_(MakeContextParallel(config, groups)),
        model_(dims_, tp_, cp_, PipelineParallel{groups.layout.pp, groups.coords.pp, groups.layout.vpp}),
        dp_(model_.params(), groups.dp_cp.get(), groups.expert_dp.get(), &world, groups.coords.tp, DpOptions(config)),
        data_(std::move(data)),
        run_dir_(config.train().run_dir()),
        ckpt_dir_(config.checkpoint().dir().empty() ? (run_dir_ / "checkpoints").string()
                                                    : config.checkpoint().dir()),
        lead_(world.rank() == 0),
        stage_(stage) {
    model_.set_grad_ready_hook([this](const ParamList& ready) { dp_.GradReady(ready); });
  }

  // fit: the memory plan against the device, said once the run is laid out.
  absl::Status Run(const MemoryFit& fit) {
    absl::Status status = RunSteps(fit);
    if (status.ok()) return FinishSave();
    // A failed run lets the write in flight finish. Alone it publishes it;
    // with other ranks, which may be gone, it cannot (that is collective).
    if (writing_step_ >= 0) {
      if (world_.size() == 1) {
        if (absl::Status s = FinishSave(); !s.ok()) LogWarning(s.message());
      } else {
        writing_.wait();
        LogWarning("the checkpoint of step ", writing_step_, " was being written when the run failed: not published");
        writing_step_ = -1;
      }
    }
    return status;
  }

 private:
  absl::Status RunSteps(const MemoryFit& fit) {
    const auto& tc = config_.train();
    const Layout& layout = groups_.layout;
    if (lead_) {
      LOOM_RETURN_IF_ERROR(WriteFile(run_dir_ / "config.textproto", ConfigToText(config_)));
      LOOM_RETURN_IF_ERROR(WriteFile(run_dir_ / "version.txt", absl::StrCat("loom ", LOOM_VERSION, "\n")));
      // An unusable checkpoint.dir fails the run now, not at its first save.
      LOOM_RETURN_IF_ERROR(checkpoint::PrepareCheckpointDir(ckpt_dir_));
    }
    LOOM_ASSIGN_OR_RETURN(const int64_t start, Resume());
    if (start < stage_.first_step)
      return absl::InvalidArgumentError(absl::StrCat("resumed at step ", start, ", before train.stages[", stage_.index,
                                                     "] starts (step ", stage_.first_step, ")"));
    std::unique_ptr<checkpoint::OracleExport> oracle;  // --export_oracle
    if (absl::GetFlag(FLAGS_export_oracle)) {
      LOOM_ASSIGN_OR_RETURN(oracle, checkpoint::OracleExport::Start((run_dir_ / "oracle").string(), config_, dims_,
                                                                    model_.params(), layout.world, start));
    }
    MetricsWriter metrics;
    if (lead_) {
      LOOM_RETURN_IF_ERROR(CutMetricsBack(run_dir_ / "metrics.jsonl", start));
      LOOM_RETURN_IF_ERROR(metrics.Open((run_dir_ / "metrics.jsonl").string()));
    }

    const int64_t micro = tc.micro_batch(), global = tc.global_batch(), steps = tc.steps();
    const int64_t per_rank = global / layout.dp, first_of_rank = groups_.coords.dp * per_rank;
    const int64_t tokens_per_step = global * tc.seq_len();
    const double flops_per_step = dims_.FlopsPerToken(tc.seq_len()) * tokens_per_step;
    if (lead_) LOOM_RETURN_IF_ERROR(tb_.Open((run_dir_ / "tb").string()));
    LogInfo("loom ", LOOM_VERSION, " | model ", dims_.kinds, " hidden ", dims_.hidden, " heads ", dims_.heads,
            "/", dims_.kv_heads, " | ", HumanCount(dims_.ParameterCount(true)), " parameters (",
            HumanCount(dims_.ParameterCount(false)), " without embeddings) | ", DTypeName(dims_.act_dtype()),
            dims_.mixed_bf16 ? absl::StrCat(" (", DTypeName(dims_.dtype), " master weights)") : "",
            " on ", DeviceDescription(dims_.device));
    if (layout.world > 1)
      LogInfo("ranks: ", layout.world, " = ", layout.ToString(), config_.parallel().zero() ? " | ZeRO-1" : "",
              " | ", world_.backend(), " backend | ", dp_.buckets(), " gradient buckets");
    LogInfo("data: ", data_.name(), ", seq_len ", tc.seq_len(),
            " | ", steps, " steps of ", global, " sequences | run dir ", tc.run_dir());
    if (stage_.count > 1)
      LogInfo(absl::StrFormat("stage %d of %d: steps %d-%d, seq_len %d, cp %d, dp %d, lr %.3g, data from token %d",
                              stage_.index + 1, stage_.count, stage_.first_step + 1, steps, tc.seq_len(), layout.cp,
                              layout.dp, config_.optim().lr(), stage_.data_tokens_at(start)));
    LogInfo("memory: ", fit.ToString());

    if (start >= steps) {
      LogInfo("already at step ", start, " of train.steps = ", steps,
              ": nothing to train (raise train.steps to continue, or set checkpoint.resume=none)");
      return LogEval(start, metrics).status();
    }
    Timer total_timer;
    int64_t step = start, skipped = 0;
    double loss = 0, grad_norm = 0;
    for (; step < steps; ++step) {
      LOOM_ASSIGN_OR_RETURN(const bool stop, StepBoundary());
      if (stop) break;
      Timer step_timer;
      std::vector<Batch> batches;
      for (int64_t first = 0; first < per_rank; first += micro) {
        LOOM_ASSIGN_OR_RETURN(Batch b, LocalShare(data_.Train(stage_.first_sample() + (step - stage_.first_step) * global + first_of_rank + first, micro),
                                               groups_));
        batches.push_back(std::move(b));
      }
      if (oracle) LOOM_RETURN_IF_ERROR(oracle->WriteStep(step, batches));
      // The loss is normalised by the step's global count of target tokens
      // (counted on the host batches, before they cross to the device).
      Tensor stats = Tensor::Zeros({2}, DType::kF64);  // targets, loss
      for (const Batch& b : batches) stats.data<double>()[0] += b.CountTargets();
      for (Batch& b : batches) b = b.To(dims_.device);
      LOOM_RETURN_IF_ERROR(groups_.dp_cp->AllReduce(stats));
      const double normalizer = std::max(stats.data<double>()[0], 1.0);
      if (layout.pp == 1) {
        stats.data<double>()[1] = model_.StepGradients(batches, normalizer);
      } else {
        LOOM_ASSIGN_OR_RETURN(stats.data<double>()[1], PipelineStepGradients(model_, *groups_.pp, batches, normalizer));
      }
      LOOM_RETURN_IF_ERROR(dp_.ReduceGradients());
      Tensor loss_sum = stats.Slice(1, 1);
      LOOM_RETURN_IF_ERROR(groups_.dp_cp->AllReduce(loss_sum));
      if (layout.pp > 1) LOOM_RETURN_IF_ERROR(groups_.pp->AllReduce(loss_sum));  // from the last stage
      loss = loss_sum.data<double>()[0];
      LOOM_ASSIGN_OR_RETURN(grad_norm, dp_.ClipGradients(config_.optim().grad_clip()));
      if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
        const std::string where = FirstNonFinite();
        if (!tc.skip_nonfinite())
          return absl::InternalError(absl::StrCat("step ", step + 1, ": non-finite loss (", loss,
                                                  ") or gradient, first in ", where,
                                                  "; set train.skip_nonfinite=true to skip such steps"));
        ++skipped;
        LogWarning("step ", step + 1, ": non-finite loss or gradient (first in ", where, "), step skipped (",
                   skipped, " so far)");
        continue;
      }
      const double lr = LearningRate(config_.optim(), step - stage_.first_step, steps - stage_.first_step);
      LOOM_RETURN_IF_ERROR(dp_.Step(lr));
      if (!dims_.device.is_cpu()) CudaSynchronize();  // the step's kernels are done
      const double seconds = step_timer.Seconds();
      const double tokens_per_s = tokens_per_step / seconds;
      // docs/metrics.md: model FLOPs of the step over its time, per rank;
      // MFU divides by the device's peak (--peak_tflops).
      const double tflops = flops_per_step / seconds / layout.world / 1e12;
      // DESIGN.md: MFU against 989 TFLOP/s (H100/H200 dense bf16) on the GPU.
      const double peak = absl::GetFlag(FLAGS_peak_tflops) > 0 ? absl::GetFlag(FLAGS_peak_tflops)
                          : dims_.device.is_cpu()            ? 0.0
                                                             : 989.0;
      const double max_rss_mb = MaxRssMb(), tensor_peak_mb = PeakTensorBytes() / 1048576.0;
      std::vector<std::pair<std::string, double>> record = {
          {"loss", loss}, {"lr", lr}, {"grad_norm", grad_norm}, {"tokens_per_s", tokens_per_s},
          {"tflops_per_rank", tflops}, {"max_rss_mb", max_rss_mb}, {"tensor_peak_mb", tensor_peak_mb},
          {"elapsed_s", total_timer.Seconds()}};
      if (peak > 0) record.insert(record.begin() + 5, {"mfu", tflops / peak});
      // MoE routing of the step's last micro-batch, per layer of the model
      // (every pipeline stage's layers).
      LOOM_ASSIGN_OR_RETURN(const auto routing, AllRoutingStatistics());
      const auto& [moe_stats, moh_stats] = routing;
      for (const auto& [layer, r] : moe_stats) {
        const std::string key = absl::StrCat("moe/layer", layer, "/");
        record.insert(record.end(), {{key + "load_min", r.load_min},
                                     {key + "load_max", r.load_max},
                                     {key + "load_cv", r.load_cv},
                                     {key + "dropped", static_cast<double>(r.dropped)}});
      }
      for (const auto& [layer, r] : moh_stats) {  // MoH: the load of the routed heads
        const std::string key = absl::StrCat("moh/layer", layer, "/");
        record.insert(record.end(), {{key + "load_min", r.load_min}, {key + "load_max", r.load_max},
                                     {key + "load_cv", r.load_cv}});
      }
      LOOM_RETURN_IF_ERROR(Record(metrics, step + 1, record));
      if ((step + 1) % tc.log_every() == 0 || step == start || step + 1 == steps) {
        LogInfo(absl::StrFormat("step %5d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | %.3g TFLOP/s%s | "
                                "mem %.0f MB (tensors %.0f MB) | %.1f s",
                                step + 1, steps, loss, lr, grad_norm, HumanCount(tokens_per_s), tflops,
                                peak > 0 ? absl::StrFormat(" | MFU %.1f%%", 100 * tflops / peak) : "", max_rss_mb,
                                tensor_peak_mb, total_timer.Seconds()));
        // MoE routing of the step's last micro-batch, one line per MoE layer.
        for (const auto& [layer, r] : moe_stats)
          LogInfo(absl::StrFormat("  moe layer %d | expert load min %.0f max %.0f cv %.4f | dropped %d of %d", layer,
                                  r.load_min, r.load_max, r.load_cv, r.dropped, r.assignments));
        for (const auto& [layer, r] : moh_stats)
          LogInfo(absl::StrFormat("  moh layer %d | head load min %.0f max %.0f cv %.4f of %d", layer, r.load_min,
                                  r.load_max, r.load_cv, r.assignments));
      }
      if (tc.eval_every() > 0 && (step + 1) % tc.eval_every() == 0 && step + 1 < steps) {
        LOOM_RETURN_IF_ERROR(LogEval(step + 1, metrics).status());
      }
      const int every = config_.checkpoint().every();
      if (every > 0 && (step + 1) % every == 0) LOOM_RETURN_IF_ERROR(Save(step + 1));
    }
    if (step < steps) {
      LogInfo(g_signal == SIGINT ? "interrupted" : g_signal == SIGTERM ? "SIGTERM" : "a signal on another rank",
              ": stopped cleanly after step ", step);
      if (step > start) LOOM_RETURN_IF_ERROR(Save(step));
      return absl::OkStatus();
    }
    LOOM_ASSIGN_OR_RETURN(const EvalResult e, LogEval(step, metrics));
    const double elapsed = total_timer.Seconds();
    // No held-out split (data.split's second share 0): no eval loss to show.
    LogInfo(absl::StrFormat("done: %d steps in %.1f s (%s tok/s) | final loss %.4f | %s%s", step - start, elapsed,
                            HumanCount((step - start) * tokens_per_step / std::max(elapsed, 1e-9)), loss,
                            data_.has_eval() ? absl::StrFormat("eval loss %.4f", e.loss) : "no held-out data",
                            skipped ? absl::StrCat(" | ", skipped, " steps skipped") : ""));
    if (data_.is_recall()) {
      LogInfo(absl::StrFormat("answer accuracy %.1f%% on %d held-out answers (chance %.1f%%)",
                              100 * e.accuracy.value(), e.accuracy.total, 100 * data_.chance()));
    }
    // Always at a stage boundary: the next stage starts from that checkpoint.
    const int every = config_.checkpoint().every();
    if ((every > 0 || !stage_.last()) && (every == 0 || step % every != 0)) LOOM_RETURN_IF_ERROR(Save(step));
    return absl::OkStatus();
  }

  static ModelDims PlacedDims(const config::Config& c, Device device, const MoeParallel* moe) {
    ModelDims d = ModelDims::FromConfig(c);
    d.device = device;
    d.moe.parallel = moe;       // router statistics summed over dp × cp (model/moe.h)
    d.moh.stats = moe->stats;   // MoH's over the same group (model/moh.h)
    return d;
  }

  static DataParallelOptions DpOptions(const config::Config& c) {
    DataParallelOptions o;
    o.adam.beta1 = c.optim().beta1();
    o.adam.beta2 = c.optim().beta2();
    o.adam.eps = c.optim().eps();
    o.adam.weight_decay = c.optim().weight_decay();
    o.bucket_mb = c.parallel().bucket_mb();
    o.zero = c.parallel().zero() == 1;
    return o;
  }

  static ContextParallel MakeContextParallel(const config::Config& c, const ProcessGroups& g) {
    ContextParallel cp;
    cp.comm = g.cp.get();
    cp.rank = g.coords.cp;
    cp.size = g.layout.cp;
    cp.softmax.scheme = *ParseCpSoftmaxScheme(c.parallel().cp_softmax());  // validated with the config
    cp.softmax.keep_gathered = c.parallel().cp_keep_gathered();
    cp.linear.scheme = *ParseCpLinearScheme(c.parallel().cp_linear());
    return cp;
  }

  // (layer, routing) of every MoE layer and of every MoH layer with routed
  // heads, in layer order, on every rank: under pipeline parallelism each
  // stage holds some of the layers, and a sum over the pp group of
  // [kind][layer][present, min, max, cv, assignments, dropped] (zeros where a
  // stage lacks the layer, so the sum is exact) hands every stage all of them.
  using LayerRouting = std::vector<std::pair<int, RoutingStats>>;
  absl::StatusOr<std::pair<LayerRouting, LayerRouting>> AllRoutingStatistics() {
    std::pair<LayerRouting, LayerRouting> mine{model_.RoutingStatistics(), model_.MohStatistics()};
    const bool routed = dims_.moe.experts > 0 || std::any_of(dims_.kinds.begin(), dims_.kinds.end(), MohKind);
    if (groups_.layout.pp == 1 || !routed) return mine;  // the same on every rank: dims come from the config
    constexpr int kFields = 6;
    const int layers = dims_.layers;
    Tensor table = Tensor::Zeros({2 * layers * kFields}, DType::kF64);
    double* t = table.data<double>();
    for (int kind = 0; kind < 2; ++kind)
      for (const auto& [layer, r] : kind == 0 ? mine.first : mine.second) {
        double* row = t + (kind * layers + layer) * kFields;
        row[0] = 1, row[1] = r.load_min, row[2] = r.load_max, row[3] = r.load_cv;
        row[4] = double(r.assignments), row[5] = double(r.dropped);
      }
    LOOM_RETURN_IF_ERROR(groups_.pp->AllReduce(table));
    std::pair<LayerRouting, LayerRouting> all;
    for (int kind = 0; kind < 2; ++kind)
      for (int layer = 0; layer < layers; ++layer) {
        const double* row = t + (kind * layers + layer) * kFields;
        if (row[0] == 0) continue;
        RoutingStats r;
        r.load_min = row[1], r.load_max = row[2], r.load_cv = row[3];
        r.assignments = static_cast<int64_t>(row[4]), r.dropped = static_cast<int64_t>(row[5]);
        (kind == 0 ? all.first : all.second).push_back({layer, r});
      }
    return all;
  }

  // At a step boundary, every rank: whether a signal on any rank stops the
  // run here, and the publication of the checkpoint in flight
  // (checkpoint.async) once every rank has written its shard.
  absl::StatusOr<bool> StepBoundary() {
    const bool writing =
        writing_step_ >= 0 && writing_.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
    Tensor flags = Tensor::FromVector<int32_t>({g_stop ? 1 : 0, writing ? 1 : 0}, {2});
    if (world_.size() > 1) LOOM_RETURN_IF_ERROR(world_.AllReduce(flags, ReduceOp::kMax));
    if (writing_step_ >= 0 && flags.data<int32_t>()[1] == 0) LOOM_RETURN_IF_ERROR(FinishSave());
    return flags.data<int32_t>()[0] != 0;
  }

  absl::StatusOr<EvalResult> LogEval(int64_t step, MetricsWriter& metrics) {
    if (!data_.has_eval()) return EvalResult{};
    LOOM_ASSIGN_OR_RETURN(const EvalResult e, Evaluate(model_, data_, config_, groups_));
    if (data_.is_recall()) {
      LogInfo(absl::StrFormat("eval  %5d | loss %.4f | accuracy %.3f (chance %.3f)", step, e.loss,
                              e.accuracy.value(), data_.chance()));
      LOOM_RETURN_IF_ERROR(Record(metrics, step, {{"eval_loss", e.loss}, {"accuracy", e.accuracy.value()}}));
    } else {
      LogInfo(absl::StrFormat("eval  %5d | loss %.4f | perplexity %.2f", step, e.loss, std::exp(e.loss)));
      LOOM_RETURN_IF_ERROR(Record(metrics, step, {{"eval_loss", e.loss}, {"perplexity", std::exp(e.loss)}}));
    }
    return e;
  }

  // One record on rank 0: a metrics.jsonl line and a TensorBoard event
  // with the same keys as tags.
  absl::Status Record(MetricsWriter& metrics, int64_t step, std::vector<std::pair<std::string, double>> fields) {
    if (!lead_) return absl::OkStatus();
    LOOM_RETURN_IF_ERROR(tb_.WriteScalars(step, fields));
    fields.insert(fields.begin(), {"step", double(step)});
    metrics.Write(fields);
    return absl::OkStatus();
  }

  // Tensor bytes at the step's peak: CUDA's pool on the GPU, the CPU
  // allocation counter otherwise.
  double PeakTensorBytes() const {
    return dims_.device.is_cpu() ? PeakCpuTensorBytes() : PeakCudaTensorBytes(dims_.device.index);
  }

  static std::string DeviceDescription(Device d) {
    if (d.is_cpu()) return "cpu";
    return absl::StrCat(d.ToString(), " (", CudaDeviceName(d.index), ")");
  }

  static double MaxRssMb() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_maxrss / 1024.0;  // Linux reports KiB
  }

  std::string FirstNonFinite() const {
    for (const Param* p : model_.params()) {
      const Tensor g = p->grad.To(Device::Cpu());
      for (int64_t i = 0; i < g.numel(); ++i)
        if (!std::isfinite(g.Get(i))) return p->name;
    }
    return "the loss";
  }

  // Every rank writes its own pieces into one step directory (DESIGN.md,
  // Checkpoints): a parameter's value once per group that holds it (rank 0
  // of dp × cp, or of expert_dp), a TP-sharded one as its slice on each TP
  // rank, the moments as each rank's ZeRO shard. Rank 0 makes the
  // directory, gathers the manifest entries and publishes the step.
  absl::Status Save(int64_t step) {
    LOOM_RETURN_IF_ERROR(FinishSave());  // the previous one (checkpoint.async)
    Timer snapshot;
    int64_t tag = 0;
    absl::Status begun;
    if (lead_) begun = checkpoint::BeginSave(ckpt_dir_, step, &tag).status();
    Tensor started = Tensor::FromVector<int64_t>({begun.ok() ? tag : -1}, {1});
    LOOM_RETURN_IF_ERROR(world_.Broadcast(started, 0));
    if (!begun.ok()) return begun;
    if (started.data<int64_t>()[0] < 0)
      return absl::InternalError(absl::StrCat("the checkpoint of step ", step, " was not saved (see rank 0's message)"));
    std::vector<checkpoint::NamedTensor> mine = Snapshot();
    // `mine` holds copies, so training may go on while they are written.
    writing_step_ = step;
    writing_tmp_ = checkpoint::SaveTempDir(ckpt_dir_, step, started.data<int64_t>()[0]);
    writing_ = std::async(std::launch::async, [tmp = writing_tmp_, rank = world_.rank(), step, mine = std::move(mine)] {
      Timer t;
      absl::StatusOr<std::vector<checkpoint::TensorEntry>> entries = checkpoint::WriteShard(tmp, rank, mine, step);
      return Written{entries.status(), entries.ok() ? std::move(*entries) : std::vector<checkpoint::TensorEntry>{},
                     t.Seconds()};
    });
    if (!config_.checkpoint().async()) return FinishSave();
    LogInfo(absl::StrFormat("checkpoint %s/%s: %.2f GB copied in %.2f s, writing in the background", ckpt_dir_,
                            checkpoint::StepDirName(step), snapshot_.bytes() / 1e9, snapshot.Seconds()));
    return absl::OkStatus();
  }

  // This rank's pieces of the checkpoint, copied to the host (snapshot_:
  // the same host tensors every save, page-locked for a GPU's).
  std::vector<checkpoint::NamedTensor> Snapshot() {
    size_t slot = 0;
    auto copy = [&](const Tensor& t) { return snapshot_.Copy(slot++, t); };
    const Coords& at = groups_.coords;
    const ParamList& params = model_.params();
    // A parameter that TP does not split is the same on every TP rank.
    auto tp_writes = [&](const Param& p) { return p.sharded() || at.tp == 0; };
    std::vector<checkpoint::NamedTensor> mine;
    for (size_t i = 0; i < params.size(); ++i) {
      const Param& p = *params[i];
      if (tp_writes(p) && dp_.WritesValue(i)) mine.push_back({p.name, copy(p.value), SliceOf(p)});
    }
    for (const DataParallel::MomentShard& s : dp_.LocalMoments()) {
      const Param& p = *params[s.param];
      if (!tp_writes(p)) continue;
      checkpoint::Piece piece = SliceOf(p);
      piece.flat_start = s.offset;
      mine.push_back({"optim.m." + p.name, copy(s.m), piece});
      mine.push_back({"optim.v." + p.name, copy(s.v), piece});
    }
    // The MoE selection bias: the same on every rank (global loads), from
    // each pipeline stage's first rank.
    if (at.tp == 0 && at.cp == 0 && at.dp == 0)
      for (const auto& [layer, moe] : model_.MoeLayers())
        mine.push_back({absl::StrCat("layers.", layer, ".moe.bias"),
                        Tensor::FromVector<double>(moe->bias(), {static_cast<int64_t>(moe->bias().size())})});
    if (lead_) mine.push_back({"optim.steps", Tensor::FromVector<int64_t>({dp_.steps()}, {1})});
    return mine;
  }

  // Waits for this rank's write in flight, if any; rank 0 gathers every
  // rank's entries, publishes the step and tells every rank whether it
  // worked (a collective: every rank calls it at the same point).
  absl::Status FinishSave() {
    if (writing_step_ < 0) return absl::OkStatus();
    const int64_t step = std::exchange(writing_step_, -1);
    Written written = writing_.get();
    absl::Status saved;
    if (lead_) {
      absl::Status shards = written.status;
      std::vector<checkpoint::TensorEntry>& entries = written.entries;
      for (int r = 1; r < world_.size(); ++r) {
        LOOM_ASSIGN_OR_RETURN(const std::string bytes, RecvBytes(world_, r));
        checkpoint::ShardReport report;
        if (!report.ParseFromString(bytes)) report.set_error(absl::StrCat("rank ", r, ": a shard report that does not parse"));
        if (report.has_error() && shards.ok()) shards = absl::InternalError(report.error());
        entries.insert(entries.end(), report.tensors().begin(), report.tensors().end());
      }
      checkpoint::CheckpointState state;
      state.step = step;
      state.data_tokens = stage_.data_tokens_at(step);
      state.config_text = ConfigToText(config_);
      saved = checkpoint::EndSave(ckpt_dir_, writing_tmp_, state, entries, world_.size(),
                                  config_.checkpoint().keep(), shards);
    } else {
      checkpoint::ShardReport report;
      if (!written.status.ok()) report.set_error(std::string(written.status.message()));
      for (checkpoint::TensorEntry& e : written.entries) *report.add_tensors() = std::move(e);
      LOOM_RETURN_IF_ERROR(SendBytes(world_, 0, report.SerializeAsString()));
    }
    Tensor ok = Tensor::FromVector<int32_t>({saved.ok() ? 1 : 0}, {1});
    LOOM_RETURN_IF_ERROR(world_.Broadcast(ok, 0));
    if (!saved.ok()) return saved;
    if (!ok.data<int32_t>()[0])
      return absl::InternalError(absl::StrCat("the checkpoint of step ", step, " was not saved (see rank 0's message)"));
    LogInfo(absl::StrFormat("checkpoint %s/%s saved in %.2f s", ckpt_dir_, checkpoint::StepDirName(step),
                            written.seconds));
    return absl::OkStatus();
  }

  // Returns the step to start from (0 for a fresh run). Every rank reads
  // the checkpoint and keeps its own slices.
  absl::StatusOr<int64_t> Resume() {
    Timer timer;
    LOOM_ASSIGN_OR_RETURN(const ResumePoint point, FindResumePointOnRankZero(config_, world_));
    if (point.step_dir.empty()) return 0;
    const std::string& step_dir = point.step_dir;
    // Each rank reads what it holds: of a parameter and its moments the
    // pieces that meet its slice, and the MoE biases and step count.
    std::map<std::string, checkpoint::Interest> held = {{"optim.steps", {}}};
    for (const Param* p : model_.params()) {
      const checkpoint::Piece slice = SliceOf(*p);
      for (const std::string& name : {p->name, "optim.m." + p->name, "optim.v." + p->name})
        held[name] = {true, slice.start, slice.length};
    }
    for (const auto& [layer, moe] : model_.MoeLayers()) held[absl::StrCat("layers.", layer, ".moe.bias")] = {};
    LOOM_ASSIGN_OR_RETURN(checkpoint::CheckpointState state,
                          checkpoint::LoadCheckpoint(step_dir, [&](const std::string& name) {
                            auto it = held.find(name);
                            return it == held.end() ? checkpoint::Interest{false, {}, {}} : it->second;
                          }));
    config::Config saved;
    if (!google::protobuf::TextFormat::ParseFromString(state.config_text, &saved))
      return absl::InvalidArgumentError(absl::StrCat(step_dir, ": the saved config does not parse"));
    const std::vector<std::string> diffs = ModelDifferences(saved.model(), config_.model());
    if (!diffs.empty())
      return absl::InvalidArgumentError(absl::StrCat(step_dir, ": the checkpoint's model differs from the config (",
                                                     absl::StrJoin(diffs, ", "),
                                                     "); set checkpoint.resume=none to start fresh"));
    // Each global tensor is dropped once its local slice is copied, so the
    // checkpoint's bytes and the restored state are not all held at once.
    std::map<std::string, Tensor> by_name;
    for (auto& t : state.tensors) by_name[t.name] = std::move(t.tensor);
    state.tensors.clear();
    const bool to_moh = DenseToMoh(saved.model().pattern(), config_.model().pattern());
    auto restore = [&](const Param& p, const std::string& name, Tensor& into) -> absl::Status {
      auto it = by_name.find(name);
      if (it == by_name.end() && to_moh && p.name.find(".attn.moh.") != std::string::npos) {
        if (name == p.name) LogWarning(step_dir, ": dense checkpoint: ", name, " starts from its initialisation");
        if (name == p.name) into.CopyFrom(p.value);  // moments stay 0
        return absl::OkStatus();
      }
      if (it == by_name.end()) return absl::InvalidArgumentError(absl::StrCat(step_dir, ": tensor ", name, " missing"));
      absl::Status s = CopyLocalSlice(p, it->second, into);
      if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(step_dir, ": ", s.message()));
      by_name.erase(it);
      return absl::OkStatus();
    };
    const ParamList& params = model_.params();
    std::vector<Tensor> m, v;
    for (size_t i = 0; i < params.size(); ++i) {
      Param& p = *params[i];
      m.push_back(Tensor::Zeros(p.value.shape(), p.value.dtype()));
      v.push_back(Tensor::Zeros(p.value.shape(), p.value.dtype()));
      Tensor value = Tensor::Zeros(p.value.shape(), p.value.dtype());
      LOOM_RETURN_IF_ERROR(restore(p, p.name, value));
      LOOM_RETURN_IF_ERROR(restore(p, "optim.m." + p.name, m.back()));
      LOOM_RETURN_IF_ERROR(restore(p, "optim.v." + p.name, v.back()));
      p.value.CopyFrom(value);
    }
    for (const auto& [layer, moe] : model_.MoeLayers()) {
      const std::string name = absl::StrCat("layers.", layer, ".moe.bias");
      auto it = by_name.find(name);
      if (it == by_name.end()) {  // a checkpoint from before the bias was saved
        if (dims_.moe.bias_balancing) LogWarning(step_dir, ": tensor ", name, " missing: the selection bias restarts at 0");
        continue;
      }
      if (it->second.numel() != dims_.moe.experts)
        return absl::InvalidArgumentError(absl::StrCat(step_dir, ": tensor ", name, " has ", it->second.numel(),
                                                       " values for ", dims_.moe.experts, " experts"));
      std::vector<double> bias(dims_.moe.experts);
      for (int e = 0; e < dims_.moe.experts; ++e) bias[e] = it->second.Get(e);
      moe->set_bias(bias);
    }
    model_.RefreshComputeWeights();
    dp_.ScatterMoments(m, v);
    auto steps = by_name.find("optim.steps");
    if (steps == by_name.end() || steps->second.dtype() != DType::kI64)
      return absl::InvalidArgumentError(absl::StrCat(step_dir, ": tensor optim.steps missing"));
    dp_.set_steps(steps->second.data<int64_t>()[0]);
    LogInfo("resumed from ", step_dir, " at step ", state.step, absl::StrFormat(" (in %.1f s)", timer.Seconds()));
    return state.step;
  }

  config::Config config_;
  MoeParallel moe_parallel_;
  ModelDims dims_;
  Communicator& world_;
  ProcessGroups& groups_;
  TensorParallel tp_;
  ContextParallel cp_;
  Model model_;
  ExpertDataParallel dp_;  // expert parameters over expert_dp, the rest over dp × cp
  DataSource data_;
  std::filesystem::path run_dir_;
  std::string ckpt_dir_;
  bool lead_;
  // The checkpoint being written: this rank's shard into writing_tmp_;
  // writing_step_ -1 when none. Save starts it, FinishSave publishes it.
  struct Written {
    absl::Status status;
    std::vector<checkpoint::TensorEntry> entries;
    double seconds = 0;  // the write's
  };
  std::future<Written> writing_;
  int64_t writing_step_ = -1;
  std::string writing_tmp_;
  HostSnapshot snapshot_;  // the host copies a save writes, kept for the next
  TensorBoardWriter tb_;  // rank 0: <run_dir>/tb/, a new events file per run
  TrainStagePlan stage_;  // launch/stages.h: its first step and data position
};

absl::Status TrainStage(const TrainStagePlan& stage, Device device, Communicator& world) {
  const config::Config& config = stage.config;
  LOOM_ASSIGN_OR_RETURN(const Layout layout, MakeLayout(world.size(), config));
  if (world.rank() == 0) {
    std::error_code ec;
    std::filesystem::create_directories(config.train().run_dir(), ec);
    if (ec)
      return absl::InvalidArgumentError(
          absl::StrCat("train.run_dir: cannot create ", config.train().run_dir(), ": ", ec.message()));
  }
  LOOM_RETURN_IF_ERROR(world.Barrier());
  // A step that cannot fit is said before the model is built, not by the
  // allocator at the first step. The plan leaves out the CUDA context,
  // library workspaces and communication buffers: 5% is kept for them.
  LOOM_ASSIGN_OR_RETURN(const MemoryFit fit, FitMemory(config, layout, device));
  if (fit.plan > 0.95 * fit.capacity)
    LogWarning("the planned ", HumanBytes(fit.plan), " a rank is ",
               fit.plan > fit.capacity ? "more than " : "within 5% of what ", fit.where, " holds (",
               HumanBytes(fit.capacity), "): the first step will likely run out of memory; a shorter train.seq_len or "
               "train.micro_batch, model.recompute, or more parallel.tp, cp or pp ranks need less");
  LOOM_ASSIGN_OR_RETURN(DataSource data, DataSource::Create(config));
  LOOM_ASSIGN_OR_RETURN(std::unique_ptr<ProcessGroups> groups, ProcessGroups::Make(world, layout));
  Trainer trainer(config, device, std::move(data), world, *groups, stage);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  // A file-size limit (ulimit -f) then fails a checkpoint write with EFBIG,
  // reported with the file's name, instead of killing the run mid-save.
  std::signal(SIGXFSZ, SIG_IGN);
  return trainer.Run(fit);
}

// Progressive length (launch/stages.h): the stages in order, each with its
// own layout and model; a restarted run skips the stages its checkpoint has
// passed, and each later stage resumes from the boundary checkpoint.
absl::Status Train(const config::Config& config, Device device, Communicator& world) {
  LOOM_ASSIGN_OR_RETURN(std::vector<TrainStagePlan> stages, ResolveStages(config, world.size()));
  if (stages.size() == 1) return TrainStage(stages[0], device, world);
  LOOM_ASSIGN_OR_RETURN(const ResumePoint resume, FindResumePointOnRankZero(config, world));
  bool first_run = true;
  for (TrainStagePlan& stage : stages) {
    if (resume.step >= stage.end_step() && !stage.last()) continue;  // passed before this restart
    if (first_run && !resume.step_dir.empty()) stage.config.mutable_checkpoint()->set_resume(resume.step_dir);
    if (!first_run)
      stage.config.mutable_checkpoint()->set_resume(
          absl::StrCat(CheckpointDirOf(config), "/", checkpoint::StepDirName(stage.first_step)));
    first_run = false;
    LOOM_RETURN_IF_ERROR(TrainStage(stage, device, world));
    if (g_stop) break;  // stopped by a signal, checkpoint saved
  }
  return absl::OkStatus();
}

// train.device: "cpu", "cuda" (this rank's GPU), or "auto" (cuda when there
// is one). Picks the rank's GPU: local rank mod the visible GPUs.
absl::StatusOr<Device> ResolveDevice(const config::TrainConfig& t) {
  const bool gpu = BuiltWithCuda() && CudaDeviceCount() > 0;
  if (t.device() == "cpu" || (t.device() == "auto" && !gpu)) {
    if (t.dtype() == "bf16")
      return absl::InvalidArgumentError(absl::StrCat(
          "train.dtype: bf16 trains on the GPU only, and ",
          BuiltWithCuda() ? "no GPU is visible" : "Loom was built without CUDA (configure with -DLOOM_CUDA=ON)"));
    return Device::Cpu();
  }
  if (!gpu)
    return absl::InvalidArgumentError(absl::StrCat(
        "train.device: cuda, but ",
        BuiltWithCuda() ? "no GPU is visible" : "Loom was built without CUDA (configure with -DLOOM_CUDA=ON)"));
  if (t.dtype() == "f64") return absl::InvalidArgumentError("train.dtype: f64 runs on the CPU only (train.device=cpu)");
  const int gpu_index = SelectLocalGpu();
  // The CUDA build holds sm_90a and sm_80 code (CMakeLists.txt): before
  // Ampere no kernel would load, so say so before the first launch fails;
  // from Ampere on, all but Loom's flash attention kernels run (attention
  // then runs on cuDNN or the f32 kernels: ops/softmax_attention.h).
  if (const int cc = CudaComputeCapability(gpu_index); cc < 80)
    return absl::FailedPreconditionError(absl::StrFormat(
        "train.device: GPU %d (%s) is sm_%d, and Loom's kernels are built for Ampere (sm_80) and newer; set "
        "train.device=cpu",
        gpu_index, CudaDeviceName(gpu_index), cc));
  else if (!ops::cuda::FlashAttentionRuns(gpu_index))
    LogWarning(absl::StrFormat(
        "GPU %d (%s) is sm_%d, not Hopper: Loom's flash attention kernels (sm_90a) do not run there, so softmax "
        "attention runs on cuDNN's SDPA where it can (model.attention_backend=cudnn) and on the f32 kernels where it "
        "cannot; everything else runs as on Hopper",
        gpu_index, CudaDeviceName(gpu_index), cc));
  return Device::Cuda(gpu_index);
}

// --dry-run: what a step of this config costs on each rank, from the shapes
// alone (model/memory_estimate.h); nothing is allocated or trained. Every
// rank may run it; rank 0 prints.
absl::Status DryRun(const config::Config& config, int world, bool print) {
  LOOM_ASSIGN_OR_RETURN(const Layout layout, MakeLayout(world, config));
  ModelDims dims = ModelDims::FromConfig(config);
  // Plans for the GPU when the config trains there (bf16 only runs there).
  const bool gpu = config.train().device() == "cuda" || config.train().dtype() == "bf16";
  if (gpu) dims.device = Device::Cuda(0);
  const auto& tc = config.train();
  const int64_t tokens = int64_t{tc.global_batch()} * tc.seq_len();
  const double per_token = dims.FlopsPerToken(tc.seq_len());
  std::string out = absl::StrFormat(
      "layout: %d ranks = %s%s | micro-batch %d x %d tokens, %d per rank per step\n", layout.world, layout.ToString(),
      config.parallel().zero() ? " | ZeRO-1" : "", tc.micro_batch(), tc.seq_len() / layout.cp,
      tc.global_batch() / layout.dp / tc.micro_batch());
  absl::StrAppend(&out, absl::StrFormat("model: %s | hidden %d, heads %d/%d, head dim %d, ffn %d, vocab %d (padded %d) | "
                                        "%s | recompute \"%s\"\n",
                                        dims.kinds, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.ffn,
                                        dims.vocab, dims.padded_vocab, DTypeName(dims.act_dtype()), config.model().recompute()));
  absl::StrAppend(&out, absl::StrFormat("parameters: %s total, %s without embeddings (%d, %d)\n",
                                        HumanCount(dims.ParameterCount(true)), HumanCount(dims.ParameterCount(false)),
                                        dims.ParameterCount(true), dims.ParameterCount(false)));
  absl::StrAppend(&out, absl::StrFormat("FLOPs: %.4g per token (6N + attention), %.4g per step of %d tokens, %.4g per "
                                        "rank\n",
                                        per_token, per_token * tokens, tokens, per_token * tokens / layout.world));
  absl::StrAppend(&out, "memory per rank (one per pipeline stage; every tp/cp/dp rank of a stage alike):\n");
  absl::StrAppend(&out, absl::StrFormat("  %-5s %14s %11s %11s %11s %12s %10s %11s\n", "stage", "parameters", "weights",
                                        "gradients", "AdamW m+v", "activations", "inputs", "total"));
  int64_t moe_rows = 0;
  for (int stage = 0; stage < layout.pp; ++stage) {
    LOOM_ASSIGN_OR_RETURN(const MemoryEstimate m, PlanStage(config, layout, dims.device, stage));
    moe_rows = m.moe_rows;
    absl::StrAppend(&out, absl::StrFormat("  %-5d %14d %11s %11s %11s %12s %10s %11s\n", stage, m.parameters,
                                          HumanBytes(m.param_bytes), HumanBytes(m.grad_bytes),
                                          HumanBytes(m.optimizer_bytes), HumanBytes(m.activation_bytes),
                                          HumanBytes(m.input_bytes), HumanBytes(m.total())));
  }
  absl::StrAppend(&out, gpu ? "(GPU tensors: f32 master weights, gradients and AdamW state, bf16 copies of the "
                              "matrices and bf16 activations in bf16 runs; activations: the peak of one step, formula "
                              "in docs/metrics.md; context-parallel buffers and kernel scratch not counted)\n"
                            : "(tensors of the CPU trainer in its dtype; activations: the peak of one step, formula in "
                              "docs/metrics.md; context-parallel buffers not counted)\n");
  if (dims.moe.experts > 0) {
    // The rows an MoE layer's experts get depend on the routing: the plan
    // takes every assignment (or the capacity bound) and, under ep, an even
    // split over the ep ranks (model/memory_estimate.h).
    const bool capped = config.model().moe().capacity_factor() > 0;
    absl::StrAppend(&out, absl::StrFormat("(MoE layers: %d expert rows per layer and micro-batch, %s%s)\n", moe_rows,
                                          capped ? "T·top_k or capacity·experts, the smaller" : "T·top_k, dropless",
                                          layout.ep > 1 ? "; under ep as many received as sent (balanced routing)" : ""));
  }
  if (print) std::fputs(out.c_str(), stdout);
  return absl::OkStatus();
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  // Before MPI starts, bad input is said once: by the launcher's rank 0.
  const bool say = loom::LauncherRank() <= 0;
  auto args = loom::ExtractConfigArgs(argc, argv);
  if (!args.ok()) {
    if (say) std::fprintf(stderr, "loom-train: %s\n", std::string(args.status().message()).c_str());
    return 2;
  }
  loom::ParseToolFlags(argc, argv, "loom-train --config FILE [--set path.to.field=value ...]");
  if (args->config_path.empty()) {
    if (say) std::fprintf(stderr, "loom-train: --config FILE is required (e.g. configs/default.textproto)\n");
    return 2;
  }
  auto config = loom::LoadConfig(args->config_path, args->sets);
  if (!config.ok()) {
    if (say) std::fprintf(stderr, "loom-train: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  // --dry-run plans from the shapes alone: no GPU needed.
  const bool dry_run = absl::GetFlag(FLAGS_dry_run);
  auto device = dry_run ? absl::StatusOr<loom::Device>(loom::Device::Cpu()) : loom::ResolveDevice(config->train());
  if (!device.ok()) {
    if (say) std::fprintf(stderr, "loom-train: %s\n", std::string(device.status().message()).c_str());
    return 2;
  }
  // One process started by hand needs no MPI at all.
  auto world = loom::LaunchedByParallelLauncher()
                   ? loom::MakeWorld(config->parallel(), /*gpu_tensors=*/!device->is_cpu())
                   : absl::StatusOr<std::unique_ptr<loom::Communicator>>(loom::SoloWorld());
  if (!world.ok()) {
    std::fprintf(stderr, "loom-train: %s\n", std::string(world.status().message()).c_str());
    return 1;
  }
  loom::SetLogRank((*world)->rank(), (*world)->size());
  if (dry_run) {
    const int ranks = absl::GetFlag(FLAGS_world_size) > 0 ? absl::GetFlag(FLAGS_world_size) : (*world)->size();
    if (absl::Status s = loom::DryRun(*config, ranks, (*world)->rank() == 0); !s.ok()) {
      if ((*world)->rank() == 0) std::fprintf(stderr, "loom-train: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    return 0;
  }
  if (absl::Status s = loom::Train(*config, *device, **world); !s.ok()) {
    // A rank that stopped answering: the others may be stuck, so leave
    // without MPI_Finalize.
    if (absl::IsDeadlineExceeded(s)) loom::ExitAfterCommFailure(s);
    // The same bad input on every rank: say it once.
    if ((*world)->rank() == 0 || !absl::IsInvalidArgument(s))
      std::fprintf(stderr, "loom-train: %s\n", std::string(s.message()).c_str());
    return absl::IsInvalidArgument(s) ? 2 : 1;
  }
  return 0;
}
