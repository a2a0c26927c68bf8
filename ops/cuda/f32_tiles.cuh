// Register tiles the f32 attention kernels share (softmax_attention_f32.cu,
// lightning_attention_f32.cu): 256 threads as a 16 × 16 grid, each holding a
// 4 × 4 block of a 64 × 64 tile; shared-memory rows padded to D + 1 floats
// (no bank conflicts on the column walk). Plain f32 FMA: the fp32 runs must
// not go through TF32.
#pragma once

namespace loom::ops::cuda {

// acc[a][b] = Σ_d x[(ty + 16a)][d] · y[(tx + 16b)][d] over padded tiles.
template <int D>
__device__ __forceinline__ void RowDots(const float* x, const float* y, int ty, int tx, float (&acc)[4][4]) {
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
#pragma unroll 8
  for (int d = 0; d < D; ++d) {
    float xa[4], yb[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) xa[a] = x[(ty + 16 * a) * (D + 1) + d];
#pragma unroll
    for (int b = 0; b < 4; ++b) yb[b] = y[(tx + 16 * b) * (D + 1) + d];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(xa[a], yb[b], acc[a][b]);
  }
}

}  // namespace loom::ops::cuda
