// loom-bench --what=moh [--steps N] [--json]
// What MoH's skipping buys on the GPU (issue 10: with half of the routed
// heads active a token, MoH's attention at least 1.3x faster than with every
// head). The attention forward + backward of an MoH layer's heads, bf16,
// 65,536 tokens (8 rows of 8,192), 16 heads of D = 128 (hidden 2048), timed
// with MoH's active mask (ops/moh_gate.h: a (head, 64-token block) pair runs
// when some token of the block keeps the head) against the same call with
// every head active, in the same run, after one warm-up (CUDA-event median
// of --steps runs).
//   R (lightning heads): ops::cuda::LightningAttention{Forward,Backward}
//     with LightningOptions::active (blocks of 64 = the kernels' chunks).
//   H (softmax heads): ops::cuda::AttentionForward/Backward (Loom's flash
//     kernels), causal, with AttentionOptions::active (a query tile is
//     skipped when every 64-query block it overlaps is).
// Heads: 4 shared + 12 routed, top-6 (half of the routed heads a token:
// 10 of 16 heads run per token), and 0 shared + 16 routed, top-8.
//
// The routing. Skipping pays only where a head is unused by every token of
// a 64-token block; a router that picks heads independently per token leaves
// almost no such block (each routed head is kept by half the tokens). So the
// routing comes from the MoE router op on synthetic logits with a stated
// correlation: z_t,i = 4·u_{s(t),i} + σ·ε_t,i, u and ε standard normal, s(t)
// the span of 256 tokens holding t (a trained router's choices follow the
// content, which changes slowly along a document). Rows: σ = 0 (every token of
// a span keeps the same heads: the best case), σ = 1, 2 (correlated), and
// independent per token (z = ε). Each row prints the fraction of
// (routed head, block) pairs skipped, and checks that a token keeps exactly
// k routed heads.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "bench/cuda/timing.h"
#include "ops/lightning_attention.h"
#include "ops/softmax_attention.h"
#include "ops/moe_router.h"
#include "ops/moh_gate.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"

