// How the tokens of a flattened batch group into rows (independent
// sequences) and documents, shared by the attention ops.
//   cu_seqlens [R+1] i32: row r holds tokens [cu[r], cu[r+1]) (rows may differ
//     in length: varlen).
//   doc_ids [T] i32, optional (undefined Tensor = one document a row):
//     document id of each token, non-decreasing within a row. Tokens of
//     different documents never interact; a lightning state resets where the
//     id changes.
#pragma once

#include <memory>
#include <vector>

#include "runtime/tensor.h"

namespace loom::ops {

// The device copy the CUDA kernels read (defined in
// ops/cpu/softmax_attention.cc; see ops::cuda::DeviceRows).
struct TokenRowsDeviceCopy;

struct TokenRows {
  Tensor cu_seqlens;
  Tensor doc_ids;
  int64_t rows() const { return cu_seqlens.numel() - 1; }
  // Row r's [begin, end).
  int64_t begin(int64_t r) const { return cu_seqlens.data<int32_t>()[r]; }
  int64_t end(int64_t r) const { return cu_seqlens.data<int32_t>()[r + 1]; }
  bool has_docs() const { return doc_ids.defined(); }
  int32_t doc(int64_t t) const { return has_docs() ? doc_ids.data<int32_t>()[t] : 0; }

  // R rows of n tokens each, one document a row.
  static TokenRows Uniform(int64_t rows, int64_t n);

  // Filled on first use by ops::cuda::DeviceRows, so that a batch's rows are
  // copied to the GPU once, not once per attention call; a cache, not state:
  // it is checked against cu_seqlens and doc_ids on every use.
  mutable std::shared_ptr<TokenRowsDeviceCopy> device_copy;
};

// Fails "[op] name.doc_ids decrease at token t in row r" unless the doc ids
// are non-decreasing within each row (the kernels bound their tiles by it).
void CheckDocumentsInOrder(const TokenRows& rows, const char* op, const char* name);

// Each document of each row as a row of its own: rows of the result are the
// runs of one doc id inside a row (one run a row without doc_ids), in
// order; row r's documents are the result's rows [first[r], first[r + 1]).
// Rows must follow each other without gaps (the first starts where it
// starts; a gap before a row would join the previous row's last document).
// The lightning ops run documents through the CUDA kernels this way, and
// cuDNN's ragged attention graphs take them as their sequences.
struct DocumentRows {
  TokenRows rows;
  std::vector<int64_t> first;
};
DocumentRows SplitAtDocuments(const TokenRows& rows);

}  // namespace loom::ops
