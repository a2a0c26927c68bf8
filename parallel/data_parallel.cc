#include "parallel/data_parallel.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "ops/convert.h"

namespace loom {

// A parameter's piece of a bucket's slice (ZeRO): elements [param_offset,
// param_offset + length) of the parameter are at [slice_offset, ...) of the
// rank's slice.
struct DataParallel::Segment {
  Param* param;
  int64_t param_offset, slice_offset, length;
};

struct DataParallel::Bucket {
  int64_t offset = 0, size = 0;  // in the flat buffers; size a multiple of the group
  int pending = 0;               // parameters whose gradient is not final yet
  bool started = false;
  CommHandle handle;
  // ZeRO: this rank's slice [offset + rank·size/g, ...) of the bucket.
  Tensor grad_slice, m, v;
  std::vector<Segment> segments;
};

DataParallel::DataParallel(const ParamList& params, Communicator* grad_group, Communicator* norm_group, int tp_rank,
                           const DataParallelOptions& options)
    : params_(params), group_(grad_group), norm_group_(norm_group), tp_rank_(tp_rank), options_(options) {
  LOOM_CHECK(!params_.empty(), "[data_parallel] no parameters");
  const DType dtype = params_[0]->value.dtype();
  const Device device = params_[0]->value.device();
  for (Param* p : params_)
    LOOM_CHECK(p->value.dtype() == dtype && p->value.device() == device, "[data_parallel] parameters of mixed dtypes or devices (", p->name, ")");
  const int g = group_->size();
  const int64_t bucket_elems =
      std::max<int64_t>(1, static_cast<int64_t>(options_.bucket_mb * (1 << 20) / DTypeSize(dtype)));
  // Buckets are cut in backward order (the reverse of the model's parameter
  // order: the last parameters' gradients are final first), but the flat
  // buffers keep the model's order, bucket after bucket, so a layer's
  // consecutive matrices stay adjacent (a SwiGLU's w_gate then w_up: one
  // weight-gradient GEMM for the pair, ops/grouped_linear.h).
  bucket_of_.assign(params_.size(), 0);
  std::vector<int64_t> offset_of(params_.size());
  std::vector<size_t> first_of_bucket;  // the lowest parameter index of each bucket
  int64_t in_bucket = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const int64_t n = params_[k]->value.numel();
    if (in_bucket > 0 && in_bucket + n > bucket_elems) {
      first_of_bucket.push_back(k + 1);
      in_bucket = 0;
    }
    bucket_of_[k] = static_cast<int>(first_of_bucket.size());
    in_bucket += n;
  }
  first_of_bucket.push_back(0);
  buckets_.resize(first_of_bucket.size());
  int64_t total = 0;
  for (size_t b = buckets_.size(); b-- > 0;) {  // the earliest parameters first
    buckets_[b] = std::make_unique<Bucket>();
    buckets_[b]->offset = total;
    const size_t end = b == 0 ? params_.size() : first_of_bucket[b - 1];
    for (size_t k = first_of_bucket[b]; k < end; ++k) {
      offset_of[k] = total;
      total += params_[k]->value.numel();
    }
    buckets_[b]->size = (total - buckets_[b]->offset + g - 1) / g * g;
    total = buckets_[b]->offset + buckets_[b]->size;
  }
  // Move values and gradients into the flat buffers.
  flat_value_ = Tensor::Zeros({total}, dtype, device);
  flat_grad_ = Tensor::Zeros({total}, dtype, device);
  for (size_t k = 0; k < params_.size(); ++k) {
    Param* p = params_[k];
    Tensor value = flat_value_.Slice(offset_of[k], p->value.numel()).Reshape(p->value.shape());
    value.CopyFrom(p->value);
    p->value = value;
    Tensor grad = flat_grad_.Slice(offset_of[k], p->grad.numel()).Reshape(p->grad.shape());
    grad.CopyFrom(p->grad);
    p->grad = grad;
    index_of_[p] = static_cast<int>(k);
  }
  for (int k : bucket_of_) buckets_[k]->pending += 1;
  if (!options_.zero) {
    adamw_ = std::make_unique<AdamW>(params_, options_.adam);
    return;
  }
  // ZeRO: this rank's slice of every bucket, and the parameter pieces in it.
  const int r = group_->rank();
  for (auto& b : buckets_) {
    const int64_t n = b->size / g, lo = b->offset + r * n, hi = lo + n;
    b->grad_slice = Tensor::Zeros({n}, dtype, device);
    b->m = Tensor::Zeros({n}, dtype, device);
    b->v = Tensor::Zeros({n}, dtype, device);
    for (size_t k = 0; k < params_.size(); ++k) {
      const int64_t p_lo = offset_of[k], p_hi = p_lo + params_[k]->value.numel();
      const int64_t a = std::max(lo, p_lo), z = std::min(hi, p_hi);
      if (a < z) b->segments.push_back({params_[k], a - p_lo, a - lo, z - a});
    }
  }
}

