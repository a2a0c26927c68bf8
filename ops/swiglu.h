// SwiGLU activation: h = SiLU(gate) ⊙ up, element-wise over [N, F].
// Backward: dgate, dup packed into the rows of one dgu [N, 2F], [dgate | dup]
// a row: the dy of the gate/up pair's backward (ops/grouped_linear.h
// GroupedLinearPairBackward, one GEMM for dx where the pair's weights are
// adjacent).
//
// With a row scale s [N] (an MoE expert row's routing gate, model/moe.cc):
//   h[n] = s_n · SiLU(gate[n]) ⊙ up[n]
//   dgate, dup as above times s_n;   ds_n = Σ_f dh[n, f] · SiLU(gate[n, f]) · up[n, f]
// (ds written; each row summed in a fixed order). h and dgu must not
// overlap the inputs.
#pragma once

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

// scale, dscale: [N] (any shape of N elements); the CPU takes them in gate's
// dtype, CUDA in f32 (the GPU router's gates).
void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, const Tensor* scale = nullptr);
// dgu [N, 2F] written; scale and dscale both given or both null.
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgu, const Tensor* scale = nullptr,
                    Tensor* dscale = nullptr);

namespace cuda {
// f32 or bf16 CUDA tensors (one dtype), f32 math (ops/cuda/swiglu.cu).
void SwigluForward(const Tensor& gate, const Tensor& up, Tensor& h, const Tensor* scale = nullptr,
                   CudaStream stream = nullptr);
void SwigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgu, const Tensor* scale = nullptr,
                    Tensor* dscale = nullptr, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
