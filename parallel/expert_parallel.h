// Expert parallelism (DESIGN.md, Topology): the E experts of an MoE layer
// are split over the `ep` ranks of each DP group (ep consecutive dp
// indices); ep rank r owns experts [r·E/ep, (r+1)·E/ep). Every rank routes
// its own tokens; the rows of its kept assignments travel to the experts'
// owners and the results come back:
//
//   forward   dispatch: rows [S, C] (this rank's assignments, ordered by
//             expert, each expert's in token order) --all-to-all(v)-->
//             [R, C], the local experts' rows expert after expert (expert
//             i's n_i rows, the sources in ep-rank order = global token
//             order: lower dp indices hold earlier tokens);
//             combine: the experts' outputs [R, C] --reverse all-to-all(v)--> [S, C]
//   backward  the same pair: the output gradients are dispatched, the input
//             gradients combined.
//
// The row counts (an ep × E/ep matrix) are exchanged once per call with an
// all-to-all. Without a group (or ep = 1) the exchange is the identity (S =
// R, no copy). Tensors may live on the CPU or a GPU: the row blocks move
// with Tensor::CopyFrom and the communicator takes device tensors (NCCL
// directly, MPI staged through the host).
//
// Gradients: expert parameters exist only on their owner and are summed
// over expert_dp (the dp/ep ranks owning the same experts); the others
// over dp × cp. ExpertDataParallel runs the two DataParallel instances with
// one clipping norm. A parameter is an expert parameter when its name holds
// ".moe.experts." (model/moe.h names them "<layer>.moe.experts.<e>.w_*").
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/param.h"
#include "parallel/communicator.h"
#include "parallel/data_parallel.h"

namespace loom {

// Which experts an ep rank owns.
struct ExpertSplit {
  int experts = 0, size = 1, rank = 0;
  int per_rank() const { return experts / size; }
  int first() const { return rank * per_rank(); }
  int owner(int expert) const { return expert / per_rank(); }
};

class ExpertExchange {
 public:
  // rows_per_expert [E]: rows this rank sends to each expert. ep: the ep
  // group (null or size 1: local). Collective over ep (the counts).
  ExpertExchange(Communicator* ep, int experts, const std::vector<int64_t>& rows_per_expert);
  // rows [S, C] ordered by expert → [R, C], local expert after local expert.
  Tensor Dispatch(const Tensor& rows) const;
  // [R, C] in Dispatch's order → [S, C] in the order Dispatch took them.
  Tensor Combine(const Tensor& packed) const;
  // Rows of each local expert over all sources [E/ep]; R is their sum.
  const std::vector<int64_t>& local_rows() const { return local_rows_; }
  const ExpertSplit& split() const { return split_; }

 private:
  // Source-major (source, local expert) blocks → expert-major, or back.
  void Reorder(const Tensor& from, Tensor& to, bool to_expert_major) const;

  Communicator* ep_;
  ExpertSplit split_;
  int64_t sent_ = 0, received_ = 0;
  std::vector<int64_t> send_rows_;  // [ep] rows to each rank
  std::vector<int64_t> recv_rows_;  // [ep] rows from each rank
  std::vector<int64_t> counts_;     // [ep, E/ep] rows from source s for local expert i
  std::vector<int64_t> local_rows_; // [E/ep]
};

bool IsExpertParam(const Param& p);

// DataParallel for a model with MoE layers: dense parameters over
// dense_group (dp × cp), expert parameters over expert_group (expert_dp);
// both count each distinct gradient element once in the global norm.
class ExpertDataParallel {
 public:
  ExpertDataParallel(const ParamList& params, Communicator* dense_group, Communicator* expert_group,
                     Communicator* norm_group, int tp_rank, const DataParallelOptions& options);
  void GradReady(const ParamList& ready);
  absl::Status ReduceGradients();
  absl::StatusOr<double> ClipGradients(double max_norm);
  absl::Status Step(double lr);
  int64_t steps() const { return dense_->steps(); }
  void set_steps(int64_t steps);
  int buckets() const { return dense_->buckets() + (experts_ ? experts_->buckets() : 0); }
  // DataParallel's, in the order of `params` (checkpoints).
  std::vector<DataParallel::MomentShard> LocalMoments() const;
  void ScatterMoments(const std::vector<Tensor>& m, const std::vector<Tensor>& v);
  // Whether this rank writes parameter i's value: rank 0 of the group that
  // holds it (dp × cp, or expert_dp for an expert's).
  bool WritesValue(size_t i) const { return (is_expert_[i] ? *experts_ : *dense_).group_rank() == 0; }
  DataParallel& dense() { return *dense_; }
  DataParallel* experts() { return experts_.get(); }  // null without expert parameters

 private:
  std::unique_ptr<DataParallel> dense_, experts_;
  std::vector<bool> is_expert_;  // per parameter of `params`
};

}  // namespace loom
