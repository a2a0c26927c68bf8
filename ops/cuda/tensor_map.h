// TMA tensor maps (host side) for the tiles of Loom's Hopper kernels.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace loom::ops::cuda {

// A map over a token-major bf16 tensor [tokens, heads, d] (d a multiple of
// 64, rows d·2 bytes, tokens heads·d·2 bytes apart) whose box is `rows`
// tokens by 64 columns of one head: TmaLoad3d(dst, &map, column, head, token,
// bar) (ops/cuda/sm90.cuh) writes it as one 128-byte swizzled panel, the
// layout wgmma's descriptors read there. Tokens past the tensor's end read as
// zeros. Aborts on a base not 16-byte aligned (the hardware's rule).
CUtensorMap Bf16TokenPanelMap(const void* base, int64_t tokens, int64_t heads, int64_t d, int rows);

// The same over an f32 tensor [tokens, heads, d]: a box is `rows` tokens by
// 32 columns (128 bytes a row, swizzled alike), as TmaReduceAdd3d reads it.
CUtensorMap F32TokenPanelMap(const void* base, int64_t tokens, int64_t heads, int64_t d, int rows);

}  // namespace loom::ops::cuda
