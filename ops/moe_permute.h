// MoE permutation: the routed assignments grouped by expert, and back.
//
// Assignment (t, j) (token t's j-th chosen expert, experts [T, k]) has id
// t·k + j. Expert e takes its assignments in increasing id order (= token
// order, model/moe.h) and keeps the first kept[e] of them (capacity drops
// cut the tail); the kept ones, expert after expert, are the S rows of the
// permuted buffer:
//   rows [T, k]  i32  row of assignment (t, j), −1 when dropped
//
//   gather    xe[rows_tj] = x[t]  for every kept (t, j)               [S, C]
//   combine   y[t] = Σ_j ye[rows_tj]  (+ add[t])  (+ a[t] · w)        [T, C]
//             over j = 0..k−1 in order, skipping dropped assignments;
//             a [T, n] · w [n, C] a thin product (n = E: the router's
//             input gradient dlogits · W_router, model/moe.cc), summed
//             over n in order after the rest.
// Each is the other's backward. The routing gates are not applied here: an
// expert scales its own rows (model/moe.cc). Viewed as [T·k, 1] (k = 1),
// rows also moves one value an assignment: the gather puts gates [T·k, 1]
// in row order, the combine brings [S, 1] back (0 where dropped).
// Every output is written (no pre-zeroing; the gather writes the S rows),
// each element by one thread in a fixed order: no float atomics, the same
// bits on every run.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/cuda_runtime.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct MoePermutation {
  Tensor rows;                  // [T, k] i32
  std::vector<int64_t> counts;  // [E] rows per expert (= kept), on the host; S = Σ counts
  int64_t size() const;         // S
};

// experts [T, k] i32 (values in [0, E)); kept [E]: rows expert e keeps, at
// most its assignments (the caller knows the loads: MoeRouting::load).
void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out);
// x [T, C], rows [T, k] → xe [S, C] written.
void MoeGather(const Tensor& x, const Tensor& rows, Tensor& xe);
// ye [S, C], rows [T, k], add [T, C] or null, a [T, n] and w [n, C] both or
// neither → y [T, C] written.
void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* add, Tensor& y, const Tensor* a = nullptr,
                const Tensor* w = nullptr);

namespace cuda {
// CUDA tensors (ops/cuda/moe_permute.cu): x, xe, ye, y, add, a, w f32 or
// bf16 (one dtype), rows i32; sums in f32. MoePermuteIndex copies only `kept`
// ([E]) to the device; nothing comes back.
void MoePermuteIndex(const Tensor& experts, const std::vector<int64_t>& kept, MoePermutation& out,
                     CudaStream stream = nullptr);
void MoeGather(const Tensor& x, const Tensor& rows, Tensor& xe, CudaStream stream = nullptr);
void MoeCombine(const Tensor& ye, const Tensor& rows, const Tensor* add, Tensor& y, const Tensor* a = nullptr,
                const Tensor* w = nullptr, CudaStream stream = nullptr);
}  // namespace cuda

}  // namespace loom::ops
