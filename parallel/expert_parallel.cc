#include "parallel/expert_parallel.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace loom {
namespace {

// Copies `rows` rows from src (starting at row s) to dst (row d), on any devices.
void CopyRows(const Tensor& src, int64_t s, Tensor& dst, int64_t d, int64_t rows) {
  if (rows == 0) return;
  Tensor to = dst.Slice(d, rows);
  to.CopyFrom(src.Slice(s, rows));
}

void CheckStatus(const absl::Status& s, const char* what) { LOOM_CHECK(s.ok(), "[expert_parallel] ", what, ": ", s.message()); }

}  // namespace

ExpertExchange::ExpertExchange(Communicator* ep, int experts, const std::vector<int64_t>& rows_per_expert)
    : ep_(ep != nullptr && ep->size() > 1 ? ep : nullptr) {
  split_ = {.experts = experts, .size = ep_ ? ep_->size() : 1, .rank = ep_ ? ep_->rank() : 0};
  LOOM_CHECK(experts % split_.size == 0, "[expert_parallel] ", experts, " experts do not split over ep = ", split_.size);
  LOOM_CHECK(static_cast<int>(rows_per_expert.size()) == experts, "[expert_parallel] ", rows_per_expert.size(),
             " row counts for ", experts, " experts");
  const int size = split_.size, per = split_.per_rank();
  send_rows_.assign(size, 0);
  for (int e = 0; e < experts; ++e) send_rows_[split_.owner(e)] += rows_per_expert[e];
  for (int64_t r : send_rows_) sent_ += r;
  if (ep_ == nullptr) {
    counts_ = rows_per_expert;
  } else {
    // counts_[s·per + i]: rows source s sends to local expert i.
    Tensor mine = Tensor::FromVector<int64_t>(rows_per_expert, {experts});
    Tensor theirs = Tensor::Empty({experts}, DType::kI64);
    CheckStatus(ep_->AllToAll(mine, theirs), "row counts");
    counts_.assign(theirs.data<int64_t>(), theirs.data<int64_t>() + experts);
  }
  recv_rows_.assign(size, 0);
  local_rows_.assign(per, 0);
  for (int s = 0; s < size; ++s)
    for (int i = 0; i < per; ++i) {
      recv_rows_[s] += counts_[s * per + i];
      local_rows_[i] += counts_[s * per + i];
    }
  for (int64_t r : recv_rows_) received_ += r;
}

// The all-to-all's buffers are source-major: (source s, local expert i)
// blocks of counts_[s·per + i] rows; the experts' are expert-major.
void ExpertExchange::Reorder(const Tensor& from, Tensor& to, bool to_expert_major) const {
  const int size = split_.size, per = split_.per_rank();
  std::vector<int64_t> expert_at(per, 0);  // next row of each local expert in the expert-major buffer
  for (int i = 1; i < per; ++i) expert_at[i] = expert_at[i - 1] + local_rows_[i - 1];
  int64_t source_at = 0;
  for (int s = 0; s < size; ++s)
    for (int i = 0; i < per; ++i) {
      const int64_t n = counts_[s * per + i];
      if (to_expert_major) {
        CopyRows(from, source_at, to, expert_at[i], n);
      } else {
        CopyRows(from, expert_at[i], to, source_at, n);
      }
      expert_at[i] += n;
      source_at += n;
    }
}

Tensor ExpertExchange::Dispatch(const Tensor& rows) const {
  LOOM_CHECK(rows.ndim() == 2 && rows.dim(0) == sent_, "[expert_parallel] dispatch of ", ShapeString(rows.shape()),
             ", expected ", sent_, " rows");
  if (ep_ == nullptr) return rows;
  const int64_t c = rows.dim(1);
  const int size = split_.size;
  Tensor received = Tensor::Empty({std::max<int64_t>(received_, 1), c}, rows.dtype(), rows.device());  // never 0 rows
  Tensor in = sent_ > 0 ? rows : Tensor::Empty({1, c}, rows.dtype(), rows.device());
  std::vector<int64_t> send(size), recv(size);
  for (int s = 0; s < size; ++s) {
    send[s] = send_rows_[s] * c;
    recv[s] = recv_rows_[s] * c;
  }
  Tensor in_view = in.Slice(0, sent_), received_view = received.Slice(0, received_);
  CheckStatus(ep_->AllToAllV(in_view, send, received_view, recv), "dispatch");
  Tensor out = Tensor::Empty({std::max<int64_t>(received_, 1), c}, rows.dtype(), rows.device());
  Reorder(received, out, /*to_expert_major=*/true);
  return out.Slice(0, received_);
}

