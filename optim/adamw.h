// AdamW (Loshchilov & Hutter) with decoupled weight decay, state in the
// parameter dtype (fp32 in training):
//   m = β1 m + (1−β1) g,  v = β2 v + (1−β2) g²
//   p -= lr · ( m/(1−β1^t) / (sqrt(v/(1−β2^t)) + eps) + wd · p )
// Weight decay only on parameters marked for it (not norms or biases).
//
// Parameters on a GPU (optim/cuda/adamw.cu): f32 master, gradient and
// moments; AdamW::Step updates all of them in one launch and, where a
// Param's bf16 `compute` copy is defined, rewrites it from the new value in
// the same pass. Norms of gradients are summed in a fixed order (the same
// bits on every run).
#pragma once

#include <vector>

#include "model/param.h"
#include "runtime/cuda_runtime.h"

namespace loom {

namespace cuda {
// One tensor of a multi-tensor AdamW launch (device pointers).
struct AdamWTensor {
  float* p;
  const float* g;
  float* m;
  float* v;
  bf16* compute;  // null: no bf16 copy to refresh
  int64_t n;
  double wd;
  bool operator==(const AdamWTensor&) const = default;
};
// The device copy of a table of AdamWTensors: uploaded again only when the
// host table changes (new tensors, moments replaced by a checkpoint load).
struct AdamWTable {
  std::vector<AdamWTensor> host;
  Tensor device;        // the entries, then the first chunk of each tensor (int64, one past the last at the end)
  int64_t chunks = 0;
};
}  // namespace cuda

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  AdamW(const ParamList& params, const AdamWOptions& options);
  // One update from the current gradients times grad_scale (the clip
  // factor, applied as the update reads each gradient: the same bits as
  // ScaleInPlace first, without its pass over the gradients).
  void Step(double lr, double grad_scale = 1);
  int64_t steps() const { return steps_; }

  // State for checkpoints: moments in parameter order, and the step count
  // (the bias corrections depend on it).
  std::vector<Tensor>& first_moments() { return m_; }
  std::vector<Tensor>& second_moments() { return v_; }
  void set_steps(int64_t steps) { steps_ = steps; }

 private:
  ParamList params_;
  AdamWOptions options_;
  std::vector<Tensor> m_, v_;
  int64_t steps_ = 0;
  cuda::AdamWTable device_table_;  // parameters on a GPU
};

// One AdamW update of p from g with moments m, v (same element counts, same
// float dtype; any shapes), at optimizer step `step` (1-based, for the bias
// corrections) with decay wd (0 for parameters without weight decay). The
// gradient read is g · grad_scale rounded to g's dtype (AdamW::Step).
void AdamWUpdate(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double wd, int64_t step,
                 const AdamWOptions& options, double grad_scale = 1);

// Σ g² of one tensor, summed serially (the same on every run).
double SumSquares(const Tensor& g);
// Σ g² over tensors on one device: on the CPU each tensor's serial sum,
// added in order; on a GPU cuda::SumSquares (one host sync for all).
double SumSquares(const std::vector<const Tensor*>& tensors);
// g *= f.
void ScaleInPlace(Tensor& g, double f);

// sqrt(Σ g²) over every parameter's gradient.
double GlobalGradNorm(const ParamList& params);
// The factor that brings a global gradient norm to at most max_norm:
// max_norm / (norm + 1e-6) above it, else 1 (and 1 when max_norm is 0, no
// clipping).
double ClipFactor(double norm, double max_norm);
// Scales all gradients so that their global norm is at most max_norm (0:
// no clipping). Returns the norm before clipping.
double ClipGradNorm(const ParamList& params, double max_norm);

namespace cuda {
// f32 CUDA tensors; the same arithmetic as the CPU (f64, no contraction).
void AdamWUpdate(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, double lr, double wd, int64_t step,
                 const AdamWOptions& options, double grad_scale, CudaStream stream = nullptr);
// One launch for every tensor of `tensors`; `table` keeps its device copy.
void MultiTensorAdamW(AdamWTable& table, const std::vector<AdamWTensor>& tensors, double lr, int64_t step,
                      const AdamWOptions& options, double grad_scale, CudaStream stream = nullptr);
// Σ g² over the tensors (f32), f64 partials in a fixed order; one host sync.
double SumSquares(const std::vector<const Tensor*>& tensors, CudaStream stream = nullptr);
void ScaleInPlace(Tensor& g, double f, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom
