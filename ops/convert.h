// Element-wise dtype conversion between float tensors of one device:
//   dst = src rounded to dst's dtype (round to nearest even for bf16).
// bf16 runs use it to write the bf16 copies of the f32 master weights.
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

void Convert(const Tensor& src, Tensor& dst);
// A converted copy of t on t's device.
Tensor ConvertedCopy(const Tensor& t, DType dtype);

namespace cuda {
// f32 ↔ bf16 (and same-dtype copies) of CUDA tensors.
void Convert(const Tensor& src, Tensor& dst, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
