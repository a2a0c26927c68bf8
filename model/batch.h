// One micro-batch as the model consumes it: rows·seq_len tokens flattened.
#pragma once

#include <memory>

#include "ops/attention_seqs.h"
#include "runtime/tensor.h"

namespace loom {

struct CpChunks;  // parallel/zigzag.h

struct Batch {
  int64_t rows = 0;
  int64_t seq_len = 0;
  Tensor tokens;     // [T] i32 inputs
  Tensor targets;    // [T] i32 next tokens; −100 = no loss here
  Tensor positions;  // [T] i32 RoPE positions
  ops::TokenRows token_rows;  // rows and documents, for attention
  // Context parallelism: this rank's zig-zag chunks of the global rows
  // (each local row is its two chunks); null without CP.
  std::shared_ptr<const CpChunks> cp_chunks;

  int64_t tokens_count() const { return rows * seq_len; }
  // rows × seq_len uninitialised tokens, targets and positions, uniform rows,
  // and (with_docs) uninitialised per-token document ids.
  static Batch Allocate(int64_t rows, int64_t seq_len, bool with_docs) {
    Batch b;
    b.rows = rows;
    b.seq_len = seq_len;
    b.tokens = Tensor::Empty({rows * seq_len}, DType::kI32);
    b.targets = Tensor::Empty({rows * seq_len}, DType::kI32);
    b.positions = Tensor::Empty({rows * seq_len}, DType::kI32);
    b.token_rows = ops::TokenRows::Uniform(rows, seq_len);
    if (with_docs) b.token_rows.doc_ids = Tensor::Empty({rows * seq_len}, DType::kI32);
    return b;
  }
  // This batch with tokens, targets and positions on `device` (token_rows
  // stay on the host; the attention ops keep their device copies).
  Batch To(Device device) const {
    Batch b = *this;
    if (tokens.device() == device) return b;
    b.tokens = tokens.To(device);
    b.targets = targets.To(device);
    b.positions = positions.To(device);
    return b;
  }
  // Targets that count towards the loss (not −100).
  int64_t CountTargets() const {
    const Tensor host = targets.device().is_cpu() ? targets : targets.To(Device::Cpu());
    int64_t n = 0;
    for (int64_t i = 0; i < host.numel(); ++i) n += host.data<int32_t>()[i] != -100;
    return n;
  }
};

}  // namespace loom
