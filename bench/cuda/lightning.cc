// loom-bench --what=lightning [--steps N] [--json] [--lightning_dump=DIR]
// The CUDA lightning attention at 65,536 tokens a batch (B·S), H = 32,
// D = 128, S in {4096, 16384, 65536}, per-head ALiBi decays (layer 0 of 1):
// forward and forward+backward time (median of --steps timed runs after two
// warm-ups, CUDA events), tokens/s, and the rates below. Then an untimed
// check of the first 1,024 tokens of row 0 against the CPU reference (f32 on
// the same bf16 inputs), printed in the same row. The baseline,
// flash-linear-attention's chunk_simple_gla on the same shapes, is timed by
// bench/fla_baseline.py, which runs this binary and prints the ratio.
//
// FLOPs counted (chunked algorithm, C = 64, per token and head): forward
// 4·C·D (Q Kᵀ and P V on whole C × C blocks) + 4·D² (Q S and the state
// update Kᵀ V) = 98,304 at D = 128; backward twice the forward. Recomputed
// work (the kernels rebuild per-segment states) is not counted.
// Bytes counted: the least HBM traffic, each tensor read or written once in
// bf16: forward q, k, v, o (4·T·H·D·2); backward q, k, v, do, dq, dk, dv.
//
// --lightning_dump=DIR writes one small case (B = 2, S = 4096: the first
// 8,192 tokens of the inputs) as raw little-endian files q k v do o dq dk dv
// (bf16 [8192, 32, 128]) and decay (f32 [32]), for the agreement check of
// bench/fla_baseline.py.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/bench.h"
#include "bench/cuda/timing.h"
#include "ops/lightning_attention.h"
#include "runtime/cuda_check.h"
#include "runtime/cuda_runtime.h"

ABSL_FLAG(std::string, lightning_dump, "", "write a B=2, S=4096 case's inputs and outputs to this directory");

namespace loom {
namespace {

constexpr int64_t kTokens = 65536, kHeads = 32, kDim = 128, kChunk = 64;

// Median milliseconds of `reps` runs of fn after two warm-ups.
Tensor ToGpu(const Tensor& t) { return t.To(Device::Cuda(0)); }
Tensor ToCpu(const Tensor& t) { return t.To(Device::Cpu()); }

template <typename Fn>
double MedianMs(int reps, Fn&& fn) {
  return 1e3 * bench::MedianSeconds(reps, fn, /*warmups=*/2);
}

// Tokens [0, n) of a host [T, H, D] tensor, as f32.
Tensor HeadTokensF32(const Tensor& host, int64_t n) {
  Tensor t = Tensor::Empty({n, host.dim(1), host.dim(2)}, DType::kF32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = Bf16ToFloat(host.data<bf16>()[i]);
  return t;
}

// ‖gpu − ref‖ / ‖ref‖ over the first n tokens.
double RelErr(const Tensor& gpu_host, const Tensor& ref) {
  double d2 = 0, r2 = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double a = Bf16ToFloat(gpu_host.data<bf16>()[i]), b = ref.data<float>()[i];
    d2 += (a - b) * (a - b);
    r2 += b * b;
  }
  return std::sqrt(d2 / r2);
}

void WriteRaw(const std::string& dir, const char* name, const Tensor& host, int64_t elements) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(host.raw()), static_cast<std::streamsize>(elements * DTypeSize(host.dtype())));
  LOOM_CHECK(f.good(), "[bench lightning] cannot write ", dir, "/", name, ".bin");
}

