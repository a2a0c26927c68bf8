// loom-bench --what=gemm [--steps N] [--json]
// The cuBLASLt GEMMs of Loom's linear layers and the fused linear +
// cross-entropy, on the first GPU, bf16:
//   linear  x [65536, 2048] · W [5632, 2048]ᵀ (an MLP up-projection of a
//           64K-token batch): forward 2·N·in·out FLOPs, backward twice that
//           (dx = dy·W, dW += dyᵀ·x into f32). Baseline in the same run: the
//           same forward through classic cuBLAS (cublasGemmEx, f32 compute).
//   cross-entropy  8192 tokens × vocab 32,000 × hidden 2048, loss + dh + dW
//           (3 GEMMs: 6·N·V·D FLOPs) and loss only; its peak extra device
//           memory from the default pool's high-water mark (0 if tensors do
//           not come from the pool) and cudaMemGetInfo around a first call.
//   swiglu pair backward  (ops/grouped_linear.h, one group) with the two
//           f32 weight gradients adjacent (one dW GEMM) and apart (two).
// Times are CUDA-event medians of --steps runs after one warm-up. A separate
// untimed pass prints ‖y_loom − y_cublas‖ / ‖y_cublas‖ in the row.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "bench/cuda/timing.h"
#include "ops/cross_entropy.h"
#include "ops/grouped_linear.h"
#include "ops/linear.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"

namespace loom {
namespace {

using bench::MedianSeconds;
using bench::RelativeDiffBf16;

int BenchGemm(const config::Config&) {
  if (CudaDeviceCount() == 0) {
    std::printf("gemm: skipped: no GPU\n");
    return 0;
  }
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const bool json = absl::GetFlag(FLAGS_json);
  constexpr double kTera = 1e-12, kMiB = 1.0 / (1 << 20);

  {  // linear
    const int64_t n = 65536, in = 2048, out = 5632;
    const Tensor x = bench::Uniform({n, in}, DType::kBF16, 1, 1.0f), w = bench::Uniform({out, in}, DType::kBF16, 2, 0.05f),
                 dy = bench::Uniform({n, out}, DType::kBF16, 3, 1.0f);
    Tensor y = Tensor::Empty({n, out}, DType::kBF16, Device::Cuda(0));
    Tensor y_ref = Tensor::Empty({n, out}, DType::kBF16, Device::Cuda(0));
    Tensor dx = Tensor::Empty({n, in}, DType::kBF16, Device::Cuda(0));
    Tensor dw = Tensor::Zeros({out, in}, DType::kF32, Device::Cuda(0));
    const double fwd_flops = 2.0 * n * in * out;
    const double fwd = MedianSeconds(steps, [&] { ops::cuda::LinearForward(x, w, y); });
    const double bwd = MedianSeconds(steps, [&] { ops::cuda::LinearBackward(x, w, dy, &dx, dw, false); });
    // Baseline: y = x·Wᵀ as cublasGemmEx (column-major yᵀ = W·xᵀ).
    cublasHandle_t handle;
    if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "gemm: cublasCreate failed\n");
      return 1;
    }
    const float one = 1, zero = 0;
    auto cublas_fwd = [&] {
      const cublasStatus_t st =
          cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, w.raw(), CUDA_R_16BF, in, x.raw(),
                       CUDA_R_16BF, in, &zero, y_ref.raw(), CUDA_R_16BF, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      LOOM_CHECK(st == CUBLAS_STATUS_SUCCESS, "gemm: cublasGemmEx failed: ", static_cast<int>(st));
    };
    const double base = MedianSeconds(steps, cublas_fwd);
    cublasDestroy(handle);
    ops::cuda::LinearForward(x, w, y);
    LOOM_CUDA_CHECK(cudaDeviceSynchronize());
    const double diff = RelativeDiffBf16(y, y_ref);
    if (json) {
      std::printf(
          "{\"what\": \"gemm\", \"case\": \"linear_bf16\", \"n\": %ld, \"in\": %ld, \"out\": %ld, "
          "\"fwd_tflops\": %.1f, \"bwd_tflops\": %.1f, \"fwd_cublas_tflops\": %.1f, \"y_rel_diff\": %.2e}\n",
          static_cast<long>(n), static_cast<long>(in), static_cast<long>(out), fwd_flops / fwd * kTera,
          2 * fwd_flops / bwd * kTera, fwd_flops / base * kTera, diff);
    } else {
      std::printf("linear bf16 [%ld, %ld] x [%ld, %ld]^T: fwd %.3f ms %.1f TFLOP/s | bwd (dx + dW f32) %.3f ms %.1f "
                  "TFLOP/s | cublasGemmEx fwd %.3f ms %.1f TFLOP/s (ratio loom/cublas %.2f) | y diff %.2e\n",
                  static_cast<long>(n), static_cast<long>(in), static_cast<long>(out), static_cast<long>(in),
                  fwd * 1e3, fwd_flops / fwd * kTera, bwd * 1e3, 2 * fwd_flops / bwd * kTera, base * 1e3,
                  fwd_flops / base * kTera, base / fwd, diff);
    }
    std::fflush(stdout);
  }

