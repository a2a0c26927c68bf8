// What the GPU benchmarks share: the median time of a call measured with
// CUDA events on the default stream (after untimed warm-up calls: plans,
// pools, module loads), random inputs, and a normwise bf16 difference for
// the untimed correctness column.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/cuda_check.h"
#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace loom::bench {

// Seconds of one call of fn, between two events on the default stream.
template <typename Fn>
double TimeOnce(cudaEvent_t start, cudaEvent_t stop, Fn&& fn) {
  LOOM_CUDA_CHECK(cudaEventRecord(start));
  fn();
  LOOM_CUDA_CHECK(cudaEventRecord(stop));
  LOOM_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  LOOM_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  return ms * 1e-3;
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename Fn>
double MedianSeconds(int steps, Fn&& fn, int warmups = 1) {
  cudaEvent_t start, stop;
  LOOM_CUDA_CHECK(cudaEventCreate(&start));
  LOOM_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmups; ++i) fn();
  std::vector<double> times;
  for (int i = 0; i < steps; ++i) times.push_back(TimeOnce(start, stop, fn));
  LOOM_CUDA_CHECK(cudaEventDestroy(start));
  LOOM_CUDA_CHECK(cudaEventDestroy(stop));
  return Median(times);
}

// Two calls timed alternately (a, b, a, b, ...), so that clock and thermal
// drift over the run falls on both alike: the median of each, and the median
// of the per-pair ratios b / a.
struct PairedSeconds {
  double a, b, b_over_a;
};
template <typename FnA, typename FnB>
PairedSeconds MedianSecondsPaired(int steps, FnA&& fa, FnB&& fb, int warmups = 1) {
  cudaEvent_t start, stop;
  LOOM_CUDA_CHECK(cudaEventCreate(&start));
  LOOM_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmups; ++i) fa(), fb();
  std::vector<double> ta, tb, ratio;
  for (int i = 0; i < steps; ++i) {
    ta.push_back(TimeOnce(start, stop, fa));
    tb.push_back(TimeOnce(start, stop, fb));
    ratio.push_back(tb.back() / ta.back());
  }
  LOOM_CUDA_CHECK(cudaEventDestroy(start));
  LOOM_CUDA_CHECK(cudaEventDestroy(stop));
  return {Median(ta), Median(tb), Median(ratio)};
}

// A CUDA tensor (bf16 or f32) of values uniform in [−scale, scale), element
// i from a counter hash (splitmix64) of (seed, i): the same values every run.
inline Tensor Uniform(const Shape& shape, DType dtype, uint64_t seed, float scale = 1) {
  Tensor host = Tensor::Empty(shape, dtype);
  const int64_t n = host.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (seed << 40) + static_cast<uint64_t>(i) + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = scale * static_cast<float>(static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0);
    if (dtype == DType::kBF16)
      host.data<bf16>()[i] = FloatToBf16(u);
    else
      host.data<float>()[i] = u;
  }
  return host.To(Device::Cuda(0));
}

// ‖a − b‖ / ‖b‖ of two bf16 tensors (any device), on every 7th element: a
// strided sample keeps the host pass short.
inline double RelativeDiffBf16(const Tensor& a, const Tensor& b) {
  const Tensor ha = a.To(Device::Cpu()), hb = b.To(Device::Cpu());
  double num = 0, den = 0;
  for (int64_t i = 0; i < ha.numel(); i += 7) {
    const double x = Bf16ToFloat(ha.data<bf16>()[i]), y = Bf16ToFloat(hb.data<bf16>()[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace loom::bench
