#include "ops/attention_seqs.h"

namespace loom::ops {

TokenRows TokenRows::Uniform(int64_t rows, int64_t n) {
  TokenRows r;
  r.cu_seqlens = Tensor::Empty({rows + 1}, DType::kI32);
  for (int64_t i = 0; i <= rows; ++i) r.cu_seqlens.data<int32_t>()[i] = static_cast<int32_t>(i * n);
  return r;
}

}  // namespace loom::ops
