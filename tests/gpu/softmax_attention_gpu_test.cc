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

// Long rows of many documents: each query tile walks only the key tiles of
// its own documents and each key tile only the query tiles of its own
// (ops/cuda/flash_common.cuh); tiles inside one document skip the mask.
TEST(GpuFlashAttention, ManyDocumentsSkipOtherDocumentsTiles) {
  LOOM_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<int32_t>> docs = {{100, 700, 5, 300, 943}, {128, 128, 256, 488}};
  RunCase(kLoom, Case{.name = "many docs causal GQA", .d = 128, .hq = 4, .hk = 1, .q_lens = {2048, 1000},
                      .doc_lens = docs});
  RunCase(kLoom, Case{.name = "many docs full D64", .d = 64, .hq = 2, .hk = 2, .q_lens = {2048, 1000},
                      .doc_lens = docs, .causal = false});
  RunCase(kLoom, Case{.name = "det many docs causal", .d = 128, .hq = 4, .hk = 2, .q_lens = {2048, 1000},
                      .doc_lens = docs, .deterministic = true});
}

// A ring block with documents: a later query chunk (positions 600..899)
// whose first document began in the key chunk (positions 0..599, documents
// 0, 1, 2 from 0, 100, 400) and whose second sees no key (o = 0,
// lse = −∞); the key tiles before 400 meet no query (dk = dv = 0).
TEST(GpuFlashAttention, RingBlockWithDocuments) {
  LOOM_SKIP_WITHOUT_GPU();
  for (bool det : {false, true})
    RunCase(kLoom, Case{.name = det ? "det ring block docs" : "ring block docs", .d = 128, .hq = 4, .hk = 2,
                        .q_lens = {300}, .k_lens = {600}, .doc_lens = {{50, 250}}, .k_doc_lens = {{100, 300, 200}},
                        .q_first_doc = 2, .q_offset = 600, .deterministic = det});
}

// Tokens past the last row are in no row and may hold anything: NaN there
// must not reach the rows' outputs (the kernels' loads run past a row's end).
TEST(GpuFlashAttention, NanTokensPastTheRowsStayOut) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "nan tail causal D128", .d = 128, .hq = 4, .hk = 2, .q_lens = {200, 70}, .nan_tail = 100});
  RunCase(kLoom, Case{.name = "nan tail full D64", .d = 64, .hq = 2, .hk = 2, .q_lens = {130}, .causal = false,
                      .nan_tail = 60});
  RunCase(kLoom, Case{.name = "nan tail det D128", .d = 128, .hq = 2, .hk = 1, .q_lens = {300}, .deterministic = true,
                      .nan_tail = 130});
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

// AttentionOptions::deterministic: dq from the in-order dQ pass instead of
// atomics; every mask kind against the CPU reference.
TEST(GpuFlashAttention, DeterministicBackwardMatchesCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "det causal GQA varlen D128", .d = 128, .hq = 6, .hk = 2, .q_lens = {64, 300, 17},
                      .deterministic = true});
  RunCase(kLoom, Case{.name = "det full GQA varlen D64", .d = 64, .hq = 8, .hk = 2, .q_lens = {70, 230, 1, 129},
                      .causal = false, .deterministic = true});
  RunCase(kLoom, Case{.name = "det q_offset 256", .d = 128, .hq = 4, .hk = 2, .q_lens = {100}, .k_lens = {300},
                      .q_offset = 256, .deterministic = true});
  RunCase(kLoom, Case{.name = "det k_offset 100", .d = 128, .hq = 4, .hk = 4, .q_lens = {260}, .k_lens = {260},
                      .k_offset = 100, .deterministic = true});
  RunCase(kLoom, Case{.name = "det docs causal", .d = 128, .hq = 4, .hk = 2, .q_lens = {300, 150},
                      .doc_lens = {{40, 200, 60}, {1, 149}}, .deterministic = true});
  RunCase(kLoom, Case{.name = "det sigmoid causal D64", .d = 64, .hq = 4, .hk = 2, .q_lens = {150, 260},
                      .sigmoid = true, .deterministic = true});
  RunCase(kLoom, Case{.name = "det causal 2048 GQA", .d = 128, .hq = 4, .hk = 1, .q_lens = {2048},
                      .deterministic = true});
}

