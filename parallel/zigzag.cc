#include "parallel/zigzag.h"

#include <algorithm>
#include <cstring>

#include "parallel/communicator.h"

namespace loom {

absl::Status CheckZigzag(int64_t seq_len, int cp) {
  if (cp < 1) return absl::InvalidArgumentError(absl::StrCat("[zigzag] parallel.cp must be >= 1, got ", cp));
  if (seq_len <= 0 || seq_len % (2 * cp) != 0) {
    const int64_t unit = 2 * cp;
    const int64_t down = seq_len / unit * unit, up = down + unit;
    return absl::InvalidArgumentError(absl::StrCat(
        "[zigzag] train.seq_len = ", seq_len, " does not split into 2·cp = ", unit,
        " equal chunks (zig-zag context parallelism with parallel.cp = ", cp,
        "): set train.seq_len to a multiple of ", unit, " (e.g. ", down > 0 ? absl::StrCat(down, " or ") : "", up,
        ") or choose a parallel.cp with 2·cp dividing ", seq_len));
  }
  return absl::OkStatus();
}

absl::StatusOr<CpChunks> ZigzagChunks(int64_t rows, int64_t seq_len, int cp, int rank, const Tensor& doc_ids) {
  LOOM_RETURN_IF_ERROR(CheckZigzag(seq_len, cp));
  if (rank < 0 || rank >= cp)
    return absl::InvalidArgumentError(absl::StrCat("[zigzag] rank ", rank, " is outside the cp group of ", cp));
  CpChunks c;
  c.cp = cp;
  c.rank = rank;
  c.rows = rows;
  c.chunk = seq_len / (2 * cp);
  if (doc_ids.defined()) {
    if (doc_ids.dtype() != DType::kI32 || doc_ids.numel() != rows * seq_len)
      return absl::InvalidArgumentError(absl::StrCat("[zigzag] doc_ids must be i32 [rows·seq_len] = [", rows * seq_len,
                                                     "], got ", DTypeName(doc_ids.dtype()), " ",
                                                     ShapeString(doc_ids.shape())));
    const int32_t* d = doc_ids.data<int32_t>();
    c.starts_document.resize(rows * 2);
    for (int64_t r = 0; r < rows; ++r)
      for (int s = 0; s < 2; ++s) {
        const int64_t first = r * seq_len + c.global_chunk(s) * c.chunk;
        c.starts_document[r * 2 + s] = c.global_chunk(s) == 0 || d[first] != d[first - 1];
      }
  }
  return c;
}

namespace {

// Copies chunk-sized token runs between a global [rows·N, ...] and a local
// [rows·2C, ...] tensor; to_local picks the direction.
void CopyChunks(const Tensor& global, const Tensor& local, int64_t rows, int64_t seq_len, int cp, int rank,
                bool to_local) {
  const int64_t chunk = seq_len / (2 * cp);
  const int64_t per_token = global.numel() / (rows * seq_len);
  const size_t bytes = static_cast<size_t>(chunk * per_token) * DTypeSize(global.dtype());
  char* g = static_cast<char*>(global.raw());
  char* l = static_cast<char*>(local.raw());
  const size_t token_bytes = static_cast<size_t>(per_token) * DTypeSize(global.dtype());
  for (int64_t r = 0; r < rows; ++r)
    for (int s = 0; s < 2; ++s) {
      const int64_t u = s == 0 ? rank : 2 * cp - 1 - rank;
      char* gp = g + (r * seq_len + u * chunk) * token_bytes;
      char* lp = l + (r * 2 + s) * chunk * token_bytes;
      if (to_local)
        std::memcpy(lp, gp, bytes);
      else
        std::memcpy(gp, lp, bytes);
    }
}

Shape WithDim0(const Shape& s, int64_t n) {
  Shape out = s;
  out[0] = n;
  return out;
}

}  // namespace

Tensor ZigzagSlice(const Tensor& global, int64_t rows, int64_t seq_len, int cp, int rank) {
  LOOM_CHECK(CheckZigzag(seq_len, cp).ok() && global.ndim() >= 1 && global.dim(0) == rows * seq_len,
             "[zigzag] slice of ", ShapeString(global.shape()), " for rows ", rows, " seq_len ", seq_len, " cp ", cp);
  Tensor local = Tensor::Empty(WithDim0(global.shape(), rows * seq_len / cp), global.dtype());
  CopyChunks(global, local, rows, seq_len, cp, rank, /*to_local=*/true);
  return local;
}

Tensor ZigzagUnshard(const std::vector<Tensor>& locals, int64_t rows, int64_t seq_len) {
  const int cp = static_cast<int>(locals.size());
  LOOM_CHECK(cp >= 1 && CheckZigzag(seq_len, cp).ok(), "[zigzag] unshard of ", cp, " parts, seq_len ", seq_len);
  Tensor global = Tensor::Empty(WithDim0(locals[0].shape(), rows * seq_len), locals[0].dtype());
  for (int i = 0; i < cp; ++i) {
    LOOM_CHECK(locals[i].shape() == locals[0].shape() && locals[i].dim(0) == rows * seq_len / cp,
               "[zigzag] part ", i, " is ", ShapeString(locals[i].shape()));
    CopyChunks(global, locals[i], rows, seq_len, cp, i, /*to_local=*/false);
  }
  return global;
}

absl::StatusOr<Tensor> ZigzagGather(Communicator& cp_group, const Tensor& local, const CpChunks& chunks) {
  const int cp = cp_group.size();
  if (cp != chunks.cp)
    return absl::InvalidArgumentError(absl::StrCat("[zigzag] group of ", cp, " ranks, layout for cp = ", chunks.cp));
  Tensor all = Tensor::Empty(WithDim0(local.shape(), local.dim(0) * cp), local.dtype());
  LOOM_RETURN_IF_ERROR(cp_group.AllGather(local, all));
  std::vector<Tensor> parts;
  for (int i = 0; i < cp; ++i) parts.push_back(all.Slice(i * local.dim(0), local.dim(0)));
  return ZigzagUnshard(parts, chunks.rows, chunks.seq_len());
}

absl::StatusOr<ZigzagShard> ZigzagShardBatch(const Batch& global, int cp, int rank) {
  const ops::TokenRows& tr = global.token_rows;
  const int64_t rows = global.rows, n = global.seq_len;
  if (tr.cu_seqlens.defined()) {
    bool uniform = tr.rows() == rows;
    for (int64_t r = 0; uniform && r < rows; ++r) uniform = tr.begin(r) == r * n && tr.end(r) == (r + 1) * n;
    if (!uniform)
      return absl::InvalidArgumentError(absl::StrCat(
          "[zigzag] context parallelism needs rows of train.seq_len = ", n,
          " tokens each (documents as doc_ids inside the rows), got cu_seqlens of ", tr.rows(), " rows"));
  }
  LOOM_ASSIGN_OR_RETURN(CpChunks chunks, ZigzagChunks(rows, n, cp, rank, tr.doc_ids));
  ZigzagShard shard;
  Batch& b = shard.batch;
  b.rows = rows;
  b.seq_len = 2 * chunks.chunk;
  auto slice = [&](const Tensor& t) { return t.defined() ? ZigzagSlice(t, rows, n, cp, rank) : Tensor(); };
  b.tokens = slice(global.tokens);
  b.targets = slice(global.targets);
  b.positions = slice(global.positions);
  b.token_rows = ops::TokenRows::Uniform(rows, b.seq_len);
  b.token_rows.doc_ids = slice(tr.doc_ids);
  shard.chunks = std::move(chunks);
  return shard;
}

// ---- CpMemoryLedger ----

void CpMemoryLedger::Hold(const Tensor& t, bool token_major) {
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  current += bytes;
  peak = std::max(peak, current);
  largest = std::max(largest, bytes);
  if (token_major && t.ndim() >= 1) largest_tokens = std::max(largest_tokens, t.dim(0));
}

HeldTensor::HeldTensor(CpMemoryLedger* ledger, const Shape& shape, DType dtype, bool zero, bool token_major,
                       Device device)
    : ledger_(ledger), t_(zero ? Tensor::Zeros(shape, dtype, device) : Tensor::Empty(shape, dtype, device)) {
  if (ledger_) ledger_->Hold(t_, token_major);
}

HeldTensor HeldTensor::Wrap(CpMemoryLedger* ledger, const Tensor& t) {
  HeldTensor h;
  h.ledger_ = t.defined() ? ledger : nullptr;
  h.t_ = t;
  if (h.ledger_) h.ledger_->Hold(t, /*token_major=*/false);
  return h;
}

HeldTensor& HeldTensor::operator=(HeldTensor&& o) noexcept {
  if (this != &o) {
    Release();
    ledger_ = o.ledger_;
    t_ = std::move(o.t_);
    o.ledger_ = nullptr;
    o.t_ = Tensor();
  }
  return *this;
}

void HeldTensor::Release() {
  if (ledger_ && t_.defined()) ledger_->Drop(t_);
  ledger_ = nullptr;
  t_ = Tensor();
}

}  // namespace loom
