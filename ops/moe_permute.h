// MoE permutation: the routed assignments grouped by expert, and back.
//
// Assignment (t, j) (token t's j-th chosen expert, experts [T, k]) has id
// t·k + j. Expert e takes its assignments in increasing id order (= token
// order, model/moe.h) and keeps the first kept[e] of them (capacity drops
// cut the tail); the kept ones, expert after expert, are the S rows of the
// permuted buffer:
//   rows [T, k]  i32  row of assignment (t, j), −1 when dropped
//   ids  [S]     i32  assignment id of each row (expert-major, then token order)
//
//   gather    xe[r] = x[ids[r] / k]                                   [S, C]
//   combine   y[t]  = Σ_j g_tj · ye[rows_tj]  (+ add[t])              [T, C]
//             over j = 0..k−1 in order, skipping dropped assignments;
//             no gates: weight 1 (the gather's backward: dx[t] = Σ_j dxe[rows_tj])
//   combine backward, for every kept assignment (t, j), r = rows_tj:
//             dye[r] = g_tj · dy[t]      dg_tj = dy[t] · ye[r]   (0 when dropped)
// Every output is written (no pre-zeroing), each element by one thread in a
// fixed order: no float atomics, the same bits on every run.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct MoePermutation {
  Tensor rows;                  // [T, k] i32
  Tensor ids;                   // [S] i32 (S = Σ kept)
  std::vector<int64_t> counts;  // [E] rows per expert (= kept), on the host
};

// experts [T, k] i32 (values in [0, E)); kept [E]: rows expert e keeps, at
// most its assignments (the caller knows the loads: MoeRouting::load).
void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out);
// x [T, C], ids [S], k → xe [S, C] written.
void MoeGather(const Tensor& x, const Tensor& ids, int k, Tensor& xe);
// ye [S, C], rows [T, k], gates [T, k] or null, add [T, C] or null → y [T, C] written.
void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* gates, const Tensor* add, Tensor& y);
// dy [T, C], ye [S, C], rows, gates [T, k] → dye [S, C], dgates [T, k] written.
void MoeCombineBackward(const Tensor& dy, const Tensor& ye, const Tensor& rows, const Tensor& gates, Tensor& dye,
                        Tensor& dgates);

namespace cuda {
// CUDA tensors (ops/cuda/moe_permute.cu): x, xe, ye, y, add, dy, dye f32 or
// bf16 (one dtype), gates and dgates f32 (the GPU router's), rows and ids
// i32; sums and dots in f32. MoePermuteIndex copies only `kept` ([E]) to
// the device; nothing comes back.
void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out,
                     CudaStream stream = nullptr);
void MoeGather(const Tensor& x, const Tensor& ids, int k, Tensor& xe, CudaStream stream = nullptr);
void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* gates, const Tensor* add, Tensor& y,
                CudaStream stream = nullptr);
void MoeCombineBackward(const Tensor& dy, const Tensor& ye, const Tensor& rows, const Tensor& gates, Tensor& dye,
                        Tensor& dgates, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
