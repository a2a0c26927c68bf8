// Zig-zag context-parallel layout (DESIGN.md, CP): every row of seq_len = N
// tokens is cut into 2·cp chunks of C = N / (2·cp) tokens; cp rank i holds
// chunks i and 2·cp−1−i of every row, in that order, so that under a causal
// mask every rank does the same amount of attention work.
//
//   global row r:  [ u=0 | u=1 | ... | u=cp−1 | u=cp | ... | u=2cp−1 ]
//   rank i, local row r (2·C tokens):  [ chunk i | chunk 2cp−1−i ]
//   local token (r, c, j) = global token (r, u(c), j), u(0) = i, u(1) = 2cp−1−i,
//   local flat index (r·2 + c)·C + j, global flat index r·N + u·C + j.
//
// The local Batch keeps global positions (or the per-document positions the
// data set wrote with data.reset_positions) and the row's global document
// ids, so a document may span chunks and ranks: attention compares ids, and
// the CP schemes (parallel/cp_attention.h, parallel/cp_lightning.h) use the
// per-chunk "starts a document" flags of CpChunks for the lightning state.
//
// Also here: CpMemoryLedger, the byte count of the buffers a CP scheme holds,
// which tests and loom-bench --what=cp read.
#pragma once

#include <cstdint>
#include <vector>

#include "model/batch.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom {

class Communicator;

// What a rank knows about its two chunks; every CP scheme takes it.
struct CpChunks {
  int cp = 1;
  int rank = 0;
  int64_t rows = 0;   // rows of the micro-batch (each local row is 2·chunk tokens)
  int64_t chunk = 0;  // C = seq_len / (2·cp)
  // [rows·2]: whether local chunk c of row r starts with a new document
  // (its first token's doc id differs from the previous token of the global
  // row). Chunk 0 of a row counts as starting one. Empty = no documents
  // (only chunk 0 starts one).
  std::vector<uint8_t> starts_document;

  int64_t seq_len() const { return 2 * cp * chunk; }
  int64_t local_tokens() const { return rows * 2 * chunk; }
  // Global chunk index u of local chunk c (0 or 1).
  int64_t global_chunk(int c) const { return c == 0 ? rank : 2 * cp - 1 - rank; }
  // Owner rank and local slot of global chunk u.
  static int Owner(int64_t u, int cp) { return static_cast<int>(u < cp ? u : 2 * cp - 1 - u); }
  static int Slot(int64_t u, int cp) { return u < cp ? 0 : 1; }
  // First local token of (row, local chunk).
  int64_t offset(int64_t row, int c) const { return (row * 2 + c) * chunk; }
  bool starts_doc(int64_t row, int c) const {
    if (starts_document.empty()) return global_chunk(c) == 0;
    return starts_document[row * 2 + c] != 0;
  }
};

// OK when seq_len splits into 2·cp equal chunks; else an error that says
// what to change.
absl::Status CheckZigzag(int64_t seq_len, int cp);

// The layout of rank `rank` for a batch of `rows` rows of `seq_len` tokens;
// doc_ids (optional, [rows·seq_len] i32, global) give the starts_document flags.
absl::StatusOr<CpChunks> ZigzagChunks(int64_t rows, int64_t seq_len, int cp, int rank,
                                      const Tensor& doc_ids = Tensor());

struct ZigzagShard {
  Batch batch;      // rows local rows of 2·C tokens
  CpChunks chunks;  // pass to the CP schemes
};

// Rank `rank`'s part of a global batch (uniform rows of batch.seq_len tokens;
// doc ids optional). tokens, targets, positions and doc ids are copied per
// token; the local token_rows are uniform rows of 2·C tokens.
absl::StatusOr<ZigzagShard> ZigzagShardBatch(const Batch& global, int cp, int rank);

// Any per-token tensor [rows·N, ...] -> rank `rank`'s [rows·2C, ...] (copy).
Tensor ZigzagSlice(const Tensor& global, int64_t rows, int64_t seq_len, int cp, int rank);
// The inverse: locals[i] of rank i [rows·2C, ...] -> global [rows·N, ...].
Tensor ZigzagUnshard(const std::vector<Tensor>& locals, int64_t rows, int64_t seq_len);
// The same over a communicator (an all-gather, then the permutation): every
// rank of cp_group gets the global tensor. For tests and tools.
absl::StatusOr<Tensor> ZigzagGather(Communicator& cp_group, const Tensor& local, const CpChunks& chunks);

// The buffers a CP scheme holds, in bytes: `current` now, `peak` the most at
// once, `largest` the largest single buffer and `largest_tokens` the most
// tokens (dim 0) of any one token-major buffer. The schemes count their
// inputs and outputs (local q, k, v, o, lse, d_o, dq, dk, dv) while they run,
// their scratch buffers (blocks in flight, gathered K/V, partial outputs,
// all-to-all staging, states) and what they save for backward; not the
// temporaries inside the single-chunk ops (score tiles), which are the same
// whatever the scheme.
struct CpMemoryLedger {
  int64_t current = 0, peak = 0, largest = 0, largest_tokens = 0;
  void Hold(const Tensor& t, bool token_major = true);
  void Drop(const Tensor& t) { current -= static_cast<int64_t>(t.nbytes()); }
  void Reset() { *this = {}; }
};

// A scratch tensor counted by a ledger (nullable) while it lives.
class HeldTensor {
 public:
  HeldTensor() = default;
  // On `device` (the CPU unless given: CP of CUDA tensors keeps its scratch
  // on their device).
  HeldTensor(CpMemoryLedger* ledger, const Shape& shape, DType dtype, bool zero = false, bool token_major = true,
             Device device = Device::Cpu());
  // Counts an existing tensor (an input or output) for this scope.
  static HeldTensor Wrap(CpMemoryLedger* ledger, const Tensor& t);
  HeldTensor(HeldTensor&& o) noexcept { *this = std::move(o); }
  HeldTensor& operator=(HeldTensor&& o) noexcept;
  HeldTensor(const HeldTensor&) = delete;
  HeldTensor& operator=(const HeldTensor&) = delete;
  ~HeldTensor() { Release(); }
  void Release();
  // Hands the tensor over, still counted (its new owner drops it).
  Tensor Detach() {
    ledger_ = nullptr;
    return std::move(t_);
  }
  Tensor& t() { return t_; }
  const Tensor& t() const { return t_; }

 private:
  CpMemoryLedger* ledger_ = nullptr;
  Tensor t_;
};

}  // namespace loom
