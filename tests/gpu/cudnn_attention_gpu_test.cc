// cuDNN's SDPA backend (ops/cuda/cudnn_attention.cu) against the CPU
// reference, with the cases and tolerances of softmax_attention_gpu_test.cc
// that cuDNN supports (uniform rows; documents inside rows and varlen rows
// as ragged sequences; softmax): each case runs the forward and
// the backward and checks o, lse, dq, dk and dv, all poisoned (NaN) before
// the call. A graph cuDNN refuses fails the test with cuDNN's reason.
#include <gtest/gtest.h>

#include <optional>
#include <vector>

#include "ops/softmax_attention.h"
#include "runtime/cuda_runtime.h"
#include "tests/gpu/attention_gpu_cases.h"

namespace loom::ops {
namespace {

using gpu_test::Case;

void RunCudnn(const Case& c) {
  // Ask first, so that an unsupported graph is a test failure with a reason
  // rather than an abort.
  const std::vector<int32_t>& k_lens = c.k_lens.empty() ? c.q_lens : c.k_lens;
  int64_t tq = 0, tk = 0;
  for (int32_t n : c.q_lens) tq += n;
  for (int32_t n : k_lens) tk += n;
  const Tensor q = Tensor::Empty({tq, c.hq, c.d}, DType::kBF16, Device::Cuda(0));
  const Tensor k = Tensor::Empty({tk, c.hk, c.d}, DType::kBF16, Device::Cuda(0));
  AttentionOptions options;
  options.causal = c.causal;
  options.q_offset = c.q_offset;
  options.k_offset = c.k_offset;
  const auto q_rows = cuda::ToDevice(gpu_test::Rows(c.q_lens, c.doc_lens), 0);
  const auto k_rows = cuda::ToDevice(gpu_test::Rows(k_lens, c.doc_lens), 0);
  const std::string why = cuda::CudnnAttentionUnsupported(q, k, k, q_rows, k_rows, options, /*with_backward=*/true);
  ASSERT_EQ(why, "") << c.name;
  gpu_test::RunCase(cuda::AttentionBackend::kCudnn, c, /*backward=*/true);
}

TEST(GpuCudnnAttention, CausalD128) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn causal D128", .d = 128, .hq = 4, .hk = 4, .q_lens = {256, 256}});
}

TEST(GpuCudnnAttention, FullD64OddLength) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn full D64", .d = 64, .hq = 2, .hk = 2, .q_lens = {200, 200, 200}, .causal = false});
}

TEST(GpuCudnnAttention, CausalGqa) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn causal GQA", .d = 128, .hq = 8, .hk = 2, .q_lens = {384, 384}});
}

// Documents inside rows run as ragged sequences: 5 documents (one of a
// single token) in a graph of 8 sequences (3 empty) of at most 512 tokens.
TEST(GpuCudnnAttention, DocumentsInsideRowsCausalGqaD64) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn documents GQA D64", .d = 64, .hq = 8, .hk = 2, .q_lens = {512, 512},
                .doc_lens = {{100, 300, 112}, {1, 511}}});
}

// 8 documents fill the 8 sequences of the graph (none empty); D = 128.
TEST(GpuCudnnAttention, DocumentsFillTheSequencesD128) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn 8 documents D128", .d = 128, .hq = 4, .hk = 4, .q_lens = {512, 512},
                .doc_lens = {{64, 64, 128, 256}, {200, 56, 128, 128}}});
}

// A long document beside a short one (sequences of up to 2048 tokens), and
// varlen rows without documents under a full mask.
TEST(GpuCudnnAttention, LongDocumentAndVarlenRows) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn long document", .d = 64, .hq = 4, .hk = 1, .q_lens = {2048},
                .doc_lens = {{2000, 48}}});
  RunCudnn(Case{.name = "cudnn varlen full", .d = 64, .hq = 4, .hk = 2, .q_lens = {300, 129, 77}, .causal = false});
}

