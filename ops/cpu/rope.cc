// CPU RoPE (see ops/rope.h). Forward rotates each pair (x[i], x[i+D/2]) by
// +angle, backward by −angle; angles and products are computed in double.
#include "ops/rope.h"

#include <cmath>
#include <vector>

namespace loom::ops {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

// out = R(sign · angle) in over [T, H, D]; out may alias in, since each pair
// is read whole before it is written.
template <typename T>
void RotatePairs(const T* in, const int32_t* pos, const std::vector<double>& inv_freq, double sign, int64_t t_len,
                 int64_t heads, int64_t d, T* out) {
  const int64_t half = d / 2;
#pragma omp parallel for if (t_len * heads * d >= kParallelMinElements)
  for (int64_t t = 0; t < t_len; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = pos[t] * inv_freq[i];
      const double c = std::cos(angle), s = sign * std::sin(angle);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t at = (t * heads + h) * d + i;
        const double a = in[at], b = in[at + half];
        out[at] = static_cast<T>(a * c - b * s);
        out[at + half] = static_cast<T>(b * c + a * s);
      }
    }
  }
}

void Rotate(const Tensor& in, const Tensor& positions, double theta, double sign, Tensor& out, const char* in_name,
            const char* out_name) {
  LOOM_CHECK(in.device().is_cpu() && positions.device().is_cpu() && out.device().is_cpu(),
             "[rope] CPU tensors only");
  LOOM_CHECK(in.ndim() == 3, "[rope] ", in_name, " must be [T, H, D], got ", ShapeString(in.shape()));
  LOOM_CHECK(out.shape() == in.shape() && out.dtype() == in.dtype(), "[rope] ", out_name, " ",
             ShapeString(out.shape()), " ", DTypeName(out.dtype()), " must match ", in_name, " ",
             ShapeString(in.shape()), " ", DTypeName(in.dtype()));
  LOOM_CHECK(in.dim(2) % 2 == 0, "[rope] head dim ", in.dim(2), " must be even");
  LOOM_CHECK(positions.dtype() == DType::kI32 && positions.numel() == in.dim(0), "[rope] positions ",
             ShapeString(positions.shape()), " ", DTypeName(positions.dtype()), " must be [", in.dim(0), "] i32");
  const int64_t d = in.dim(2);
  std::vector<double> inv_freq(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / d);
  LOOM_DISPATCH_FLOAT(in.dtype(), T, [&] {
    RotatePairs(in.data<T>(), positions.data<int32_t>(), inv_freq, sign, in.dim(0), in.dim(1), d, out.data<T>());
  });
}

}  // namespace

void RopeForward(const Tensor& x, const Tensor& positions, double theta, Tensor& y) {
  Rotate(x, positions, theta, +1.0, y, "x", "y");
}

void RopeBackward(const Tensor& dy, const Tensor& positions, double theta, Tensor& dx) {
  Rotate(dy, positions, theta, -1.0, dx, "dy", "dx");
}

}  // namespace loom::ops
