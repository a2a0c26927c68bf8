// loom-bench --what=attention [--steps N] [--json] [--attention_d=128]
//   [--attention_kv_heads=32,8] [--attention_seq=4096,16384,65536]
//   [--attention_doc=0] [--attention_tokens=65536]
// Loom's flash attention against cuDNN's SDPA in the same run; by default
// issue 8's grid: 65,536 tokens a batch (B·S), Hq = 32 with Hk = 32 and 8,
// D = 128, S in {4K, 16K, 64K}, causal, bf16. gpu_1b_softmax's attention is
// --attention_d=64 --attention_kv_heads=4 --attention_seq=8192, with
// --attention_tokens=8192 for its micro-batch of one sequence.
// --attention_doc=N splits every row into documents of N tokens (the last
// shorter), as packed text with data.reset_attention: cuDNN then runs
// ragged sequences.
//   FLOPs: forward 4·S²·Hq·D / 2 a document of S tokens (causal counts
// half), backward 2.5x that.
// Times are CUDA-event medians of --steps runs after one warm-up; the inputs
// are random (never zeros). A separate untimed pass prints
// ‖o_loom − o_cudnn‖ / ‖o_cudnn‖ in the same row.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "bench/cuda/timing.h"
#include "ops/softmax_attention.h"
#include "runtime/cuda_check.h"

ABSL_FLAG(int, attention_d, 128, "head dimension (64 or 128)");
ABSL_FLAG(std::string, attention_kv_heads, "32,8", "KV head counts (of 32 query heads), comma separated");
ABSL_FLAG(std::string, attention_seq, "4096,16384,65536", "sequence lengths (each a divisor of --attention_tokens)");
ABSL_FLAG(int, attention_doc, 0, "tokens a document inside each row (0: one document a row)");
ABSL_FLAG(int64_t, attention_tokens, 65536, "tokens a batch (batch size times sequence length)");