  // The SwiGLU pair backward (ops/grouped_linear.h, one group): dx = dgu ·
  // [W_gate; W_up] and the two weight gradients, with dW_up right after
  // dW_gate in memory (one GEMM of 2F rows, as DataParallel lays the
  // gradients out) and apart (two GEMMs), for the MLP shapes of the 1B
  // model (8K tokens), loom-bench --what=moe's dense layer and its experts.
  for (const auto& [n, out] : std::vector<std::pair<int64_t, int64_t>>{{8192, 5632}, {65536, 4224}, {16384, 1408},
                                                                      {65536, 1408}}) {
    const int64_t in = 2048;
    const Tensor x = bench::Uniform({n, in}, DType::kBF16, 7, 1.0f),
                 w = bench::Uniform({2 * out, in}, DType::kBF16, 8, 0.05f),
                 dgu = bench::Uniform({n, 2 * out}, DType::kBF16, 9, 1.0f);
    const Tensor wa = w.Slice(0, out), wb = w.Slice(out, out);
    Tensor dx = Tensor::Empty({n, in}, DType::kBF16, Device::Cuda(0));
    Tensor dw = Tensor::Zeros({2 * out, in}, DType::kF32, Device::Cuda(0));
    Tensor apart = Tensor::Zeros({3 * out, in}, DType::kF32, Device::Cuda(0));  // F rows between them
    Tensor dwa = dw.Slice(0, out), dwb = dw.Slice(out, out);
    Tensor dwa_apart = apart.Slice(0, out), dwb_apart = apart.Slice(2 * out, out);
    auto run = [&](Tensor& ga, Tensor& gb) {
      ops::cuda::GroupedLinearPairBackward(x, {&wa}, {&wb}, {n}, dgu, dx, {&ga}, {&gb}, false);
    };
    const double adjacent = MedianSeconds(steps, [&] { run(dwa, dwb); });
    const double split = MedianSeconds(steps, [&] { run(dwa_apart, dwb_apart); });
    const double flops = 2.0 * 2.0 * n * in * 2 * out;  // dx and dW, each 2·n·in·2F
    if (json) {
      std::printf(
          "{\"what\": \"gemm\", \"case\": \"swiglu_pair_backward\", \"n\": %ld, \"in\": %ld, \"ffn\": %ld, "
          "\"adjacent_ms\": %.3f, \"apart_ms\": %.3f, \"adjacent_tflops\": %.1f, \"apart_tflops\": %.1f}\n",
          static_cast<long>(n), static_cast<long>(in), static_cast<long>(out), adjacent * 1e3, split * 1e3,
          flops / adjacent * kTera, flops / split * kTera);
    } else {
      std::printf("swiglu pair backward n %ld, in %ld, F %ld: dW adjacent (one GEMM) %.3f ms %.1f TFLOP/s | apart "
                  "(two) %.3f ms %.1f TFLOP/s | apart/adjacent %.3f\n",
                  static_cast<long>(n), static_cast<long>(in), static_cast<long>(out), adjacent * 1e3,
                  flops / adjacent * kTera, split * 1e3, flops / split * kTera, split / adjacent);
    }
    std::fflush(stdout);
  }