DataParallel::~DataParallel() = default;

absl::Status DataParallel::StartBucket(Bucket& b, bool in_backward) {
  b.started = true;
  started_in_backward_ += in_backward;
  Tensor region = flat_grad_.Slice(b.offset, b.size);
  b.handle = options_.zero ? group_->StartReduceScatter(region, b.grad_slice) : group_->StartAllReduce(region);
  return absl::OkStatus();
}

void DataParallel::GradReady(const ParamList& ready) {
  for (const Param* p : ready) {
    auto it = index_of_.find(p);
    if (it == index_of_.end()) continue;
    Bucket& b = *buckets_[bucket_of_[it->second]];
    if (--b.pending == 0 && !b.started) {
      // Buckets start in order on every rank (collectives must match), so a
      // bucket waits for the ones before it.
      for (auto& earlier : buckets_) {
        if (earlier->started) continue;
        if (earlier->pending > 0) break;
        absl::Status s = StartBucket(*earlier, /*in_backward=*/true);
        if (!s.ok() && deferred_.ok()) deferred_ = s;
      }
    }
  }
}

absl::Status DataParallel::ReduceGradients() {
  for (auto& b : buckets_)
    if (!b->started) LOOM_RETURN_IF_ERROR(StartBucket(*b, /*in_backward=*/false));
  absl::Status status = deferred_;
  for (auto& b : buckets_) {
    absl::Status s = b->handle.Wait();
    if (status.ok()) status = s;
  }
  // Ready for the next step: every parameter of every bucket pending again.
  for (auto& b : buckets_) {
    b->started = false;
    b->pending = 0;
  }
  for (int k : bucket_of_) buckets_[k]->pending += 1;
  deferred_ = absl::OkStatus();
  last_started_in_backward_ = started_in_backward_;
  started_in_backward_ = 0;
  return status;
}

absl::StatusOr<double> DataParallel::SquaredNorm() {
  // Σ g² over the elements this rank is the one to count.
  std::vector<Tensor> slices;
  if (options_.zero) {
    for (auto& b : buckets_)
      for (const Segment& s : b->segments)
        if (s.param->sharded() || tp_rank_ == 0) slices.push_back(b->grad_slice.Slice(s.slice_offset, s.length));
  } else if (group_->rank() == 0) {
    for (const Param* p : params_)
      if (p->sharded() || tp_rank_ == 0) slices.push_back(p->grad);
  }
  std::vector<const Tensor*> counted;
  for (const Tensor& t : slices) counted.push_back(&t);
  const double local = SumSquares(counted);  // one host sync on a GPU, not one a tensor
  Tensor sum = Tensor::FromVector<double>({local}, {1});
  LOOM_RETURN_IF_ERROR(norm_group_->AllReduce(sum));
  return sum.data<double>()[0];
}

absl::StatusOr<double> DataParallel::ClipGradients(double max_norm) {
  LOOM_ASSIGN_OR_RETURN(const double squares, SquaredNorm());
  const double norm = std::sqrt(squares);
  set_grad_scale(ClipFactor(norm, max_norm));
  return norm;
}