// Two deterministic backward passes on the same inputs give the same bits
// (dq, dk, dv); the atomic pass gives the same dk, dv and a dq within the
// tests' bf16 tolerance.
TEST(GpuFlashAttention, DeterministicBackwardIsBitwiseRepeatable) {
  LOOM_SKIP_WITHOUT_GPU();
  const TokenRows rows = gpu_test::Rows({1500, 548}, {});
  const int64_t t = 2048, hq = 8, hk = 2, d = 128;
  const Tensor q = gpu_test::ToGpu(testing::RandomTensor({t, hq, d}, DType::kF32, 61, -2, 2).To(DType::kBF16));
  const Tensor k = gpu_test::ToGpu(testing::RandomTensor({t, hk, d}, DType::kF32, 62, -2, 2).To(DType::kBF16));
  const Tensor v = gpu_test::ToGpu(testing::RandomTensor({t, hk, d}, DType::kF32, 63).To(DType::kBF16));
  const Tensor d_o = gpu_test::ToGpu(testing::RandomTensor({t, hq, d}, DType::kF32, 64).To(DType::kBF16));
  const cuda::CudaTokenRows grows = cuda::ToDevice(rows, 0);
  AttentionOptions options;
  auto bf16 = [](const Shape& s) { return gpu_test::PoisonedGpu(s, DType::kBF16); };
  Tensor o = bf16(q.shape()), lse = gpu_test::PoisonedGpu({t, hq}, DType::kF32);
  cuda::FlashAttentionForward(q, k, v, grows, grows, options, o, lse);
  Tensor dq_atomic = bf16(q.shape()), dk_atomic = bf16(k.shape()), dv_atomic = bf16(v.shape());
  cuda::FlashAttentionBackward(q, k, v, o, lse, d_o, grows, grows, options, dq_atomic, dk_atomic, dv_atomic);
  options.deterministic = true;
  Tensor dq[2] = {bf16(q.shape()), bf16(q.shape())}, dk[2] = {bf16(k.shape()), bf16(k.shape())},
         dv[2] = {bf16(v.shape()), bf16(v.shape())};
  for (int run = 0; run < 2; ++run)
    cuda::FlashAttentionBackward(q, k, v, o, lse, d_o, grows, grows, options, dq[run], dk[run], dv[run]);
  CudaSynchronize();
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dq[0]), gpu_test::ToCpu(dq[1]), 0, 0)) << "dq";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dk[0]), gpu_test::ToCpu(dk[1]), 0, 0)) << "dk";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dv[0]), gpu_test::ToCpu(dv[1]), 0, 0)) << "dv";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dk_atomic), gpu_test::ToCpu(dk[0]), 0, 0)) << "dk, atomic pass";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dv_atomic), gpu_test::ToCpu(dv[0]), 0, 0)) << "dv, atomic pass";
  EXPECT_TRUE(gpu_test::Close(dq_atomic, gpu_test::ToCpu(dq[0]), 1e-2, 3e-2, 2e-2)) << "dq, atomic pass";
}

// Several full key tiles per block (the forward streams 128-key tiles
// through two shared-memory stages), without a causal mask, for both head
// dims; row lengths that are not multiples of the tile.
TEST(GpuFlashAttention, LongRowsFullManyKeyTiles) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCase(kLoom, Case{.name = "full GQA D64 many tiles", .d = 64, .hq = 4, .hk = 2, .q_lens = {1100, 700},
                      .causal = false});
  RunCase(kLoom, Case{.name = "full GQA D128 many tiles", .d = 128, .hq = 2, .hk = 1, .q_lens = {1500},
                      .causal = false});
}

// The ops:: entry points with bf16 CUDA tensors and host rows (as the model
// calls them) run Loom's flash kernels: forward bit for bit, dk and dv bit
// for bit (each written once from registers); dq is summed with atomics in
// no fixed order, so it may differ by one bf16 rounding (2^-8 relative).
TEST(GpuFlashAttention, OpsEntryWithBf16TensorsRunsTheFlashKernels) {
  LOOM_SKIP_WITHOUT_GPU();
  const TokenRows rows = gpu_test::Rows({200, 333}, {{50, 150}, {333}});
  const int64_t t = 533, hq = 4, hk = 2, d = 64;
  const Tensor q = gpu_test::ToGpu(testing::RandomTensor({t, hq, d}, DType::kF32, 51, -2, 2).To(DType::kBF16));
  const Tensor k = gpu_test::ToGpu(testing::RandomTensor({t, hk, d}, DType::kF32, 52, -2, 2).To(DType::kBF16));
  const Tensor v = gpu_test::ToGpu(testing::RandomTensor({t, hk, d}, DType::kF32, 53).To(DType::kBF16));
  const Tensor d_o = gpu_test::ToGpu(testing::RandomTensor({t, hq, d}, DType::kF32, 54).To(DType::kBF16));
  AttentionOptions options;  // backend kLoom by default
  auto bf16 = [](const Shape& s) { return gpu_test::PoisonedGpu(s, DType::kBF16); };
  Tensor o = bf16(q.shape()), lse = gpu_test::PoisonedGpu({t, hq}, DType::kF32);
  Tensor dq = bf16(q.shape()), dk = bf16(k.shape()), dv = bf16(v.shape());
  SoftmaxAttentionForward(q, k, v, rows, rows, options, o, lse);
  SoftmaxAttentionBackward(q, k, v, o, lse, d_o, rows, rows, options, dq, dk, dv);

  const cuda::CudaTokenRows grows = cuda::ToDevice(rows, 0);
  Tensor fo = bf16(q.shape()), flse = gpu_test::PoisonedGpu({t, hq}, DType::kF32);
  Tensor fdq = bf16(q.shape()), fdk = bf16(k.shape()), fdv = bf16(v.shape());
  cuda::FlashAttentionForward(q, k, v, grows, grows, options, fo, flse);
  cuda::FlashAttentionBackward(q, k, v, fo, flse, d_o, grows, grows, options, fdq, fdk, fdv);
  CudaSynchronize();
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(o), gpu_test::ToCpu(fo), 0, 0)) << "o";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(lse), gpu_test::ToCpu(flse), 0, 0)) << "lse";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dk), gpu_test::ToCpu(fdk), 0, 0)) << "dk";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dv), gpu_test::ToCpu(fdv), 0, 0)) << "dv";
  EXPECT_TRUE(testing::AllClose(gpu_test::ToCpu(dq), gpu_test::ToCpu(fdq), 1.0 / 128, 1e-6)) << "dq";
}

}  // namespace
}  // namespace loom::ops
