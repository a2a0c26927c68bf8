#include "ops/cuda/tensor_map.h"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "runtime/cuda_check.h"
#include "runtime/status.h"

namespace loom::ops::cuda {
namespace {

// cuTensorMapEncodeTiled from the driver the runtime loaded (Loom links the
// runtime only).
PFN_cuTensorMapEncodeTiled_v12000 EncodeTiled() {
  static const auto fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    LOOM_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    LOOM_CHECK(found == cudaDriverEntryPointSuccess && f != nullptr, "the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Boxes of `rows` tokens by 128 bytes of one head's d elements of
// `elem_bytes` each, 128-byte swizzled.
CUtensorMap TokenPanelMap(const void* base, CUtensorMapDataType type, int elem_bytes, int64_t tokens, int64_t heads,
                          int64_t d, int rows) {
  const int box_cols = 128 / elem_bytes;
  LOOM_CHECK(reinterpret_cast<uintptr_t>(base) % 16 == 0 && d % box_cols == 0 && rows >= 1 && rows <= 256,
             "tensor map: base ", base, ", d ", d, ", rows ", rows, " (need 16-byte alignment, d % ", box_cols,
             " == 0, rows ≤ 256)");
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(d * elem_bytes), static_cast<cuuint64_t>(heads * d * elem_bytes)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_cols), 1, static_cast<cuuint32_t>(rows)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = EncodeTiled()(&map, type, 3, const_cast<void*>(base), dims, strides, box, element_strides,
                                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  LOOM_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(r), ") for ", tokens,
             " tokens x ", heads, " heads x ", d);
  return map;
}

}  // namespace

CUtensorMap Bf16TokenPanelMap(const void* base, int64_t tokens, int64_t heads, int64_t d, int rows) {
  return TokenPanelMap(base, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tokens, heads, d, rows);
}

CUtensorMap F32TokenPanelMap(const void* base, int64_t tokens, int64_t heads, int64_t d, int rows) {
  return TokenPanelMap(base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, tokens, heads, d, rows);
}

}  // namespace loom::ops::cuda
