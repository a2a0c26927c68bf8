// CUDA RoPE, f32 or bf16 activations (see ops/rope.h). One thread a
// (token, pair i): it computes the angle pos · inv_freq[i] and its cos and
// sin in double, as the CPU op does, then rotates pair i of every head of
// the token:
//   forward   y[i] = a(x[i] c − x[i+D/2] s),  y[i+D/2] = a(x[i+D/2] c + x[i] s)
//   backward  the same with −s.
// The inv_freq table travels by value in the kernel arguments (≤ 2 KiB), so
// a launch needs no device copy of it and stays stream-ordered. Each pair is
// read whole before it is written, so y may alias x.
#include "ops/cuda/elementwise.cuh"
#include "ops/rope.h"

namespace loom::ops::cuda {
namespace {

struct Frequencies {
  double inv_freq[kRopeMaxPairs];
};

template <typename T>
__global__ void RotateKernel(const T* in, const int32_t* pos, Frequencies f, double factor, double sign,
                             int64_t tokens, int heads, int half, T* out) {
  const int64_t work = tokens * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < work; w += stride) {
    const int64_t t = w / half;
    const int i = static_cast<int>(w % half);
    double s, c;
    sincos(static_cast<double>(pos[t]) * f.inv_freq[i], &s, &c);
    c *= factor;
    s *= factor * sign;
    for (int h = 0; h < heads; ++h) {
      const int64_t at = (t * heads + h) * (2 * half) + i;
      const double x0 = ToF32(in[at]), x1 = ToF32(in[at + half]);
      out[at] = FromF32<T>(static_cast<float>(x0 * c - x1 * s));
      out[at + half] = FromF32<T>(static_cast<float>(x1 * c + x0 * s));
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
  LOOM_DISPATCH_ACTIVATION("rope", in.dtype(), T, [&] {
    RotateKernel<T><<<GridFor(tokens * half), 256, 0, Native(stream)>>>(
        static_cast<const T*>(in.raw()), positions.data<int32_t>(), f, table.attention_factor, sign, tokens,
        static_cast<int>(in.dim(1)), static_cast<int>(half), static_cast<T*>(out.raw()));
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
