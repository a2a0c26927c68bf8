// CUDA RoPE, f32 or bf16 activations (see ops/rope.h). One thread a
// (token, kV consecutive pairs, up to kHeadsPerThread heads): it computes
// the angles pos · inv_freq[i] and their cos and sin in double, as the CPU
// op does, then rotates those pairs of each of its heads:
//   forward   y[i] = a(x[i] c − x[i+D/2] s),  y[i+D/2] = a(x[i+D/2] c + x[i] s)
//   backward  the same with −s.
// One kernel serves all four ops: a row of the packed [T, H, D] tensor is
// the heads of up to three parts side by side (RoPE: one part, the output;
// the packed q, k, v: three, v copied), read from it or, for the packed
// backward, written into it.
// kV = 4 (8- or 16-byte loads) where D/2 is a multiple of 4 and the tensors
// are aligned, else 1; a thread per (token, pair) looping over all 32 heads
// with 2-byte loads ran the model's q at 1.7 TB/s on the H100.
// The inv_freq table travels by value in the kernel arguments (≤ 2 KiB), so
// a launch needs no device copy of it and stays stream-ordered. Each pair is
// read whole before it is written, so y may alias x.
#include <type_traits>
#include <vector>

#include "ops/cuda/elementwise.cuh"
#include "ops/rope.h"

