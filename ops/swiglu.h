// SwiGLU activation: h = SiLU(gate) ⊙ up, element-wise over [N, F].
// Backward: dgate, dup written.
//
// With a row scale s [N] (an MoE expert row's routing gate, model/moe.cc):
//   h[n] = s_n · SiLU(gate[n]) ⊙ up[n]
//   dgate, dup as above times s_n;   ds_n = Σ_f dh[n, f] · SiLU(gate[n, f]) · up[n, f]
// (ds written; each row summed in a fixed order). The scaled backward packs
// [dgate | dup] into the rows of one [N, 2F] tensor, the dy of the gate/up
// pair's backward (ops/grouped_linear.h GroupedLinearPairBackward).
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

// scale, dscale: [N] (any shape of N elements); the CPU takes them in gate's
// dtype, CUDA in f32 (the GPU router's gates).
void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, const Tensor* scale = nullptr);
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup);
// dgu [N, 2F], dscale [N] written.
void SwigluScaledBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, const Tensor& scale, Tensor& dgu,
                          Tensor& dscale);

namespace cuda {
// f32 or bf16 CUDA tensors (one dtype), f32 math (ops/cuda/swiglu.cu).
void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, const Tensor* scale = nullptr,
                   CudaStream stream = nullptr);
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
                    CudaStream stream = nullptr);
void SwigluScaledBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, const Tensor& scale, Tensor& dgu,
                          Tensor& dscale, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