  {  // cross-entropy
    const int64_t n = 8192, vocab = 32000, d = 2048;
    const Tensor h = bench::Uniform({n, d}, DType::kBF16, 4, 1.0f), w = bench::Uniform({vocab, d}, DType::kBF16, 5, 0.05f);
    std::vector<int32_t> host_targets(n);
    std::mt19937_64 gen(6);
    for (int32_t& t : host_targets) t = static_cast<int32_t>(gen() % vocab);
    Tensor targets = Tensor::Empty({n}, DType::kI32, Device::Cuda(0));
    LOOM_CUDA_CHECK(cudaMemcpy(targets.raw(), host_targets.data(), n * sizeof(int32_t), cudaMemcpyHostToDevice));
    Tensor dh = Tensor::Empty({n, d}, DType::kBF16, Device::Cuda(0));
    Tensor dw = Tensor::Zeros({vocab, d}, DType::kF32, Device::Cuda(0));
    ops::CrossEntropyOptions options;
    options.normalizer = static_cast<double>(n);
    LOOM_CUDA_CHECK(cudaDeviceSynchronize());
    const int64_t used0 = CudaDeviceUsedBytes(0), pool0 = CudaTensorBytes(0);
    ResetPeakCudaTensorBytes(0);
    ops::CrossEntropyResult r = ops::cuda::CrossEntropy(h, w, targets, options, &dh, &dw, nullptr);
    const int64_t pool_peak = PeakCudaTensorBytes(0) - pool0, used_delta = CudaDeviceUsedBytes(0) - used0;
    const double train = MedianSeconds(steps, [&] { r = ops::cuda::CrossEntropy(h, w, targets, options, &dh, &dw, nullptr); });
    const double eval = MedianSeconds(steps, [&] { ops::cuda::CrossEntropy(h, w, targets, options, nullptr, nullptr, nullptr); });
    const double flops = 6.0 * n * vocab * d;
    const double full_logits_mib = n * vocab * 4.0 * kMiB;
    if (json) {
      std::printf(
          "{\"what\": \"gemm\", \"case\": \"cross_entropy_bf16\", \"n\": %ld, \"vocab\": %ld, \"d\": %ld, "
          "\"train_ms\": %.3f, \"train_tflops\": %.1f, \"eval_ms\": %.3f, \"pool_peak_mib\": %.1f, "
          "\"memgetinfo_delta_mib\": %.1f, \"full_logits_mib\": %.1f, \"loss\": %.6f}\n",
          static_cast<long>(n), static_cast<long>(vocab), static_cast<long>(d), train * 1e3, flops / train * kTera,
          eval * 1e3, pool_peak * kMiB, used_delta * kMiB, full_logits_mib, r.loss);
    } else {
      std::printf("cross-entropy bf16 N %ld x V %ld x D %ld: loss+dh+dW %.3f ms (%.1f TFLOP/s of 3 GEMMs) | loss only "
                  "%.3f ms | peak extra memory: pool %.1f MiB, cudaMemGetInfo %.1f MiB (full f32 logits would be "
                  "%.1f MiB) | loss %.4f (ln V = %.4f)\n",
                  static_cast<long>(n), static_cast<long>(vocab), static_cast<long>(d), train * 1e3,
                  flops / train * kTera, eval * 1e3, pool_peak * kMiB, used_delta * kMiB, full_logits_mib, r.loss,
                  std::log(static_cast<double>(vocab)));
    }
    std::fflush(stdout);
  }
  return 0;
}

LOOM_BENCHMARK("gemm", "cuBLASLt linear fwd/bwd TFLOP/s and the fused cross-entropy ms + peak memory (CUDA builds)",
               BenchGemm);

}  // namespace
}  // namespace loom