namespace loom::ops::cuda {
namespace {

struct Frequencies {
  double inv_freq[kRopeMaxPairs];
};

constexpr int kHeadsPerThread = 8;

// kV elements of T moved as one load or store.
template <typename T, int kV>
struct alignas(sizeof(T) * kV) Pack {
  T v[kV];
};

// The parts of a packed row: heads [start[p], start[p + 1]) are part p's,
// at base[p]; parts below `rotated` are rotated, the rest copied.
template <typename T>
struct Parts {
  T* base[3];
  int start[4];
  int count, rotated;
};

// kPack: parts → packed, else packed → parts.
template <typename T, int kV, bool kPack>
__global__ void RotateKernel(T* packed, Parts<T> parts, const int32_t* pos, Frequencies f, double factor,
                             double sign, int64_t tokens, int half) {
  const int heads = parts.start[parts.count];
  const int groups = half / kV, head_blocks = (heads + kHeadsPerThread - 1) / kHeadsPerThread;
  const int64_t work = tokens * groups * head_blocks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < work; w += stride) {
    const int i0 = static_cast<int>(w % groups) * kV;  // pairs fastest: a warp's loads are consecutive
    const int64_t rest = w / groups;
    const int h0 = static_cast<int>(rest % head_blocks) * kHeadsPerThread;
    const int64_t t = rest / head_blocks;
    double c[kV], s[kV];
#pragma unroll
    for (int v = 0; v < kV; ++v) {
      sincos(static_cast<double>(pos[t]) * f.inv_freq[i0 + v], &s[v], &c[v]);
      c[v] *= factor;
      s[v] *= factor * sign;
    }
    const int h1 = min(h0 + kHeadsPerThread, heads);
    int p = 0;
#pragma unroll 4
    for (int h = h0; h < h1; ++h) {
      while (parts.start[p + 1] <= h) ++p;
      const int part_heads = parts.start[p + 1] - parts.start[p];
      T* in = packed + (t * heads + h) * (2 * half) + i0;
      T* out = parts.base[p] + (t * part_heads + h - parts.start[p]) * (2 * half) + i0;
      if (kPack) {
        T* tmp = in;
        in = out;
        out = tmp;
      }
      const Pack<T, kV> a = *reinterpret_cast<const Pack<T, kV>*>(in);
      const Pack<T, kV> b = *reinterpret_cast<const Pack<T, kV>*>(in + half);
      if (p < parts.rotated) {
        Pack<T, kV> ya, yb;
#pragma unroll
        for (int v = 0; v < kV; ++v) {
          const double x0 = ToF32(a.v[v]), x1 = ToF32(b.v[v]);
          ya.v[v] = FromF32<T>(static_cast<float>(x0 * c[v] - x1 * s[v]));
          yb.v[v] = FromF32<T>(static_cast<float>(x1 * c[v] + x0 * s[v]));
        }
        *reinterpret_cast<Pack<T, kV>*>(out) = ya;
        *reinterpret_cast<Pack<T, kV>*>(out + half) = yb;
      } else {
        *reinterpret_cast<Pack<T, kV>*>(out) = a;
        *reinterpret_cast<Pack<T, kV>*>(out + half) = b;
      }
    }
  }
}

// Checks `packed` against `parts` (each [T, h_i, D], heads adding up to
// packed's), then one RotateKernel.
void Rotate(const char* name, const Tensor& packed, const std::vector<const Tensor*>& parts, int rotated, bool pack,
            const Tensor& positions, const RopeTable& table, double sign, CudaStream stream) {
  NvtxRange range(name);
  LOOM_CHECK(packed.ndim() == 3 && packed.dim(2) % 2 == 0, "[rope] CUDA: input must be [T, H, D] with D even, got ",
             ShapeString(packed.shape()));
  const int64_t tokens = packed.dim(0), half = packed.dim(2) / 2;
  LOOM_CHECK(!parts.empty() && parts.size() <= 3, "[rope] CUDA: ", parts.size(), " parts (1 to 3)");
  int heads = 0;
  for (const Tensor* part : parts) {
    LOOM_CHECK(part->defined() && part->device() == packed.device() && part->dtype() == packed.dtype() &&
                   part->ndim() == 3 && part->dim(0) == tokens && part->dim(2) == packed.dim(2),
               "[rope] CUDA: ", ShapeString(part->shape()), " ", DTypeName(part->dtype()), " on ",
               part->device().ToString(), " does not match ", ShapeString(packed.shape()), " ",
               DTypeName(packed.dtype()), " on ", packed.device().ToString());
    heads += static_cast<int>(part->dim(1));
  }
  LOOM_CHECK(heads == packed.dim(1), "[rope] the parts' ", heads, " heads are not the packed row's ", packed.dim(1));
  LOOM_CHECK(static_cast<int64_t>(table.inv_freq.size()) == half, "[rope] the table has ", table.inv_freq.size(),
             " frequencies for head dim ", packed.dim(2));
  LOOM_CHECK(half <= kRopeMaxPairs, "[rope] CUDA: head dim ", packed.dim(2), " above ", 2 * kRopeMaxPairs);
  LOOM_CHECK(positions.dtype() == DType::kI32 && positions.numel() == tokens &&
                 positions.device() == packed.device(),
             "[rope] positions ", ShapeString(positions.shape()), " ", DTypeName(positions.dtype()), " on ",
             positions.device().ToString(), " must be [", tokens, "] i32 on ", packed.device().ToString());
  if (packed.numel() == 0) return;
  Frequencies f{};
  for (int64_t i = 0; i < half; ++i) f.inv_freq[i] = table.inv_freq[i];
  LOOM_CUDA_CHECK(cudaSetDevice(packed.device().index));
  const int64_t head_blocks = (heads + kHeadsPerThread - 1) / kHeadsPerThread;
  LOOM_DISPATCH_ACTIVATION("rope", packed.dtype(), T, [&] {
    constexpr int kV = 4;
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (kV * sizeof(T)) == 0; };
    bool vector = half % kV == 0 && aligned(packed.raw());
    Parts<T> to{};
    to.count = static_cast<int>(parts.size());
    to.rotated = rotated;
    for (int p = 0; p < to.count; ++p) {
      to.base[p] = static_cast<T*>(parts[p]->raw());
      to.start[p + 1] = to.start[p] + static_cast<int>(parts[p]->dim(1));
      vector = vector && aligned(to.base[p]);
    }
    // kv: std::integral_constant<int, pairs a thread>.
    const auto launch = [&](auto kv) {
      constexpr int v = decltype(kv)::value;
      const auto kernel = pack ? RotateKernel<T, v, true> : RotateKernel<T, v, false>;
      kernel<<<GridFor(tokens * (half / v) * head_blocks), 256, 0, Native(stream)>>>(
          static_cast<T*>(packed.raw()), to, positions.data<int32_t>(), f, table.attention_factor, sign, tokens,
          static_cast<int>(half));
    };
    if (vector) {
      launch(std::integral_constant<int, kV>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void RopeForward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& y, CudaStream stream) {
  Rotate("RopeForward", x, {&y}, 1, /*pack=*/false, positions, table, +1.0, stream);
}

void RopeBackward(const Tensor& dy, const Tensor& positions, const RopeTable& table, Tensor& dx, CudaStream stream) {
  Rotate("RopeBackward", dy, {&dx}, 1, /*pack=*/false, positions, table, -1.0, stream);
}

void RopeQkvForward(const Tensor& qkv, const Tensor& positions, const RopeTable& table, Tensor& q, Tensor& k,
                    Tensor& v, CudaStream stream) {
  Rotate("RopeQkvForward", qkv, {&q, &k, &v}, 2, /*pack=*/false, positions, table, +1.0, stream);
}

void RopeQkvBackward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& positions,
                     const RopeTable& table, Tensor& dqkv, CudaStream stream) {
  Rotate("RopeQkvBackward", dqkv, {&dq, &dk, &dv}, 2, /*pack=*/true, positions, table, -1.0, stream);
}

}  // namespace loom::ops::cuda