namespace loom {
namespace {

using bench::MedianSeconds;
using bench::RelativeDiffBf16;

constexpr int64_t kHq = 32;

int BenchAttention(const config::Config&) {
  const int64_t kD = absl::GetFlag(FLAGS_attention_d);
  const auto kv_heads = bench::ParseSizes("attention_kv_heads", absl::GetFlag(FLAGS_attention_kv_heads));
  const auto seqs = bench::ParseSizes("attention_seq", absl::GetFlag(FLAGS_attention_seq));
  if (!kv_heads || !seqs) return 2;
  const int64_t tokens = absl::GetFlag(FLAGS_attention_tokens);
  for (int64_t s : *seqs)
    if (tokens <= 0 || tokens % s != 0) {
      std::fprintf(stderr, "loom-bench: --attention_seq: %ld does not divide --attention_tokens=%ld\n",
                   static_cast<long>(s), static_cast<long>(tokens));
      return 2;
    }
  if (CudaDeviceCount() == 0) {  // after the flags, so a wrong one is said on any machine
    std::printf("attention: skipped: no GPU\n");
    return 0;
  }
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const bool json = absl::GetFlag(FLAGS_json);
  if (!json)
    std::printf("%-6s %3s %3s %6s | %9s %9s %6s | %9s %9s %6s | %9s\n", "S", "Hq", "Hk", "B", "fwd loom", "fwd cudnn",
                "ratio", "bwd loom", "bwd cudnn", "ratio", "o diff");
  for (int64_t hk : *kv_heads) {
    const Tensor q = bench::Uniform({tokens, kHq, kD}, DType::kBF16, 1), k = bench::Uniform({tokens, hk, kD}, DType::kBF16, 2),
                 v = bench::Uniform({tokens, hk, kD}, DType::kBF16, 3), d_o = bench::Uniform({tokens, kHq, kD}, DType::kBF16, 4);
    Tensor o = Tensor::Empty(q.shape(), DType::kBF16, Device::Cuda(0));
    Tensor o_ref = Tensor::Empty(q.shape(), DType::kBF16, Device::Cuda(0));
    Tensor lse = Tensor::Empty({tokens, kHq}, DType::kF32, Device::Cuda(0));
    Tensor dq = Tensor::Empty(q.shape(), DType::kBF16, Device::Cuda(0));
    Tensor dk = Tensor::Empty(k.shape(), DType::kBF16, Device::Cuda(0));
    Tensor dv = Tensor::Empty(k.shape(), DType::kBF16, Device::Cuda(0));
    for (int64_t s : *seqs) {
      const int64_t b = tokens / s, doc = absl::GetFlag(FLAGS_attention_doc) > 0
                                                  ? std::min<int64_t>(absl::GetFlag(FLAGS_attention_doc), s)
                                                  : s;
      ops::TokenRows host_rows = ops::TokenRows::Uniform(b, s);
      double square_sum = 0;  // Σ over documents of their length²
      if (doc < s) {
        host_rows.doc_ids = Tensor::Empty({tokens}, DType::kI32);
        for (int64_t t = 0; t < tokens; ++t)
          host_rows.doc_ids.data<int32_t>()[t] = static_cast<int32_t>((t / s) * (s / doc + 1) + (t % s) / doc);
      }
      for (int64_t start = 0; start < s; start += doc) square_sum += std::pow(double(std::min(doc, s - start)), 2);
      square_sum *= b;
      const auto rows = ops::cuda::ToDevice(host_rows, 0);
      ops::AttentionOptions options;
      options.causal = true;
      const double fwd_flops = 4.0 * square_sum * kHq * kD / 2, bwd_flops = 2.5 * fwd_flops;
      using ops::cuda::AttentionBackend;
      double cf = NAN, cb = NAN, diff = NAN;
      const double lf = MedianSeconds(steps, [&] {
        ops::cuda::AttentionForward(AttentionBackend::kLoom, q, k, v, rows, rows, options, o, lse);
      });
      const double lb = MedianSeconds(steps, [&] {
        ops::cuda::AttentionBackward(AttentionBackend::kLoom, q, k, v, o, lse, d_o, rows, rows, options, dq, dk, dv);
      });
      const std::string why_fwd = ops::cuda::CudnnAttentionUnsupported(q, k, v, rows, rows, options, false);
      const std::string why_bwd = ops::cuda::CudnnAttentionUnsupported(q, k, v, rows, rows, options, true);
      if (why_fwd.empty()) {
        ops::cuda::AttentionForward(AttentionBackend::kLoom, q, k, v, rows, rows, options, o_ref, lse);
        cf = MedianSeconds(steps, [&] {
          ops::cuda::AttentionForward(AttentionBackend::kCudnn, q, k, v, rows, rows, options, o, lse);
        });
        LOOM_CUDA_CHECK(cudaDeviceSynchronize());
        diff = RelativeDiffBf16(o, o_ref);
        if (why_bwd.empty()) {
          cb = MedianSeconds(steps, [&] {
            ops::cuda::AttentionBackward(AttentionBackend::kCudnn, q, k, v, o, lse, d_o, rows, rows, options, dq, dk,
                                         dv);
          });
        }
      }
      for (const std::string* why : {&why_fwd, &why_bwd})
        if (!why->empty() && s == seqs->front())
          std::fprintf(stderr, "attention: cuDNN unavailable for S=%ld Hk=%ld: %s\n", static_cast<long>(s),
                       static_cast<long>(hk), why->c_str());
      const double tf = 1e-12;
      if (json) {
        std::printf(
            "{\"what\": \"attention\", \"s\": %ld, \"hq\": %ld, \"hk\": %ld, \"b\": %ld, \"d\": %ld, "
            "\"fwd_loom_tflops\": %.1f, \"fwd_cudnn_tflops\": %.1f, \"bwd_loom_tflops\": %.1f, "
            "\"bwd_cudnn_tflops\": %.1f, \"o_rel_diff\": %.2e}\n",
            static_cast<long>(s), static_cast<long>(kHq), static_cast<long>(hk), static_cast<long>(b),
            static_cast<long>(kD), fwd_flops / lf * tf, fwd_flops / cf * tf, bwd_flops / lb * tf, bwd_flops / cb * tf,
            diff);
      } else {
        std::printf("%-6ld %3ld %3ld %6ld | %9.1f %9.1f %6.2f | %9.1f %9.1f %6.2f | %9.2e\n", static_cast<long>(s),
                    static_cast<long>(kHq), static_cast<long>(hk), static_cast<long>(b), fwd_flops / lf * tf,
                    fwd_flops / cf * tf, cf / lf, bwd_flops / lb * tf, bwd_flops / cb * tf, cb / lb, diff);
      }
      std::fflush(stdout);
    }
  }
  if (!json) std::printf("TFLOP/s (causal FLOPs halved; bwd = 2.5x fwd), D=%ld, bf16; ratio = loom / cudnn\n",
                         static_cast<long>(kD));
  return 0;
}

LOOM_BENCHMARK("attention", "Loom flash attention vs cuDNN SDPA, fwd/bwd TFLOP/s (CUDA builds)", BenchAttention);

}  // namespace
}  // namespace loom
