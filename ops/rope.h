// Rotary position embedding, half-split pairing (Hugging Face Llama):
// dimension i pairs with i + D/2, angle = pos · inv_freq[i], i < D/2, and
// both outputs carry the attention factor a (1 except YaRN):
//   y[i]       = a · (x[i] cos − x[i+D/2] sin)
//   y[i+D/2]   = a · (x[i+D/2] cos + x[i] sin)
//   x, y [T, H, D], positions [T] i32. y may alias x.
// Backward is the transposed map: dx = a · Rᵀ dy (written; may alias dy).
//
// The frequencies come from a RopeTable computed once from the model config
// (configs/loom.proto RopeScaling): plain RoPE has inv_freq[i] = θ^(−2i/D);
// linear, dynamic (static NTK), YaRN and Llama 3 scaling follow
// transformers' ROPE_INIT_FUNCTIONS, in double. The CPU and CUDA ops read
// the same table; angles, cos and sin are computed in double on both.
#pragma once

#include <vector>

#include "configs/loom.pb.h"
#include "runtime/cuda_runtime.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct RopeTable {
  std::vector<double> inv_freq;  // [D/2], radians per position
  double attention_factor = 1;   // on cos and sin (YaRN's attention temperature)

  // inv_freq[i] = theta^(−2i/D).
  static RopeTable Plain(double theta, int64_t head_dim);
  // model.rope_theta with model.rope_scaling (the formulas are in
  // configs/loom.proto above RopeScaling). Errors name the field.
  static absl::StatusOr<RopeTable> FromConfig(double theta, const config::RopeScaling& scaling, int64_t head_dim);
};

// Dispatch on the device of x: ops/cpu/rope.cc or ops/cuda/rope.cu.
void RopeForward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& y,
                 CudaStream stream = nullptr);
void RopeBackward(const Tensor& dy, const Tensor& positions, const RopeTable& table, Tensor& dx,
                  CudaStream stream = nullptr);
// The attention's projections packed in one row, qkv [T, Hq + 2·Hk, D]
// (ops/stacked_linear.h), into q = RoPE(heads [0, Hq)) [T, Hq, D],
// k = RoPE(heads [Hq, Hq + Hk)) [T, Hk, D] and v = heads [Hq + Hk, Hq + 2·Hk)
// copied [T, Hk, D]. Backward, its transpose: dqkv = [Rᵀ dq | Rᵀ dk | dv].
void RopeQkvForward(const Tensor& qkv, const Tensor& positions, const RopeTable& table, Tensor& q, Tensor& k,
                    Tensor& v, CudaStream stream = nullptr);
void RopeQkvBackward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& positions,
                     const RopeTable& table, Tensor& dqkv, CudaStream stream = nullptr);
// Plain RoPE with base theta (RopeTable::Plain).
void RopeForward(const Tensor& x, const Tensor& positions, double theta, Tensor& y);
void RopeBackward(const Tensor& dy, const Tensor& positions, double theta, Tensor& dx);

namespace cuda {
// f32 or bf16 CUDA activations, positions i32 on the same device. D/2 ≤
// kMaxPairs: the table travels by value in the kernel's arguments.
inline constexpr int kRopeMaxPairs = 256;
void RopeForward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& y, CudaStream stream);
void RopeBackward(const Tensor& dy, const Tensor& positions, const RopeTable& table, Tensor& dx, CudaStream stream);
void RopeQkvForward(const Tensor& qkv, const Tensor& positions, const RopeTable& table, Tensor& q, Tensor& k,
                    Tensor& v, CudaStream stream);
void RopeQkvBackward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& positions,
                     const RopeTable& table, Tensor& dqkv, CudaStream stream);
}  // namespace cuda

}  // namespace loom::ops
