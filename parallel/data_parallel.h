// Data parallelism with bucketed, overlapped gradient reduction and the
// optional ZeRO-1 sharded optimizer, over the ranks that hold the same
// parameters (the dp × cp group; DESIGN.md, Topology).
//
// The parameters' values and gradients are moved into two flat buffers,
// cut in backward order into buckets of about bucket_mb (each padded to a
// multiple of the group size) but laid out in the model's parameter order,
// so a layer's consecutive matrices stay adjacent; every Param's value and
// grad become views into them. During the last micro-batch's backward the model
// reports parameters whose gradients are final (Model::set_grad_ready_hook);
// a bucket's reduction starts as soon as all of its parameters are final:
//   zero = 0: all-reduce (sum) of the bucket's gradients, in place;
//   zero = 1: reduce-scatter: rank r keeps the sum of slice r of each bucket.
// The loss is normalised by the global target count, so sums (not means)
// are the gradients of the global batch.
//
// Then ClipGradients: the global norm over every distinct gradient element
// (each counted once: on its ZeRO shard owner, or on dp×cp rank 0; TP-
// replicated parameters only on TP rank 0), summed over `norm_group` (the
// world). Step: AdamW on the whole parameters (zero = 0), or on this rank's
// slices with sharded moments followed by an all-gather of the updated
// values (zero = 1).
#pragma once

#include <memory>
#include <unordered_map>
#include <vector>

#include "model/param.h"
#include "optim/adamw.h"
#include "parallel/communicator.h"

namespace loom {

struct DataParallelOptions {
  double bucket_mb = 25;
  bool zero = false;
  AdamWOptions adam;
};

class DataParallel {
 public:
  // grad_group: ranks holding the same parameters (may be of size 1).
  // norm_group: every rank (the global gradient norm). tp_rank: parameters
  // that are not TP-sharded count towards the norm only at TP rank 0.
  DataParallel(const ParamList& params, Communicator* grad_group, Communicator* norm_group, int tp_rank,
               const DataParallelOptions& options);
  ~DataParallel();

  // The hook for Model::set_grad_ready_hook.
  void GradReady(const ParamList& ready);
  // Starts the buckets not started yet and completes all reductions.
  absl::Status ReduceGradients();
  // Global gradient norm before clipping; the next Step reads the
  // gradients (this rank's shard under ZeRO) scaled so that their norm is at
  // most max_norm (0: no clipping). The gradients themselves stay as they
  // are: AdamW applies the factor as it reads them (optim/adamw.h).
  absl::StatusOr<double> ClipGradients(double max_norm);
  // ClipGradients' two halves, for instances that share one norm
  // (parallel/expert_parallel.h): Σ g² of the elements this instance
  // counts, summed over norm_group (collective); the factor the next Step
  // applies to the gradients.
  absl::StatusOr<double> SquaredNorm();
  void set_grad_scale(double f) { grad_scale_ = f; }
  // One AdamW update at learning rate lr, of the gradients × the clip factor.
  absl::Status Step(double lr);

  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps);
  int buckets() const { return static_cast<int>(buckets_.size()); }
  // Bucket reductions started from GradReady (during backward) in the last step.
  int buckets_started_in_backward() const { return last_started_in_backward_; }
  // Optimizer state elements held by this rank (moments m and v together).
  int64_t optimizer_state_elements() const;

  // This rank's share of the moments in a checkpoint that every rank
  // writes: elements [offset, offset + numel) of parameter `param`'s (local)
  // moments, as views of the optimizer's state. Under ZeRO the segments of
  // this rank's bucket slices; without, the whole moments on group rank 0
  // and nothing elsewhere.
  struct MomentShard {
    int param;  // index into the parameter list
    int64_t offset;
    Tensor m, v;
  };
  std::vector<MomentShard> LocalMoments() const;
  // The group's rank 0 writes the parameters' values (the same on all).
  int group_rank() const { return group_->rank(); }
  // Moments in the parameters' layout (a resume): under ZeRO each rank
  // keeps only its slices.
  void ScatterMoments(const std::vector<Tensor>& m, const std::vector<Tensor>& v);

 private:
  struct Bucket;
  struct Segment;
  absl::Status StartBucket(Bucket& b, bool in_backward);

  ParamList params_;
  Communicator* group_;
  Communicator* norm_group_;
  int tp_rank_;
  DataParallelOptions options_;
  Tensor flat_value_, flat_grad_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::vector<int> bucket_of_;  // per parameter (params_ order)
  std::unordered_map<const Param*, int> index_of_;
  std::unique_ptr<AdamW> adamw_;  // zero = 0
  int64_t steps_ = 0;
  double grad_scale_ = 1;  // the clip factor of the next Step
  int started_in_backward_ = 0, last_started_in_backward_ = 0;
  absl::Status deferred_;  // an error from GradReady, reported by ReduceGradients
};

}  // namespace loom
