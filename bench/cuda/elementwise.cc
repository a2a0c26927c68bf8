// loom-bench --what=elementwise [--steps N] [--json]
// The memory-bound CUDA ops at training size, bf16 activations: N = 65,536
// tokens, D = 2048 (RMSNorm over the hidden size, the embedding with
// V = 32,000 rows), F = 5632 (SwiGLU), and the per-head RMSNorm view
// [N·16, 128]. Each row: the median time of --steps runs after one warm-up
// (CUDA events; the tensors, 256 MiB and up, are five times the 50 MiB L2, so
// no flush), the GB/s of the bytes below, and its ratio to a device-to-device
// cudaMemcpy of 256 MiB timed in the same run (read + write counted), the
// bandwidth a copy reaches on this GPU.
//
// Bytes counted: each tensor read or written once.
//   rmsnorm fwd    x, y (bf16), rstd (f32)                         2·N·D·2 + 4·N
//   rmsnorm bwd    x, dy, dx (bf16), rstd; dw read+written          3·N·D·2 + 4·N + 8·D
//   embedding fwd  the N table rows read, out written (bf16)        2·N·D·2
//   embedding bwd  dout (bf16) read; the U distinct f32 rows of dtable read and written: N·D·2 + 2·U·D·4
//   swiglu fwd     gate, up, h;  bwd gate, up, dh, dgate, dup       3·N·F·2, 5·N·F·2
// Embedding ids: uniform over V, and Zipf(1.1) over V (a text-like
// distribution whose most frequent id is ~14% of the tokens).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "bench/cuda/timing.h"
#include "ops/embedding.h"
#include "ops/rmsnorm.h"
#include "ops/swiglu.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"