namespace loom {
namespace {

using bench::MedianSeconds;

constexpr int64_t kTokens = 65536, kRowLen = 8192, kHeads = 16, kDim = 128, kBlock = 64, kSpan = 256;

// Router logits [T, R] on the GPU: 4·u_span + sigma·ε, or ε alone (sigma < 0).
Tensor Logits(int routed, double sigma, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> u((kTokens / kSpan) * routed), z(kTokens * routed);
  for (float& x : u) x = normal(gen);
  for (int64_t t = 0; t < kTokens; ++t)
    for (int i = 0; i < routed; ++i) {
      const float e = normal(gen);
      z[t * routed + i] = sigma < 0 ? e : 4.0f * u[(t / kSpan) * routed + i] + static_cast<float>(sigma) * e;
    }
  return Tensor::FromVector(z, {kTokens, routed}).To(Device::Cuda(0));
}

struct HeadSplit {
  int shared, top_k;
};

int BenchMoh(const config::Config&) {
  if (CudaDeviceCount() == 0) {
    std::printf("moh: skipped: no GPU\n");
    return 0;
  }
  const int steps = std::max(3, absl::GetFlag(FLAGS_steps));
  const bool json = absl::GetFlag(FLAGS_json);
  const Shape shape{kTokens, kHeads, kDim};
  const Tensor q = bench::Uniform(shape, DType::kBF16, 1), k = bench::Uniform(shape, DType::kBF16, 2),
               v = bench::Uniform(shape, DType::kBF16, 3), d_o = bench::Uniform(shape, DType::kBF16, 4);
  Tensor o = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0)), dq = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0)),
         dk = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0)), dv = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0));
  const std::vector<double> lam64 = ops::LightningDecay(kHeads, 0, 1);
  const Tensor decay = Tensor::FromVector(std::vector<float>(lam64.begin(), lam64.end()), {kHeads}).To(Device::Cuda(0));
  const ops::TokenRows rows = ops::TokenRows::Uniform(kTokens / kRowLen, kRowLen);
  ops::cuda::LightningWorkspace ws;
  Tensor none;
  // Forward + backward of the lightning heads with a mask (undefined: all heads).
  auto lightning = [&](const Tensor& active) {
    ops::cuda::LightningAttentionForward(q, k, v, decay, rows, none, o, none, ws, nullptr, active, kBlock);
    ops::cuda::LightningAttentionBackward(q, k, v, decay, rows, none, d_o, none, dq, dk, dv, none, ws, nullptr, active,
                                          kBlock);
  };
  // Forward + backward of the softmax heads (causal) with a mask.
  const ops::cuda::CudaTokenRows grows = ops::cuda::ToDevice(rows, 0);
  Tensor lse = Tensor::Empty({kTokens, kHeads}, DType::kF32, Device::Cuda(0));
  auto softmax = [&](const Tensor& active) {
    ops::AttentionOptions ao;
    ao.causal = true;
    ao.active = active;
    ao.active_block = kBlock;
    ops::cuda::AttentionForward(ops::AttentionBackend::kLoom, q, k, v, grows, grows, ao, o, lse);
    ops::cuda::AttentionBackward(ops::AttentionBackend::kLoom, q, k, v, o, lse, d_o, grows, grows, ao, dq, dk, dv);
  };
  const double all_ms = 1e3 * MedianSeconds(steps, [&] { lightning(none); });
  const double h_all_ms = 1e3 * MedianSeconds(steps, [&] { softmax(none); });
  // The mask's own cost: every pair active.
  Tensor ones = Tensor::Empty({kHeads, kTokens / kBlock}, DType::kI32);
  ones.Fill(1);
  ones = ones.To(Device::Cuda(0));
  const double ones_ms = 1e3 * MedianSeconds(steps, [&] { lightning(ones); });
  const double h_ones_ms = 1e3 * MedianSeconds(steps, [&] { softmax(ones); });
  if (!json) {
    std::printf("MoH attention, bf16, T = %ld (%ld rows of %ld), %ld heads of D = %ld, f+b; skip blocks of %ld\n",
                static_cast<long>(kTokens), static_cast<long>(kTokens / kRowLen), static_cast<long>(kRowLen),
                static_cast<long>(kHeads), static_cast<long>(kDim), static_cast<long>(kBlock));
    std::printf("R (lightning), every head active: %.3f ms; with an all-ones mask: %.3f ms\n", all_ms, ones_ms);
    std::printf("H (softmax, causal), every head active: %.3f ms; with an all-ones mask: %.3f ms\n", h_all_ms,
                h_ones_ms);
    std::printf("%-8s %-12s %12s %12s %12s %10s %10s %10s %10s\n", "heads", "routing", "tokens' hds", "routed skip",
                "all skip", "R MoH ms", "R speedup", "H MoH ms", "H speedup");
  }
  for (const HeadSplit split : {HeadSplit{4, 6}, HeadSplit{0, 8}}) {
    const int routed = kHeads - split.shared;
    const ops::MoeRouterOptions ro{.experts = routed, .top_k = split.top_k};
    const ops::MohGateOptions go{.heads = kHeads, .shared = split.shared, .top_k = split.top_k};
    for (const double sigma : {0.0, 1.0, 2.0, -1.0}) {
      ops::MoeRouting routing;
      ops::MoeRouterForward(Logits(routed, sigma, 7), {}, ro, routing);
      Tensor active;
      ops::MohActiveMask(routing.experts, go, kTokens, kBlock, active);
      // Every token keeps k routed heads: Σ load = T·k.
      int64_t assigned = 0;
      for (int64_t l : routing.load) assigned += l;
      LOOM_CHECK(assigned == kTokens * split.top_k, "[bench moh] ", assigned, " assignments");
      const Tensor mask = active.To(Device::Cpu());
      const int64_t blocks = mask.dim(1);
      int64_t off_routed = 0;
      for (int64_t i = int64_t{split.shared} * blocks; i < mask.numel(); ++i) off_routed += mask.data<int32_t>()[i] == 0;
      const double routed_skip = double(off_routed) / double(routed * blocks);
      const double all_skip = double(off_routed) / double(kHeads * blocks);
      const double token_heads = double(split.shared + split.top_k) / kHeads;
      const double moh_ms = 1e3 * MedianSeconds(steps, [&] { lightning(active); });
      const double h_moh_ms = 1e3 * MedianSeconds(steps, [&] { softmax(active); });
      const std::string label = sigma < 0 ? "per token" : "span s=" + std::to_string(static_cast<int>(sigma));
      const std::string heads = std::to_string(split.shared) + "+" + std::to_string(routed) + "/" +
                                std::to_string(split.top_k);
      if (json) {
        std::printf(
            "{\"what\": \"moh\", \"heads\": \"%s\", \"routing\": \"%s\", \"token_heads\": %.4f, "
            "\"routed_pairs_skipped\": %.4f, \"pairs_skipped\": %.4f, \"all_ms\": %.4f, \"moh_ms\": %.4f, "
            "\"speedup\": %.4f, \"h_all_ms\": %.4f, \"h_moh_ms\": %.4f, \"h_speedup\": %.4f}\n",
            heads.c_str(), label.c_str(), token_heads, routed_skip, all_skip, all_ms, moh_ms, all_ms / moh_ms,
            h_all_ms, h_moh_ms, h_all_ms / h_moh_ms);
      } else {
        std::printf("%-8s %-12s %11.1f%% %11.1f%% %11.1f%% %10.3f %9.2fx %10.3f %9.2fx\n", heads.c_str(),
                    label.c_str(), 100 * token_heads, 100 * routed_skip, 100 * all_skip, moh_ms, all_ms / moh_ms,
                    h_moh_ms, h_all_ms / h_moh_ms);
      }
    }
  }
  return 0;
}

LOOM_BENCHMARK("moh", "MoH attention with its active mask vs every head, bf16, on the GPU", BenchMoh);

}  // namespace
}  // namespace loom