Tensor ExpertExchange::Combine(const Tensor& packed) const {
  LOOM_CHECK(packed.ndim() == 2 && packed.dim(0) == received_, "[expert_parallel] combine of ",
             ShapeString(packed.shape()), ", expected ", received_, " rows");
  if (ep_ == nullptr) return packed;  // received_ = sent_
  const int64_t c = packed.dim(1);
  const int size = split_.size;
  Tensor source_major = Tensor::Empty({std::max<int64_t>(received_, 1), c}, packed.dtype(), packed.device());
  Reorder(packed, source_major, /*to_expert_major=*/false);
  Tensor out = Tensor::Empty({std::max<int64_t>(sent_, 1), c}, packed.dtype(), packed.device());
  std::vector<int64_t> send(size), recv(size);
  for (int s = 0; s < size; ++s) {
    send[s] = recv_rows_[s] * c;
    recv[s] = send_rows_[s] * c;
  }
  Tensor in_view = source_major.Slice(0, received_), out_view = out.Slice(0, sent_);
  CheckStatus(ep_->AllToAllV(in_view, send, out_view, recv), "combine");
  return out_view;
}

bool IsExpertParam(const Param& p) { return p.name.find(".moe.experts.") != std::string::npos; }

ExpertDataParallel::ExpertDataParallel(const ParamList& params, Communicator* dense_group,
                                       Communicator* expert_group, Communicator* norm_group, int tp_rank,
                                       const DataParallelOptions& options) {
  ParamList dense, experts;
  for (Param* p : params) {
    is_expert_.push_back(IsExpertParam(*p));
    (is_expert_.back() ? experts : dense).push_back(p);
  }
  dense_ = std::make_unique<DataParallel>(dense, dense_group, norm_group, tp_rank, options);
  if (!experts.empty())
    experts_ = std::make_unique<DataParallel>(experts, expert_group, norm_group, tp_rank, options);
}

void ExpertDataParallel::GradReady(const ParamList& ready) {
  dense_->GradReady(ready);  // each instance skips the parameters it does not hold
  if (experts_) experts_->GradReady(ready);
}

absl::Status ExpertDataParallel::ReduceGradients() {
  LOOM_RETURN_IF_ERROR(dense_->ReduceGradients());
  return experts_ ? experts_->ReduceGradients() : absl::OkStatus();
}

absl::StatusOr<double> ExpertDataParallel::ClipGradients(double max_norm) {
  if (!experts_) return dense_->ClipGradients(max_norm);
  LOOM_ASSIGN_OR_RETURN(const double dense_squares, dense_->SquaredNorm());
  LOOM_ASSIGN_OR_RETURN(const double expert_squares, experts_->SquaredNorm());
  const double norm = std::sqrt(dense_squares + expert_squares);
  const double f = ClipFactor(norm, max_norm);
  dense_->set_grad_scale(f);
  experts_->set_grad_scale(f);
  return norm;
}

absl::Status ExpertDataParallel::Step(double lr) {
  LOOM_RETURN_IF_ERROR(dense_->Step(lr));
  return experts_ ? experts_->Step(lr) : absl::OkStatus();
}

void ExpertDataParallel::set_steps(int64_t steps) {
  dense_->set_steps(steps);
  if (experts_) experts_->set_steps(steps);
}

std::vector<DataParallel::MomentShard> ExpertDataParallel::LocalMoments() const {
  std::vector<int> dense_at, expert_at;  // each instance's parameter index -> ours
  for (size_t i = 0; i < is_expert_.size(); ++i) (is_expert_[i] ? expert_at : dense_at).push_back(static_cast<int>(i));
  std::vector<DataParallel::MomentShard> shards;
  for (DataParallel::MomentShard s : dense_->LocalMoments()) {
    s.param = dense_at[s.param];
    shards.push_back(std::move(s));
  }
  if (experts_)
    for (DataParallel::MomentShard s : experts_->LocalMoments()) {
      s.param = expert_at[s.param];
      shards.push_back(std::move(s));
    }
  return shards;
}

void ExpertDataParallel::ScatterMoments(const std::vector<Tensor>& m, const std::vector<Tensor>& v) {
  LOOM_CHECK(m.size() == is_expert_.size() && v.size() == is_expert_.size(), "[expert_parallel] moments for ",
             m.size(), " parameters, model has ", is_expert_.size());
  std::vector<Tensor> dm, dv, em, ev;
  for (size_t i = 0; i < is_expert_.size(); ++i) {
    (is_expert_[i] ? em : dm).push_back(m[i]);
    (is_expert_[i] ? ev : dv).push_back(v[i]);
  }
  dense_->ScatterMoments(dm, dv);
  if (experts_) experts_->ScatterMoments(em, ev);
}

}  // namespace loom
