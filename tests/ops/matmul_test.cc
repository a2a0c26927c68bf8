#include "ops/matmul.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

using testing::AllClose;
using testing::RandomTensor;

// c = alpha · op(a) · op(b) + beta · c by three loops, in double.
Tensor DirectMatmul(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c0, double alpha, double beta) {
  const int64_t m = c0.dim(0), n = c0.dim(1), k = ta ? a.dim(0) : a.dim(1);
  Tensor c = Tensor::Empty({m, n}, DType::kF64);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a.Get(p * a.dim(1) + i) : a.Get(i * a.dim(1) + p);
        const double bv = tb ? b.Get(j * b.dim(1) + p) : b.Get(p * b.dim(1) + j);
        s += av * bv;
      }
      c.data<double>()[i * n + j] = alpha * s + beta * c0.Get(i * n + j);
    }
  }
  return c;
}

TEST(Matmul, MatchesDirectLoopsForEveryTransposeWithAlphaBeta) {
  const int64_t m = 5, n = 7, k = 3;
  for (DType dtype : {DType::kF64, DType::kF32}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        Tensor a = RandomTensor(ta ? Shape{k, m} : Shape{m, k}, dtype, 1);
        Tensor b = RandomTensor(tb ? Shape{n, k} : Shape{k, n}, dtype, 2);
        Tensor c0 = RandomTensor({m, n}, dtype, 3);
        Tensor c = c0.Clone();
        ops::Matmul(a, ta, b, tb, c, 0.7, 0.3);
        const double rtol = dtype == DType::kF64 ? 1e-13 : 1e-5;
        EXPECT_TRUE(AllClose(c, DirectMatmul(a, ta, b, tb, c0, 0.7, 0.3), rtol, rtol))
            << DTypeName(dtype) << " trans_a " << ta << " trans_b " << tb;
      }
    }
  }
}

TEST(Matmul, BetaZeroIgnoresWhateverCHeld) {
  Tensor a = RandomTensor({4, 3}, DType::kF64, 1), b = RandomTensor({3, 2}, DType::kF64, 2);
  Tensor c = Tensor::Empty({4, 2}, DType::kF64);
  c.Fill(std::nan(""));
  ops::Matmul(a, false, b, false, c);
  EXPECT_TRUE(AllClose(c, DirectMatmul(a, false, b, false, Tensor::Zeros({4, 2}, DType::kF64), 1, 0), 1e-13, 1e-13));
}

TEST(Matmul, ReadsHigherRankTensorsAsRowsByLastDim) {
  Tensor a = RandomTensor({2, 3, 4}, DType::kF64, 1), b = RandomTensor({5, 4}, DType::kF64, 2);
  Tensor c = Tensor::Empty({2, 3, 5}, DType::kF64);
  ops::Matmul(a, false, b, true, c);
  Tensor expected = DirectMatmul(a.Reshape({6, 4}), false, b, true, Tensor::Zeros({6, 5}, DType::kF64), 1, 0);
  EXPECT_TRUE(AllClose(c, expected, 1e-13, 1e-13));
}

TEST(Matmul, EmptyInnerDimensionScalesCByBeta) {
  Tensor a = Tensor::Empty({3, 0}, DType::kF64), b = Tensor::Empty({0, 2}, DType::kF64);
  Tensor c0 = RandomTensor({3, 2}, DType::kF64, 1);
  Tensor c = c0.Clone();
  ops::Matmul(a, false, b, false, c, 1.0, 0.5);
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_DOUBLE_EQ(c.Get(i), 0.5 * c0.Get(i));
}

// The transposed products that make a matmul's gradient, held to finite
// differences of loss = Σ (a·b) ⊙ r: da = r·bᵀ, db = aᵀ·r.
TEST(Matmul, TransposedProductsGiveFiniteDifferenceGradients) {
  Tensor a = RandomTensor({4, 6}, DType::kF64, 1), b = RandomTensor({6, 3}, DType::kF64, 2);
  Tensor r = RandomTensor({4, 3}, DType::kF64, 3);
  Tensor c = Tensor::Empty({4, 3}, DType::kF64);
  auto loss = [&] {
    ops::Matmul(a, false, b, false, c);
    return testing::Dot(c, r);
  };
  Tensor da = Tensor::Empty(a.shape(), DType::kF64), db = Tensor::Empty(b.shape(), DType::kF64);
  ops::Matmul(r, false, b, true, da);
  ops::Matmul(a, true, r, false, db);
  testing::ExpectGradientsMatch(loss, {{"a", a, da}, {"b", b, db}});
}

TEST(MatmulDeathTest, MismatchedInnerDimensionsNameTheOp) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Tensor a = Tensor::Zeros({4, 3}, DType::kF32), b = Tensor::Zeros({4, 2}, DType::kF32);
  Tensor c = Tensor::Zeros({4, 2}, DType::kF32);
  EXPECT_DEATH(ops::Matmul(a, false, b, false, c), "\\[matmul\\] inner dimensions differ");
  // aᵀ·b is [3, 2], not c's [4, 2].
  EXPECT_DEATH(ops::Matmul(a, true, b, false, c), "\\[matmul\\] c is");
}

}  // namespace
}  // namespace loom
