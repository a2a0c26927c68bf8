// CUDA RoPE, f32 or bf16 activations (see ops/rope.h). One thread a
// (token, kV consecutive pairs, up to kHeadsPerThread heads): it computes
// the angles pos · inv_freq[i] and their cos and sin in double, as the CPU
// op does, then rotates those pairs of each of its heads:
//   forward   y[i] = a(x[i] c − x[i+D/2] s),  y[i+D/2] = a(x[i+D/2] c + x[i] s)
//   backward  the same with −s.
// kV = 4 (8- or 16-byte loads) where D/2 is a multiple of 4 and the tensors
// are aligned, else 1; a thread per (token, pair) looping over all 32 heads
// with 2-byte loads ran the model's q at 1.7 TB/s on the H100.
// The inv_freq table travels by value in the kernel arguments (≤ 2 KiB), so
// a launch needs no device copy of it and stays stream-ordered. Each pair is
// read whole before it is written, so y may alias x.
#include <type_traits>

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

template <typename T, int kV>
__global__ void RotateKernel(const T* in, const int32_t* pos, Frequencies f, double factor, double sign,
                             int64_t tokens, int heads, int half, T* out) {
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
#pragma unroll 4
    for (int h = h0; h < h1; ++h) {
      const int64_t at = (t * heads + h) * (2 * half) + i0;
      const Pack<T, kV> a = *reinterpret_cast<const Pack<T, kV>*>(in + at);
      const Pack<T, kV> b = *reinterpret_cast<const Pack<T, kV>*>(in + at + half);
      Pack<T, kV> ya, yb;
#pragma unroll
      for (int v = 0; v < kV; ++v) {
        const double x0 = ToF32(a.v[v]), x1 = ToF32(b.v[v]);
        ya.v[v] = FromF32<T>(static_cast<float>(x0 * c[v] - x1 * s[v]));
        yb.v[v] = FromF32<T>(static_cast<float>(x1 * c[v] + x0 * s[v]));
      }
      *reinterpret_cast<Pack<T, kV>*>(out + at) = ya;
      *reinterpret_cast<Pack<T, kV>*>(out + at + half) = yb;
    }
  }
}

void Rotate(const char* name, const Tensor& in, const Tensor& positions, const RopeTable& table, double sign,
            Tensor& out, CudaStream stream) {
  NvtxRange range(name);
  CheckLike("rope", out, in, "out", "in");
  LOOM_CHECK(in.ndim() == 3 && in.dim(2) % 2 == 0, "[rope] CUDA: input must be [T, H, D] with D even, got ",
             ShapeString(in.shape()));
  const int64_t tokens = in.dim(0), half = in.dim(2) / 2;
  LOOM_CHECK(static_cast<int64_t>(table.inv_freq.size()) == half, "[rope] the table has ", table.inv_freq.size(),
             " frequencies for head dim ", in.dim(2));
  LOOM_CHECK(half <= kRopeMaxPairs, "[rope] CUDA: head dim ", in.dim(2), " above ", 2 * kRopeMaxPairs);
  LOOM_CHECK(positions.dtype() == DType::kI32 && positions.numel() == tokens && positions.device() == in.device(),
             "[rope] positions ", ShapeString(positions.shape()), " ", DTypeName(positions.dtype()), " on ",
             positions.device().ToString(), " must be [", tokens, "] i32 on ", in.device().ToString());
  if (in.numel() == 0) return;
  Frequencies f{};
  for (int64_t i = 0; i < half; ++i) f.inv_freq[i] = table.inv_freq[i];
  LOOM_CUDA_CHECK(cudaSetDevice(in.device().index));
  const int heads = static_cast<int>(in.dim(1));
  const int64_t head_blocks = (heads + kHeadsPerThread - 1) / kHeadsPerThread;
  LOOM_DISPATCH_ACTIVATION("rope", in.dtype(), T, [&] {
    const auto* src = static_cast<const T*>(in.raw());
    auto* dst = static_cast<T*>(out.raw());
    // kv: std::integral_constant<int, pairs a thread>.
    const auto launch = [&](auto kv) {
      constexpr int v = decltype(kv)::value;
      RotateKernel<T, v><<<GridFor(tokens * (half / v) * head_blocks), 256, 0, Native(stream)>>>(
          src, positions.data<int32_t>(), f, table.attention_factor, sign, tokens, heads, static_cast<int>(half), dst);
    };
    constexpr int kV = 4;
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (kV * sizeof(T)) == 0; };
    if (half % kV == 0 && aligned(src) && aligned(dst)) {
      launch(std::integral_constant<int, kV>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void RopeForward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& y, CudaStream stream) {
  Rotate("RopeForward", x, positions, table, +1.0, y, stream);
}

void RopeBackward(const Tensor& dy, const Tensor& positions, const RopeTable& table, Tensor& dx, CudaStream stream) {
  Rotate("RopeBackward", dy, positions, table, -1.0, dx, stream);
}

}  // namespace loom::ops::cuda
