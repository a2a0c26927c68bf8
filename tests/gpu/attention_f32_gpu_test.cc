// The f32 CUDA attention (ops/cuda/softmax_attention_f32.cu), reached through
// the ops:: entry points with CUDA tensors and host rows as the model calls
// them, against the CPU reference in f32 on the same inputs.
//
// Tolerance. Both sides compute in f32 (unit roundoff u = 6e-8) and differ
// only in summation order and in exp (the CPU's polynomial vs expf, each
// within 2 ulp), so an element's difference is a few u times the size of the
// terms summed into it: about 1e-6 of the tensor's scale at a 2,048-key row.
// We require ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-5 and, element by element,
// |gpu − cpu| ≤ 1e-5 · max|cpu| + 1e-5 · |cpu|; a wrong mask, scale or
// missing tile is off by order 1. −∞ (lse of a query that sees no key) must
// match exactly. Outputs are poisoned with NaN first: an element the op
// forgets to write fails. Each comparison prints its measured errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "ops/softmax_attention.h"
#include "parallel/cp_attention.h"
#include "parallel/solo_communicator.h"
#include "parallel/zigzag.h"
#include "runtime/cuda_runtime.h"
#include "tests/gpu/attention_gpu_cases.h"
#include "tests/testing.h"

namespace loom::ops {
namespace {

using gpu_test::Case;
using gpu_test::OptionsOf;
using gpu_test::PoisonedGpu;
using gpu_test::Rows;
using loom::testing::NormwiseClose;
using loom::testing::ToCpu;
using loom::testing::ToGpu;

constexpr double kRel = 1e-5;

void RunF32Case(const Case& c) {
  SCOPED_TRACE(c.name);
  const std::vector<int32_t>& k_lens = c.k_lens.empty() ? c.q_lens : c.k_lens;
  const TokenRows q_rows = Rows(c.q_lens, c.doc_lens), k_rows = Rows(k_lens, c.doc_lens);
  const int64_t tq = q_rows.end(q_rows.rows() - 1), tk = k_rows.end(k_rows.rows() - 1);
  const Tensor q = testing::RandomTensor({tq, c.hq, c.d}, DType::kF32, 21, -2, 2);
  const Tensor k = testing::RandomTensor({tk, c.hk, c.d}, DType::kF32, 22, -2, 2);
  const Tensor v = testing::RandomTensor({tk, c.hk, c.d}, DType::kF32, 23);
  const Tensor d_o = testing::RandomTensor({tq, c.hq, c.d}, DType::kF32, 24);

  const AttentionOptions options = OptionsOf(c);

  Tensor o = Tensor::Empty(q.shape(), DType::kF32);
  Tensor lse = c.sigmoid ? Tensor() : Tensor::Empty({tq, c.hq}, DType::kF32);
  SoftmaxAttentionForward(q, k, v, q_rows, k_rows, options, o, lse);
  Tensor dq = Tensor::Empty(q.shape(), DType::kF32), dk = Tensor::Empty(k.shape(), DType::kF32),
         dv = Tensor::Empty(v.shape(), DType::kF32);
  SoftmaxAttentionBackward(q, k, v, o, lse, d_o, q_rows, k_rows, options, dq, dk, dv);

  const Tensor gq = ToGpu(q), gk = ToGpu(k), gv = ToGpu(v), gdo = ToGpu(d_o);
  Tensor go = PoisonedGpu(q.shape(), DType::kF32);
  Tensor glse = c.sigmoid ? Tensor() : PoisonedGpu({tq, c.hq}, DType::kF32);
  SoftmaxAttentionForward(gq, gk, gv, q_rows, k_rows, options, go, glse);
  Tensor gdq = PoisonedGpu(q.shape(), DType::kF32), gdk = PoisonedGpu(k.shape(), DType::kF32),
         gdv = PoisonedGpu(v.shape(), DType::kF32);
  SoftmaxAttentionBackward(gq, gk, gv, go, glse, gdo, q_rows, k_rows, options, gdq, gdk, gdv);
  CudaSynchronize();

  std::printf("[%s]\n", c.name.c_str());
  EXPECT_TRUE(NormwiseClose(go, o, "o", kRel));
  if (!c.sigmoid) {
    EXPECT_TRUE(NormwiseClose(glse, lse, "lse", kRel));
  }
  EXPECT_TRUE(NormwiseClose(gdq, dq, "dq", kRel));
  EXPECT_TRUE(NormwiseClose(gdk, dk, "dk", kRel));
  EXPECT_TRUE(NormwiseClose(gdv, dv, "dv", kRel));
}

TEST(GpuAttentionF32, CausalUniformRowsMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunF32Case(Case{.name = "causal uniform D64", .d = 64, .hq = 4, .hk = 4, .q_lens = {256, 256}});
  RunF32Case(Case{.name = "causal uniform D128", .d = 128, .hq = 2, .hk = 2, .q_lens = {200, 200, 200}});
}

TEST(GpuAttentionF32, SmallHeadDimsOfTheTinyConfigs) {
  LOOM_SKIP_WITHOUT_GPU();
  RunF32Case(Case{.name = "causal D32 (default.textproto)", .d = 32, .hq = 4, .hk = 4, .q_lens = {16, 16, 16, 16}});
  RunF32Case(Case{.name = "causal D16 (tiny_moe)", .d = 16, .hq = 4, .hk = 4, .q_lens = {100, 37}});
}

TEST(GpuAttentionF32, FullGqaVarlenMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunF32Case(Case{.name = "full GQA varlen D128", .d = 128, .hq = 8, .hk = 2, .q_lens = {70, 230, 1, 129},
                  .causal = false});
  RunF32Case(Case{.name = "causal GQA varlen D64", .d = 64, .hq = 6, .hk = 2, .q_lens = {64, 300, 17}});
}

TEST(GpuAttentionF32, OffsetsMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  // A later query chunk against an earlier key chunk (ring attention).
  RunF32Case(Case{.name = "q_offset 256", .d = 128, .hq = 4, .hk = 2, .q_lens = {100}, .k_lens = {300},
                  .q_offset = 256});
  RunF32Case(Case{.name = "q_offset 300 D64", .d = 64, .hq = 2, .hk = 1, .q_lens = {150, 90},
                  .k_lens = {200, 300}, .q_offset = 300});
}

TEST(GpuAttentionF32, QueriesThatSeeNoKeyGetZeroAndMinusInfinity) {
  LOOM_SKIP_WITHOUT_GPU();
  // Keys start at position 100: the first 100 queries see nothing.
  RunF32Case(Case{.name = "k_offset 100", .d = 64, .hq = 4, .hk = 4, .q_lens = {260}, .k_lens = {260},
                  .k_offset = 100});
}

TEST(GpuAttentionF32, DocumentsInsideRowsMatchCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunF32Case(Case{.name = "docs causal D128", .d = 128, .hq = 4, .hk = 2, .q_lens = {300, 150},
                  .doc_lens = {{40, 200, 60}, {1, 149}}});
  RunF32Case(Case{.name = "docs full D64", .d = 64, .hq = 2, .hk = 2, .q_lens = {190}, .doc_lens = {{90, 100}},
                  .causal = false});
}

TEST(GpuAttentionF32, SigmoidMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunF32Case(Case{.name = "sigmoid causal D64", .d = 64, .hq = 4, .hk = 2, .q_lens = {150, 260}, .sigmoid = true});
  RunF32Case(Case{.name = "sigmoid full D128", .d = 128, .hq = 2, .hk = 2, .q_lens = {190}, .causal = false,
                  .sigmoid = true});
}

TEST(GpuAttentionF32, LongRowMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunF32Case(Case{.name = "causal 2048 GQA D64", .d = 64, .hq = 4, .hk = 1, .q_lens = {2048}});
}

// The host rows are copied to the device once and reused while they stay
// the same; rewriting doc_ids in place (as the batch builders do after
// Batch::Allocate) makes the next call copy them again.
TEST(GpuAttentionF32, DeviceRowsAreCachedAndFollowInPlaceEdits) {
  LOOM_SKIP_WITHOUT_GPU();
  TokenRows rows = Rows({96, 96}, {{40, 56}, {96}});
  const cuda::CudaTokenRows& first = cuda::DeviceRows(rows, 0);
  const void* first_cu = first.cu_seqlens.raw();
  TokenRows copy = rows;  // shares the cache
  EXPECT_EQ(cuda::DeviceRows(copy, 0).cu_seqlens.raw(), first_cu) << "an unchanged copy must reuse the device rows";

  const int64_t t = 192, h = 2, d = 32;
  const Tensor q = testing::RandomTensor({t, h, d}, DType::kF32, 31, -2, 2);
  const Tensor k = testing::RandomTensor({t, h, d}, DType::kF32, 32, -2, 2);
  const Tensor v = testing::RandomTensor({t, h, d}, DType::kF32, 33);
  const Tensor gq = ToGpu(q), gk = ToGpu(k), gv = ToGpu(v);
  AttentionOptions options;
  Tensor go = Tensor::Empty(q.shape(), DType::kF32, Device::Cuda(0)), glse = Tensor::Empty({t, h}, DType::kF32,
                                                                                           Device::Cuda(0));
  SoftmaxAttentionForward(gq, gk, gv, rows, rows, options, go, glse);
  // New documents, written in place: one document a row.
  for (int64_t i = 0; i < t; ++i) rows.doc_ids.data<int32_t>()[i] = i < 96 ? 0 : 1;
  SoftmaxAttentionForward(gq, gk, gv, rows, rows, options, go, glse);
  CudaSynchronize();
  Tensor o = Tensor::Empty(q.shape(), DType::kF32), lse = Tensor::Empty({t, h}, DType::kF32);
  SoftmaxAttentionForward(q, k, v, rows, rows, options, o, lse);
  std::printf("[in-place doc_ids]\n");
  EXPECT_TRUE(NormwiseClose(go, o, "o after editing doc_ids", kRel));
  EXPECT_TRUE(NormwiseClose(glse, lse, "lse after editing doc_ids", kRel));
}

// Context parallelism on CUDA tensors (parallel/cp_attention.cc: scratch on
// the device, the LSE merge as a kernel), in a world of one rank: a row is
// its two zig-zag chunks, so every (query chunk, key chunk) pair runs and
// merges as with more ranks, and the result must equal the single-process
// op on the CPU.
void RunCpCase(CpSoftmaxScheme scheme, bool docs, bool sigmoid) {
  SCOPED_TRACE(std::string(CpSoftmaxSchemeName(scheme)) + (docs ? " docs" : "") + (sigmoid ? " sigmoid" : ""));
  const int64_t rows_n = 2, seq = 192, t = rows_n * seq, hq = 4, hk = 2, d = 64;
  TokenRows rows = docs ? Rows({192, 192}, {{50, 142}, {100, 92}}) : Rows({192, 192}, {});
  auto layout = ZigzagChunks(rows_n, seq, 1, 0, rows.doc_ids);
  ASSERT_TRUE(layout.ok()) << layout.status();
  const Tensor q = testing::RandomTensor({t, hq, d}, DType::kF32, 61, -2, 2);
  const Tensor k = testing::RandomTensor({t, hk, d}, DType::kF32, 62, -2, 2);
  const Tensor v = testing::RandomTensor({t, hk, d}, DType::kF32, 63);
  const Tensor d_o = testing::RandomTensor({t, hq, d}, DType::kF32, 64);
  AttentionOptions options;
  options.sigmoid = sigmoid;
  options.sigmoid_bias = sigmoid ? -std::log(192.0) : 0.0;
  Tensor o = Tensor::Empty(q.shape(), DType::kF32), lse = Tensor::Empty({t, hq}, DType::kF32);
  SoftmaxAttentionForward(q, k, v, rows, rows, options, o, lse);
  Tensor dq = Tensor::Empty(q.shape(), DType::kF32), dk = Tensor::Empty(k.shape(), DType::kF32),
         dv = Tensor::Empty(v.shape(), DType::kF32);
  SoftmaxAttentionBackward(q, k, v, o, lse, d_o, rows, rows, options, dq, dk, dv);

  std::unique_ptr<Communicator> world = SoloWorld();
  CpAttentionOptions cp;
  cp.scheme = scheme;
  CpAttentionSaved saved;
  const Tensor gq = ToGpu(q), gk = ToGpu(k), gv = ToGpu(v), gdo = ToGpu(d_o);
  Tensor go = PoisonedGpu(q.shape(), DType::kF32), glse = PoisonedGpu({t, hq}, DType::kF32);
  ASSERT_TRUE(CpAttentionForward(*world, cp, *layout, gq, gk, gv, rows, options, go, glse, &saved).ok());
  Tensor gdq = PoisonedGpu(q.shape(), DType::kF32), gdk = PoisonedGpu(k.shape(), DType::kF32),
         gdv = PoisonedGpu(v.shape(), DType::kF32);
  ASSERT_TRUE(
      CpAttentionBackward(*world, cp, *layout, gq, gk, gv, go, glse, gdo, rows, options, &saved, gdq, gdk, gdv).ok());
  CudaSynchronize();
  std::printf("[cp %s%s%s]\n", CpSoftmaxSchemeName(scheme), docs ? " docs" : "", sigmoid ? " sigmoid" : "");
  EXPECT_TRUE(NormwiseClose(go, o, "o", kRel));
  if (!sigmoid) {
    EXPECT_TRUE(NormwiseClose(glse, lse, "lse", kRel));
  }
  EXPECT_TRUE(NormwiseClose(gdq, dq, "dq", kRel));
  EXPECT_TRUE(NormwiseClose(gdk, dk, "dk", kRel));
  EXPECT_TRUE(NormwiseClose(gdv, dv, "dv", kRel));
}

TEST(GpuCpAttentionF32, RingOnCudaTensorsMatchesTheSingleProcessOp) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCpCase(CpSoftmaxScheme::kRing, false, false);
  RunCpCase(CpSoftmaxScheme::kRing, true, false);
  RunCpCase(CpSoftmaxScheme::kRing, false, true);
}

TEST(GpuCpAttentionF32, AllGatherOnCudaTensorsMatchesTheSingleProcessOp) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCpCase(CpSoftmaxScheme::kAllGather, false, false);
  RunCpCase(CpSoftmaxScheme::kAllGather, true, false);
}

}  // namespace
}  // namespace loom::ops
