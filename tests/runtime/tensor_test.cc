#include "runtime/tensor.h"

#include <gtest/gtest.h>

#include "tests/testing.h"

namespace loom {
namespace {

TEST(Tensor, ReshapeAndSliceShareStorage) {
  Tensor t = Tensor::FromVector<float>({0, 1, 2, 3, 4, 5}, {3, 2});
  Tensor row = t.Slice(1, 2);
  EXPECT_EQ(row.shape(), (Shape{2, 2}));
  EXPECT_EQ(row.data<float>()[0], 2.0f);
  row.data<float>()[0] = 9;
  EXPECT_EQ(t.Reshape({6}).data<float>()[2], 9.0f);
}

TEST(Tensor, StackedJoinsOnlyBackToBackRows) {
  Tensor buf = Tensor::FromVector<float>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, {6, 2});
  const Tensor a = buf.Slice(0, 1), b = buf.Slice(1, 3), c = buf.Slice(4, 2);
  const Tensor abc = Tensor::Stacked({&a, &b, &c});
  ASSERT_TRUE(abc.defined());
  EXPECT_EQ(abc.shape(), (Shape{6, 2}));
  EXPECT_EQ(abc.raw(), buf.raw());
  const Tensor bc = Tensor::Stacked({&b, &c});
  ASSERT_TRUE(bc.defined());
  EXPECT_EQ(bc.shape(), (Shape{5, 2}));
  EXPECT_EQ(bc.data<float>()[0], 2.0f);
  EXPECT_FALSE(Tensor::Stacked({&a, &c}).defined());  // a gap
  EXPECT_FALSE(Tensor::Stacked({&b, &a}).defined());  // out of order
  const Tensor copy = b.Clone();
  EXPECT_FALSE(Tensor::Stacked({&a, &copy}).defined());  // another storage
  const Tensor wide = buf.Reshape({3, 4}).Slice(1, 1);   // starts where a's 2 rows of 2 would end
  const Tensor a2 = buf.Slice(0, 2);
  EXPECT_FALSE(Tensor::Stacked({&a2, &wide}).defined());  // another width
}

TEST(Tensor, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 lies halfway between two bf16 values; ties go to the even one (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
}

TEST(Tensor, ConversionsRoundTrip) {
  Tensor t = testing::RandomTensor({4, 5}, DType::kF64, 1);
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) {
    Tensor back = t.To(d).To(DType::kF64);
    const double rtol = d == DType::kF32 ? 1e-7 : d == DType::kF16 ? 1e-3 : 8e-3;
    EXPECT_TRUE(testing::AllClose(back, t, rtol, 1e-30)) << DTypeName(d);
  }
}

}  // namespace
}  // namespace loom
