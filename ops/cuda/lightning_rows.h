// Host-side row checks the two CUDA lightning attentions share
// (lightning_attention.cu, bf16; lightning_attention_f32.cu, f32): both plan
// their segments on the host from cu_seqlens, and neither handles documents
// inside a row. `op` starts every message, e.g. "[lightning_attention] CUDA:".
#pragma once

#include <cstdint>
#include <vector>

#include "ops/attention_seqs.h"
#include "runtime/tensor.h"

namespace loom::ops::cuda {

inline void CheckRowsHost(const TokenRows& rows, int64_t tokens, const char* op) {
  const Tensor& cu = rows.cu_seqlens;
  LOOM_CHECK(cu.defined() && cu.ndim() == 1 && cu.numel() >= 1 && cu.dtype() == DType::kI32 && cu.device().is_cpu(),
             op, " cu_seqlens must be a CPU i32 [R+1] tensor (the launcher plans on the host)");
  LOOM_CHECK(!rows.has_docs(), op,
             " doc_ids (documents inside a row) are not supported by the CUDA kernels; give each document its own "
             "row in cu_seqlens");
  const int32_t* c = cu.data<int32_t>();
  const int64_t r = rows.rows();
  LOOM_CHECK(c[0] == 0 && c[r] == tokens, op, " cu_seqlens must run from 0 to T = ", tokens, ", got ", c[0], " .. ",
             c[r]);
  for (int64_t i = 0; i < r; ++i) LOOM_CHECK(c[i] <= c[i + 1], op, " cu_seqlens decreases at ", i + 1);
}

inline void CheckNoChunkDocs(const Tensor& doc_ids, const char* op) {
  LOOM_CHECK(!doc_ids.defined(), op, " doc_ids (documents inside a chunk) are not supported by the CUDA kernels");
}

// cu_seqlens as a host vector (checked by CheckRowsHost first).
inline std::vector<int32_t> HostCu(const TokenRows& rows) {
  const int32_t* c = rows.cu_seqlens.data<int32_t>();
  return std::vector<int32_t>(c, c + rows.rows() + 1);
}

}  // namespace loom::ops::cuda
