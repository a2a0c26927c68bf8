#include "ops/attention_seqs.h"

#include <vector>

#include "runtime/status.h"

namespace loom::ops {

TokenRows TokenRows::Uniform(int64_t rows, int64_t n) {
  TokenRows r;
  r.cu_seqlens = Tensor::Empty({rows + 1}, DType::kI32);
  for (int64_t i = 0; i <= rows; ++i) r.cu_seqlens.data<int32_t>()[i] = static_cast<int32_t>(i * n);
  return r;
}

void CheckDocumentsInOrder(const TokenRows& rows, const char* op, const char* name) {
  if (!rows.has_docs()) return;
  for (int64_t r = 0; r < rows.rows(); ++r)
    for (int64_t t = rows.begin(r) + 1; t < rows.end(r); ++t)
      LOOM_CHECK(rows.doc(t - 1) <= rows.doc(t), "[", op, "] ", name, ".doc_ids decrease at token ", t, " in row ", r);
}

DocumentRows SplitAtDocuments(const TokenRows& rows) {
  DocumentRows out;
  std::vector<int32_t> cu = {static_cast<int32_t>(rows.rows() > 0 ? rows.begin(0) : 0)};
  for (int64_t r = 0; r < rows.rows(); ++r) {
    out.first.push_back(static_cast<int64_t>(cu.size()) - 1);
    for (int64_t t = rows.begin(r) + 1; t < rows.end(r); ++t)
      if (rows.doc(t) != rows.doc(t - 1)) cu.push_back(static_cast<int32_t>(t));
    cu.push_back(static_cast<int32_t>(rows.end(r)));
  }
  out.first.push_back(static_cast<int64_t>(cu.size()) - 1);
  out.rows.cu_seqlens = Tensor::FromVector(cu, {static_cast<int64_t>(cu.size())});
  return out;
}

}  // namespace loom::ops