namespace loom {
namespace {

using bench::MedianSeconds;

constexpr int64_t kTokens = 65536, kHidden = 2048, kVocab = 32000, kFfn = 5632, kHeads = 16, kHeadDim = 128;

// ids on the host: uniform, or Zipf(s) by inverse CDF over ranks shuffled
// into ids.
std::vector<int32_t> Ids(bool zipf, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int32_t> ids(kTokens);
  if (!zipf) {
    std::uniform_int_distribution<int32_t> dist(0, kVocab - 1);
    for (int32_t& id : ids) id = dist(gen);
    return ids;
  }
  std::vector<double> cdf(kVocab);
  double total = 0;
  for (int64_t r = 0; r < kVocab; ++r) cdf[r] = total += std::pow(static_cast<double>(r + 1), -1.1);
  std::vector<int32_t> rank_to_id(kVocab);
  for (int32_t i = 0; i < kVocab; ++i) rank_to_id[i] = i;
  std::shuffle(rank_to_id.begin(), rank_to_id.end(), gen);
  std::uniform_real_distribution<double> u(0, total);
  for (int32_t& id : ids) {
    const auto r = std::lower_bound(cdf.begin(), cdf.end(), u(gen)) - cdf.begin();
    id = rank_to_id[std::min<int64_t>(r, kVocab - 1)];
  }
  return ids;
}

int BenchElementwise(const config::Config&) {
  if (CudaDeviceCount() == 0) {
    std::printf("elementwise: skipped: no GPU\n");
    return 0;
  }
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const bool json = absl::GetFlag(FLAGS_json);

  // Baseline: a 256 MiB device-to-device copy.
  const Tensor copy_src = bench::Uniform({kTokens, kHidden}, DType::kBF16, 1);
  Tensor copy_dst = Tensor::Empty(copy_src.shape(), DType::kBF16, Device::Cuda(0));
  const double copy_s = MedianSeconds(steps, [&] {
    LOOM_CUDA_CHECK(cudaMemcpyAsync(copy_dst.raw(), copy_src.raw(), copy_src.nbytes(), cudaMemcpyDeviceToDevice));
  });
  const double copy_gbs = 2.0 * copy_src.nbytes() / copy_s * 1e-9;
  if (!json) std::printf("%-28s %10s %9s %8s\n", "op (bf16)", "ms", "GB/s", "vs copy");
  auto report = [&](const std::string& name, double seconds, double bytes) {
    const double gbs = bytes / seconds * 1e-9;
    if (json) {
      std::printf("{\"what\": \"elementwise\", \"op\": \"%s\", \"ms\": %.4f, \"gb_per_s\": %.1f, \"copy_gb_per_s\": %.1f}\n",
                  name.c_str(), seconds * 1e3, gbs, copy_gbs);
    } else {
      std::printf("%-28s %10.4f %9.1f %8.2f\n", name.c_str(), seconds * 1e3, gbs, gbs / copy_gbs);
    }
    std::fflush(stdout);
  };
  report("copy (cudaMemcpy d2d)", copy_s, 2.0 * copy_src.nbytes());

  const double nd = static_cast<double>(kTokens) * kHidden;
  {
    const Tensor x = bench::Uniform({kTokens, kHidden}, DType::kBF16, 2), dy = bench::Uniform({kTokens, kHidden}, DType::kBF16, 3);
    const Tensor w = bench::Uniform({kHidden}, DType::kF32, 4);
    Tensor y = Tensor::Empty(x.shape(), DType::kBF16, Device::Cuda(0));
    Tensor dx = Tensor::Empty(x.shape(), DType::kBF16, Device::Cuda(0));
    Tensor rstd = Tensor::Empty({kTokens}, DType::kF32, Device::Cuda(0));
    Tensor dw = Tensor::Zeros({kHidden}, DType::kF32, Device::Cuda(0));
    report("rmsnorm fwd [N, 2048]", MedianSeconds(steps, [&] { ops::RmsNormForward(x, w, 1e-5, y, rstd); }),
           2 * nd * 2 + 4.0 * kTokens);
    report("rmsnorm bwd [N, 2048]",
           MedianSeconds(steps, [&] { ops::RmsNormBackward(x, w, rstd, dy, dx, dw); }),
           3 * nd * 2 + 4.0 * kTokens + 8.0 * kHidden);
    // The per-head view: [N·H, Dh] with w [Dh].
    const Tensor xh = x.Reshape({kTokens * kHeads, kHeadDim}), dyh = dy.Reshape({kTokens * kHeads, kHeadDim});
    Tensor yh = y.Reshape(xh.shape()), dxh = dx.Reshape(xh.shape());
    const Tensor wh = bench::Uniform({kHeadDim}, DType::kF32, 5);
    Tensor rstdh = Tensor::Empty({kTokens * kHeads}, DType::kF32, Device::Cuda(0));
    Tensor dwh = Tensor::Zeros({kHeadDim}, DType::kF32, Device::Cuda(0));
    report("rmsnorm fwd [N*16, 128]", MedianSeconds(steps, [&] { ops::RmsNormForward(xh, wh, 1e-5, yh, rstdh); }),
           2 * nd * 2 + 4.0 * kTokens * kHeads);
    report("rmsnorm bwd [N*16, 128]",
           MedianSeconds(steps, [&] { ops::RmsNormBackward(xh, wh, rstdh, dyh, dxh, dwh); }),
           3 * nd * 2 + 4.0 * kTokens * kHeads + 8.0 * kHeadDim);
  }
  {
    const Tensor table = bench::Uniform({kVocab, kHidden}, DType::kBF16, 6);
    const Tensor dout = bench::Uniform({kTokens, kHidden}, DType::kBF16, 7);
    Tensor out = Tensor::Empty({kTokens, kHidden}, DType::kBF16, Device::Cuda(0));
    Tensor dtable = Tensor::Zeros({kVocab, kHidden}, DType::kF32, Device::Cuda(0));
    for (const bool zipf : {false, true}) {
      const std::vector<int32_t> host_ids = Ids(zipf, 8);
      const double distinct = static_cast<double>(std::set<int32_t>(host_ids.begin(), host_ids.end()).size());
      Tensor ids = Tensor::Empty({kTokens}, DType::kI32, Device::Cuda(0));
      ids.CopyFrom(Tensor::FromVector(host_ids, {kTokens}));
      const std::string dist = zipf ? " zipf" : " uniform";
      report("embedding fwd" + dist, MedianSeconds(steps, [&] { ops::EmbeddingForward(ids, table, out); }),
             2 * nd * 2);
      report("embedding bwd" + dist, MedianSeconds(steps, [&] { ops::EmbeddingBackward(ids, dout, dtable); }),
             nd * 2 + 2 * distinct * kHidden * 4);
    }
  }
  {
    const double nf = static_cast<double>(kTokens) * kFfn;
    const Tensor gate = bench::Uniform({kTokens, kFfn}, DType::kBF16, 9), up = bench::Uniform({kTokens, kFfn}, DType::kBF16, 10);
    const Tensor dh = bench::Uniform({kTokens, kFfn}, DType::kBF16, 11);
    Tensor h = Tensor::Empty(gate.shape(), DType::kBF16, Device::Cuda(0));
    Tensor dgu = Tensor::Empty({kTokens, 2 * kFfn}, DType::kBF16, Device::Cuda(0));
    report("swiglu fwd [N, 5632]", MedianSeconds(steps, [&] { ops::SwigluForward(gate, up, h); }), 3 * nf * 2);
    report("swiglu bwd [N, 5632]",
           MedianSeconds(steps, [&] { ops::SwigluBackward(gate, up, dh, dgu); }), 5 * nf * 2);
  }
  if (!json) std::printf("N = %ld tokens, bf16 activations, f32 norm weights/dtable; median of %d\n",
                         static_cast<long>(kTokens), steps);
  return 0;
}

LOOM_BENCHMARK("elementwise", "CUDA RMSNorm, embedding and SwiGLU GB/s vs a d2d copy (bf16, CUDA builds)",
               BenchElementwise);

}  // namespace
}  // namespace loom