absl::Status DataParallel::Step(double lr) {
  ++steps_;
  const double grad_scale = std::exchange(grad_scale_, 1);
  if (!options_.zero) {
    adamw_->set_steps(steps_ - 1);
    adamw_->Step(lr, grad_scale);
    return absl::OkStatus();
  }
  const int g = group_->size(), r = group_->rank();
  std::vector<CommHandle> gathers;
  std::vector<Tensor> mine(buckets_.size());
  for (size_t i = 0; i < buckets_.size(); ++i) {
    Bucket& b = *buckets_[i];
    const int64_t n = b.size / g;
    Tensor values = flat_value_.Slice(b.offset + r * n, n);
    for (const Segment& s : b.segments) {
      Tensor p = values.Slice(s.slice_offset, s.length), gs = b.grad_slice.Slice(s.slice_offset, s.length);
      Tensor m = b.m.Slice(s.slice_offset, s.length), v = b.v.Slice(s.slice_offset, s.length);
      AdamWUpdate(p, gs, m, v, lr, s.param->weight_decay ? options_.adam.weight_decay : 0.0, steps_,
                  options_.adam, grad_scale);
    }
    mine[i] = values.Clone();
    Tensor region = flat_value_.Slice(b.offset, b.size);
    gathers.push_back(group_->StartAllGather(mine[i], region));
  }
  for (CommHandle& h : gathers) LOOM_RETURN_IF_ERROR(h.Wait());
  // bf16 runs: the matmuls' copies follow the gathered masters (the
  // unsharded path's fused AdamW writes them itself).
  for (Param* p : params_)
    if (p->compute.defined()) ops::Convert(p->value, p->compute);
  return absl::OkStatus();
}

void DataParallel::set_steps(int64_t steps) {
  steps_ = steps;
  if (adamw_) adamw_->set_steps(steps);
}

int64_t DataParallel::optimizer_state_elements() const {
  if (!options_.zero) {
    int64_t n = 0;
    for (const Param* p : params_) n += 2 * p->value.numel();
    return n;
  }
  int64_t n = 0;
  for (const auto& b : buckets_) n += b->m.numel() + b->v.numel();
  return n;
}

std::vector<DataParallel::MomentShard> DataParallel::LocalMoments() const {
  std::vector<MomentShard> shards;
  if (!options_.zero) {
    if (group_->rank() != 0) return shards;
    for (size_t k = 0; k < params_.size(); ++k)
      shards.push_back({static_cast<int>(k), 0, adamw_->first_moments()[k], adamw_->second_moments()[k]});
    return shards;
  }
  for (const auto& b : buckets_)
    for (const Segment& s : b->segments)
      shards.push_back({index_of_.at(s.param), s.param_offset, b->m.Slice(s.slice_offset, s.length),
                        b->v.Slice(s.slice_offset, s.length)});
  return shards;
}

void DataParallel::ScatterMoments(const std::vector<Tensor>& m, const std::vector<Tensor>& v) {
  LOOM_CHECK(m.size() == params_.size() && v.size() == params_.size(), "[data_parallel] moments for ",
             m.size(), " parameters, model has ", params_.size());
  if (!options_.zero) {
    for (size_t k = 0; k < params_.size(); ++k) {
      adamw_->first_moments()[k].CopyFrom(m[k]);
      adamw_->second_moments()[k].CopyFrom(v[k]);
    }
    return;
  }
  for (auto& b : buckets_) {
    for (const Segment& s : b->segments) {
      const int k = index_of_.at(s.param);
      b->m.Slice(s.slice_offset, s.length).CopyFrom(m[k].Reshape({m[k].numel()}).Slice(s.param_offset, s.length));
      b->v.Slice(s.slice_offset, s.length).CopyFrom(v[k].Reshape({v[k].numel()}).Slice(s.param_offset, s.length));
    }
  }
}

}  // namespace loom
