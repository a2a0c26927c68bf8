// The CUDA embedding against the CPU reference on the same inputs: the
// forward is a copy (exact in both dtypes); the backward accumulates into a
// pre-filled f32 dtable. The CPU adds a row's tokens one at a time into
// dtable, the GPU sums them in chunks of 32 and adds the sum: the same f32
// values in another order, so rtol 1e-5 with atol 1e-5 (sums of up to a few
// hundred terms of magnitude <= 1). bf16 dout: the CPU runs in f32 on the
// rounded values, and dtable stays f32 on both, so the tolerance is the same.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ops/embedding.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::AllClose;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
using loom::testing::PoisonedGpu;

constexpr double kGradRtol = 1e-5, kGradAtol = 1e-5;

// n ids in [0, vocab): every third one is `hot` (a run of sorted positions
// much longer than one chunk of 32), the rest uniform.
Tensor Ids(int64_t n, int64_t vocab, int32_t hot, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = i % 3 == 0 ? hot : dist(gen);
  return Tensor::FromVector(ids, {n});
}

struct Case {
  int64_t tokens, vocab, d;
};
// d 37: not a multiple of the 8-column vector; d 300: vectors and a partial
// 256-column slice; 1000 tokens: a partial last chunk.
constexpr Case kCases[] = {{1, 5, 8}, {1000, 50, 37}, {1000, 300, 64}, {2053, 40, 300}};

TEST(GpuEmbedding, ForwardAndBackwardMatchCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    for (const Case& c : kCases) {
      SCOPED_TRACE(internal::StreamCat(DTypeName(dtype), " tokens ", c.tokens, " vocab ", c.vocab, " d ", c.d));
      const Tensor ids = Ids(c.tokens, c.vocab, 3 % c.vocab, 1);
      const Tensor table = testing::RandomTensor({c.vocab, c.d}, dtype, 2);
      const Tensor dout = testing::RandomTensor({c.tokens, c.d}, dtype, 3);
      const Tensor dtable0 = testing::RandomTensor({c.vocab, c.d}, DType::kF32, 4);

      Tensor out = Tensor::Empty({c.tokens, c.d}, DType::kF32), dtable = dtable0.Clone();
      ops::EmbeddingForward(ids, table.To(DType::kF32), out);
      ops::EmbeddingBackward(ids, dout.To(DType::kF32), dtable);

      const Tensor gids = ToGpu(ids);
      Tensor gout = PoisonedGpu({c.tokens, c.d}, dtype), gdtable = ToGpu(dtable0);
      ops::EmbeddingForward(gids, ToGpu(table), gout);
      ops::EmbeddingBackward(gids, ToGpu(dout), gdtable);
      EXPECT_TRUE(AllClose(ToCpu(gout).To(DType::kF32), out, 0, 0)) << "forward (a copy: exact)";
      EXPECT_TRUE(AllClose(ToCpu(gdtable), dtable, kGradRtol, kGradAtol)) << "backward";
    }
  }
}

// The vocab-parallel slice: the table holds global rows [first, first + V);
// ids outside give zero rows and no gradient (rows of dtable they would hit
// do not exist; the rest must match).
TEST(GpuEmbedding, SliceMatchesCpuReferenceWithIdsOutside) {
  LOOM_SKIP_WITHOUT_GPU();
  constexpr int64_t kVocab = 120, kFirst = 40, kRows = 50, kTokens = 3001, kD = 72;
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    const Tensor ids = Ids(kTokens, kVocab, /*hot=*/kFirst + 7, 5);
    const Tensor table = testing::RandomTensor({kRows, kD}, dtype, 6);
    const Tensor dout = testing::RandomTensor({kTokens, kD}, dtype, 7);
    const Tensor dtable0 = testing::RandomTensor({kRows, kD}, DType::kF32, 8);

    Tensor out = Tensor::Empty({kTokens, kD}, DType::kF32), dtable = dtable0.Clone();
    ops::EmbeddingForwardSlice(ids, table.To(DType::kF32), kFirst, out);
    ops::EmbeddingBackwardSlice(ids, dout.To(DType::kF32), kFirst, dtable);

    const Tensor gids = ToGpu(ids);
    Tensor gout = PoisonedGpu({kTokens, kD}, dtype), gdtable = ToGpu(dtable0);
    ops::EmbeddingForwardSlice(gids, ToGpu(table), kFirst, gout);
    ops::EmbeddingBackwardSlice(gids, ToGpu(dout), kFirst, gdtable);
    EXPECT_TRUE(AllClose(ToCpu(gout).To(DType::kF32), out, 0, 0)) << "forward (a copy or zeros: exact)";
    EXPECT_TRUE(AllClose(ToCpu(gdtable), dtable, kGradRtol, kGradAtol)) << "backward";
  }
}

// The same backward twice from the same dtable gives the same bits.
TEST(GpuEmbedding, BackwardIsBitwiseDeterministic) {
  LOOM_SKIP_WITHOUT_GPU();
  constexpr int64_t kTokens = 8192, kVocab = 500, kD = 512;
  const Tensor gids = ToGpu(Ids(kTokens, kVocab, 17, 9));
  const Tensor gdout = ToGpu(testing::RandomTensor({kTokens, kD}, DType::kBF16, 10));
  const Tensor dtable0 = testing::RandomTensor({kVocab, kD}, DType::kF32, 11);
  Tensor a = ToGpu(dtable0), b = ToGpu(dtable0);
  ops::EmbeddingBackward(gids, gdout, a);
  ops::EmbeddingBackward(gids, gdout, b);
  const Tensor ha = ToCpu(a), hb = ToCpu(b);
  int64_t differ = 0, first = -1;
  for (int64_t i = 0; i < ha.numel(); ++i) {
    if (std::memcmp(ha.data<float>() + i, hb.data<float>() + i, sizeof(float)) != 0) {
      if (first < 0) first = i;
      ++differ;
    }
  }
  EXPECT_EQ(differ, 0) << "first at element " << first << ": " << (first >= 0 ? ha.Get(first) : 0) << " vs "
                       << (first >= 0 ? hb.Get(first) : 0);
  EXPECT_FALSE(AllClose(ha, dtable0, 0, 0)) << "the backward changed nothing";
}

}  // namespace
}  // namespace loom