// The shape of configs/default.textproto's softmax layers (hidden 128 over 4
// heads, 16-token rows, 64 rows): a head dim Loom's bf16 kernels lack.
TEST(GpuCudnnAttention, CausalD32ShortRows) {
  LOOM_SKIP_WITHOUT_GPU();
  RunCudnn(Case{.name = "cudnn causal D32", .d = 32, .hq = 4, .hk = 4, .q_lens = std::vector<int32_t>(64, 16)});
}

// What a bf16 call runs. model.attention_backend=loom on a GPU without
// Loom's flash kernels (not Hopper): cuDNN where cuDNN takes the call both
// ways, the f32 kernels where it does not (sigmoid attention, a
// deterministic backward); on a Hopper GPU, Loom's kernels.
// model.attention_backend=cudnn: cuDNN, or where it does not take the call
// Loom's kernels (on Hopper) or the f32 kernels. The paths themselves are
// checked against the CPU above, in softmax_attention_gpu_test.cc and in
// attention_f32_gpu_test.cc.
TEST(GpuAttentionFallback, WithoutFlashKernelsRunsCudnnOrF32) {
  LOOM_SKIP_WITHOUT_GPU();
  EXPECT_EQ(cuda::FlashAttentionRuns(0), CudaComputeCapability(0) == 90);
  const auto rows = cuda::ToDevice(gpu_test::Rows({256, 256}, {}), 0);
  for (const int64_t d : {int64_t{64}, int64_t{128}}) {
    const Tensor q = Tensor::Empty({512, 4, d}, DType::kBF16, Device::Cuda(0));
    const Tensor k = Tensor::Empty({512, 2, d}, DType::kBF16, Device::Cuda(0));
    AttentionOptions options;  // causal softmax, model.attention_backend = loom
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, /*flash_runs=*/true), AttentionBackend::kLoom);
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, false), AttentionBackend::kCudnn) << d;
    options.sigmoid = true;  // cuDNN has no sigmoid attention
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, true), AttentionBackend::kLoom);
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, false), std::nullopt) << d;
    options.sigmoid = false;
    options.deterministic = true;  // cuDNN's backward is not bitwise repeatable
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, false), std::nullopt) << d;
    options.deterministic = false;
    options.backend = AttentionBackend::kCudnn;
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, false), AttentionBackend::kCudnn);
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, true), AttentionBackend::kCudnn);
    options.q_offset = 256;  // a ring CP block: cuDNN refuses causal offsets
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, true), AttentionBackend::kLoom) << d;
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, k, k, rows, rows, options, false), std::nullopt) << d;
  }
  // Documents inside rows: cuDNN takes them (as ragged sequences) but not
  // with a ring CP block's offsets.
  const auto docs = cuda::ToDevice(gpu_test::Rows({256, 256}, {{100, 156}, {256}}), 0);
  ASSERT_EQ(docs.doc_bounds, (std::vector<int32_t>{0, 100, 256, 512}));
  EXPECT_EQ(docs.doc_max_len, 256);  // the second row is one document
  {
    const Tensor q = Tensor::Empty({512, 4, 64}, DType::kBF16, Device::Cuda(0));
    AttentionOptions options;
    options.backend = AttentionBackend::kCudnn;
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, q, q, docs, docs, options, true), AttentionBackend::kCudnn);
    options.q_offset = 256;
    EXPECT_EQ(SoftmaxAttentionBf16Backend(q, q, q, docs, docs, options, true), AttentionBackend::kLoom);
  }
  // A head dim Loom's bf16 kernels lack runs the f32 kernels on either GPU.
  const Tensor q32 = Tensor::Empty({512, 4, 32}, DType::kBF16, Device::Cuda(0));
  EXPECT_EQ(SoftmaxAttentionBf16Backend(q32, q32, q32, rows, rows, AttentionOptions{}, true), std::nullopt);
}

}  // namespace
}  // namespace loom::ops