int BenchLightning(const config::Config&) {
  if (CudaDeviceCount() == 0) {
    std::fprintf(stderr, "loom-bench --what=lightning: no GPU visible\n");
    return 1;
  }
  const int reps = std::max(absl::GetFlag(FLAGS_steps), 5);
  const Shape shape{kTokens, kHeads, kDim};
  const Tensor q = bench::Uniform(shape, DType::kBF16, 1), k = bench::Uniform(shape, DType::kBF16, 2),
               v = bench::Uniform(shape, DType::kBF16, 3), d_o = bench::Uniform(shape, DType::kBF16, 4);
  const Tensor hq = q.To(Device::Cpu()), hk = k.To(Device::Cpu()), hv = v.To(Device::Cpu()), hdo = d_o.To(Device::Cpu());
  const std::vector<double> lam64 = ops::LightningDecay(kHeads, 0, 1);
  const std::vector<float> lam32(lam64.begin(), lam64.end());
  const Tensor hdecay = Tensor::FromVector(lam32, {kHeads});
  const Tensor decay = ToGpu(hdecay);
  Tensor o = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0));
  Tensor dq = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0));
  Tensor dk = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0));
  Tensor dv = Tensor::Empty(shape, DType::kBF16, Device::Cuda(0));
  Tensor none;
  ops::cuda::LightningWorkspace ws;

  const double flops_fwd = static_cast<double>(kTokens) * kHeads * (4.0 * kChunk * kDim + 4.0 * kDim * kDim);
  const double unit = static_cast<double>(kTokens) * kHeads * kDim * 2;  // one bf16 [T, H, D] tensor
  const bool json = absl::GetFlag(FLAGS_json);
  if (!json)
    std::printf("%7s %4s %10s %12s %12s %10s %10s %10s %10s %10s\n", "S", "B", "fwd ms", "fwd+bwd ms", "Mtok/s f+b",
                "fwd TF/s", "f+b TF/s", "fwd GB/s", "f+b GB/s", "o,dq err");
  for (const int64_t s : {4096, 16384, 65536}) {
    const ops::TokenRows rows = ops::TokenRows::Uniform(kTokens / s, s);
    auto forward = [&] { ops::cuda::LightningAttentionForward(q, k, v, decay, rows, none, o, none, ws, nullptr); };
    auto backward = [&] {
      ops::cuda::LightningAttentionBackward(q, k, v, decay, rows, none, d_o, none, dq, dk, dv, none, ws, nullptr);
    };
    const double fwd_ms = MedianMs(reps, forward);
    const double fb_ms = MedianMs(reps, [&] {
      forward();
      backward();
    });
    // Untimed check: row 0's first 1,024 tokens (causal, so they see only
    // themselves) against the CPU reference.
    forward();
    backward();
    CudaSynchronize();
    constexpr int64_t kCheck = 1024;
    const ops::TokenRows check_rows = ops::TokenRows::Uniform(1, kCheck);
    Tensor ro, rs, rdq, rdk, rdv, rds;
    const Tensor cq = HeadTokensF32(hq, kCheck), ck = HeadTokensF32(hk, kCheck), cv = HeadTokensF32(hv, kCheck);
    const Tensor cdo = HeadTokensF32(hdo, kCheck);
    ops::LightningAttentionForward(cq, ck, cv, hdecay, check_rows, {}, Tensor(), ro, rs);
    ops::LightningAttentionBackward(cq, ck, cv, hdecay, check_rows, {}, Tensor(), cdo, Tensor(), rdq, rdk, rdv, rds);
    // dq of a token depends on earlier tokens only; dk, dv on later ones, so
    // they cannot be checked on a prefix (the GPU test covers them).
    const double err = std::max(RelErr(ToCpu(o), ro), RelErr(ToCpu(dq), rdq));
    const double fb_tok_s = kTokens / (fb_ms * 1e-3);
    if (json) {
      std::printf(
          "{\"what\": \"lightning\", \"S\": %ld, \"B\": %ld, \"H\": %ld, \"D\": %ld, \"fwd_ms\": %.4f, "
          "\"fwdbwd_ms\": %.4f, \"fwdbwd_tokens_per_s\": %.1f, \"fwd_tflops\": %.2f, \"fwdbwd_tflops\": %.2f, "
          "\"fwd_gbps\": %.1f, \"fwdbwd_gbps\": %.1f, \"rel_err_o_dq\": %.3e}\n",
          static_cast<long>(s), static_cast<long>(kTokens / s), static_cast<long>(kHeads), static_cast<long>(kDim),
          fwd_ms, fb_ms, fb_tok_s, flops_fwd / (fwd_ms * 1e-3) / 1e12, 3 * flops_fwd / (fb_ms * 1e-3) / 1e12,
          4 * unit / (fwd_ms * 1e-3) / 1e9, 11 * unit / (fb_ms * 1e-3) / 1e9, err);
    } else {
      std::printf("%7ld %4ld %10.3f %12.3f %12.2f %10.1f %10.1f %10.0f %10.0f %10.2e\n", static_cast<long>(s),
                  static_cast<long>(kTokens / s), fwd_ms, fb_ms, fb_tok_s / 1e6, flops_fwd / (fwd_ms * 1e-3) / 1e12,
                  3 * flops_fwd / (fb_ms * 1e-3) / 1e12, 4 * unit / (fwd_ms * 1e-3) / 1e9,
                  11 * unit / (fb_ms * 1e-3) / 1e9, err);
    }
    std::fflush(stdout);
  }
  if (!json)
    std::printf("FLOPs: fwd 4·C·D + 4·D² per token and head (C = 64), bwd 2x fwd; GB/s: least HBM bytes (fwd 4, "
                "fwd+bwd 11 bf16 [T,H,D] tensors) over time; baseline: bench/fla_baseline.py\n");

  const std::string dir = absl::GetFlag(FLAGS_lightning_dump);
  if (!dir.empty()) {
    constexpr int64_t kS = 4096, kB = 2;
    const int64_t n = kS * kB;
    const Tensor sq = q.Slice(0, n), sk = k.Slice(0, n), sv = v.Slice(0, n), sdo = d_o.Slice(0, n);
    Tensor so = o.Slice(0, n), sdq = dq.Slice(0, n), sdk = dk.Slice(0, n), sdv = dv.Slice(0, n);
    const ops::TokenRows rows = ops::TokenRows::Uniform(kB, kS);
    ops::cuda::LightningAttentionForward(sq, sk, sv, decay, rows, none, so, none, ws, nullptr);
    ops::cuda::LightningAttentionBackward(sq, sk, sv, decay, rows, none, sdo, none, sdq, sdk, sdv, none, ws, nullptr);
    CudaSynchronize();
    const int64_t elems = n * kHeads * kDim;
    WriteRaw(dir, "q", hq, elems);
    WriteRaw(dir, "k", hk, elems);
    WriteRaw(dir, "v", hv, elems);
    WriteRaw(dir, "do", hdo, elems);
    WriteRaw(dir, "o", ToCpu(so), elems);
    WriteRaw(dir, "dq", ToCpu(sdq), elems);
    WriteRaw(dir, "dk", ToCpu(sdk), elems);
    WriteRaw(dir, "dv", ToCpu(sdv), elems);
    WriteRaw(dir, "decay", hdecay, kHeads);
    std::printf("wrote B=%ld S=%ld case to %s\n", static_cast<long>(kB), static_cast<long>(kS), dir.c_str());
  }
  return 0;
}

LOOM_BENCHMARK("lightning", "CUDA lightning attention fwd/bwd at B·S = 65,536, H = 32, D = 128 (baseline: "
               "bench/fla_baseline.py)", BenchLightning);

}  // namespace
}  // namespace loom
