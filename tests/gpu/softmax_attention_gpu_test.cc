// Loom's CUDA flash attention (ops/cuda/softmax_attention.cu) against the
// CPU reference (ops/cpu/softmax_attention.cc) on the same inputs: q, k, v,
// d_o are drawn, rounded to bf16, and the CPU runs in f32 on the rounded
// values, so the only differences are the kernel's own roundings.
//
// Tolerance, from bf16's 8 significant bits (unit roundoff u = 2^-9 ≈ 2e-3):
// the kernels round P (forward) and P, dS (backward) to bf16 before the
// second product and round every output once, so each element carries a few
// u of relative error on terms that partly cancel. Measured against the
// tensor's scale that is ‖gpu − cpu‖ / ‖cpu‖ of a few 1e-3; the checks allow
// 1e-2 normwise (METHOD.md's bf16 band) and, element by element,
// 3e-2 · max|cpu| + 2e-2 · |cpu|. lse is f32 from the same bf16 scores:
// 1e-3 absolute. −∞ entries must match exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "ops/softmax_attention.h"
#include "runtime/cuda_runtime.h"
#include "tests/gpu/attention_gpu_cases.h"

namespace loom::ops {
namespace {

using gpu_test::Case;
using gpu_test::RunCase;

#define LOOM_SKIP_WITHOUT_GPU() \
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "skipped: no GPU" << (BuiltWithCuda() ? "" : " (CPU-only build)")

const auto kLoom = cuda::AttentionBackend::kLoom;

TEST(GpuFlashAttention, CausalUniformRowsD128) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "causal D128", .d = 128, .hq = 4, .hk = 4, .q_lens = {200, 333}});
}

TEST(GpuFlashAttention, FullGqaVarlenD64) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "full GQA varlen D64", .d = 64, .hq = 8, .hk = 2, .q_lens = {70, 230, 1, 129},
                      .causal = false});
}

TEST(GpuFlashAttention, CausalGqaVarlenD128) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "causal GQA varlen D128", .d = 128, .hq = 6, .hk = 2, .q_lens = {64, 300, 17}});
}

TEST(GpuFlashAttention, RingBlockQueryAfterKeys) {
  LOOM_SKIP_WITHOUT_GPU();
  // A later query chunk against an earlier key chunk: queries at 256..355
  // see keys 0..300 partly (ring attention's diagonal-crossing block).
  RunCase(kLoom, Case{.name = "q_offset 256", .d = 128, .hq = 4, .hk = 2, .q_lens = {100}, .k_lens = {300},
                      .q_offset = 256});
  RunCase(kLoom, Case{.name = "q_offset 300 D64", .d = 64, .hq = 2, .hk = 1, .q_lens = {150, 90}, .k_lens = {200, 300},
                      .q_offset = 300});
}

TEST(GpuFlashAttention, RingBlockKeysAfterSomeQueries) {
  LOOM_SKIP_WITHOUT_GPU();
  // Keys start at position 100: the first 100 queries see nothing
  // (o = 0, lse = −∞, zero gradients).
  RunCase(kLoom, Case{.name = "k_offset 100", .d = 128, .hq = 4, .hk = 4, .q_lens = {260}, .k_lens = {260},
                      .k_offset = 100});
}

TEST(GpuFlashAttention, DocumentsInsideRows) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "docs causal", .d = 128, .hq = 4, .hk = 2, .q_lens = {300, 150},
                      .doc_lens = {{40, 200, 60}, {1, 149}}});
  RunCase(kLoom, Case{.name = "docs full D64", .d = 64, .hq = 2, .hk = 2, .q_lens = {190},
                      .doc_lens = {{90, 100}}, .causal = false});
}

TEST(GpuFlashAttention, SigmoidWithBias) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "sigmoid causal D64", .d = 64, .hq = 4, .hk = 2, .q_lens = {150, 260}, .sigmoid = true});
  RunCase(kLoom, Case{.name = "sigmoid full D128", .d = 128, .hq = 2, .hk = 2, .q_lens = {190}, .causal = false,
                      .sigmoid = true});
}

TEST(GpuFlashAttention, LongRowMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "causal 2048 GQA", .d = 128, .hq = 4, .hk = 1, .q_lens = {2048}});
}

}  // namespace
}  // namespace loom::ops
