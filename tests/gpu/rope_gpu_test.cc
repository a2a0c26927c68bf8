// The CUDA RoPE against the CPU reference on the same inputs and the same
// RopeTable (plain and YaRN, whose attention factor is != 1), f32 and bf16.
#include <gtest/gtest.h>

#include "ops/rope.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom {
namespace {

using loom::testing::ToCpu;
using loom::testing::ToGpu;

ops::RopeTable Table(const std::string& type, int64_t head_dim) {
  config::RopeScaling r;
  r.set_type(type);
  if (type != "default") {
    r.set_factor(8);
    r.set_original_max_position_embeddings(256);
  }
  absl::StatusOr<ops::RopeTable> t = ops::RopeTable::FromConfig(500000, r, head_dim);
  LOOM_CHECK(t.ok(), t.status().message());
  return *t;
}

Tensor Positions(int64_t count, uint64_t seed) {
  std::vector<int32_t> p(count);
  for (int64_t i = 0; i < count; ++i) p[i] = static_cast<int32_t>((i * 7919 + seed * 104729) % 32768);
  return Tensor::FromVector(p, {count});
}

TEST(GpuRope, MatchesCpuReference_F32) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Case { int64_t t, h, d; const char* type; };
  // D = 6 and 10: pairs not a multiple of 4 (one pair a thread); 11 heads:
  // a partial block of heads.
  for (const Case& c : {Case{37, 4, 64, "default"}, Case{129, 2, 128, "yarn"}, Case{5, 8, 16, "llama3"},
                        Case{300, 1, 256, "yarn"}, Case{17, 3, 6, "default"}, Case{9, 11, 10, "yarn"},
                        Case{50, 11, 64, "llama3"}}) {
    SCOPED_TRACE(internal::StreamCat("T ", c.t, " H ", c.h, " D ", c.d, " ", c.type));
    const ops::RopeTable table = Table(c.type, c.d);
    const Tensor x = testing::RandomTensor({c.t, c.h, c.d}, DType::kF32, 1);
    const Tensor pos = Positions(c.t, 3);
    Tensor y = Tensor::Empty(x.shape(), DType::kF32), dx = Tensor::Empty(x.shape(), DType::kF32);
    ops::RopeForward(x, pos, table, y);
    ops::RopeBackward(x, pos, table, dx);
    const Tensor gpos = ToGpu(pos);
    Tensor gy = Tensor::Empty(x.shape(), DType::kF32, Device::Cuda(0));
    Tensor gdx = ToGpu(x);  // in place, as the model calls it
    ops::RopeForward(ToGpu(x), gpos, table, gy);
    ops::RopeBackward(gdx, gpos, table, gdx);
    // Both compute in double and round once to f32.
    EXPECT_TRUE(testing::AllClose(ToCpu(gy), y, 1e-6, 1e-6));
    EXPECT_TRUE(testing::AllClose(ToCpu(gdx), dx, 1e-6, 1e-6));
  }
}

TEST(GpuRope, MatchesCpuReference_Bf16) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Case { int64_t t, h, d; };
  for (const Case& c : {Case{64, 4, 128}, Case{96, 32, 64}, Case{7, 5, 6}}) {  // the last: one pair a thread
    SCOPED_TRACE(internal::StreamCat("T ", c.t, " H ", c.h, " D ", c.d));
    const ops::RopeTable table = Table("yarn", c.d);
    const Tensor x32 = testing::RandomTensor({c.t, c.h, c.d}, DType::kF32, 5).To(DType::kBF16).To(DType::kF32);
    const Tensor pos = Positions(c.t, 9);
    Tensor y = Tensor::Empty(x32.shape(), DType::kF32);
    ops::RopeForward(x32, pos, table, y);
    Tensor gy = ToGpu(x32.To(DType::kBF16));
    ops::RopeForward(gy, ToGpu(pos), table, gy);
    // The CPU result of the same bf16 inputs, rounded once more to bf16
    // (relative 2^-8) on the GPU.
    EXPECT_TRUE(testing::AllClose(ToCpu(gy).To(DType::kF32), y, 1.0 / 128, 1e-3));
  }
}

// The packed q, k, v (RopeQkvForward / RopeQkvBackward) against the CPU:
// f32 to 1e-6 (v and dv copied exactly), and bf16 as above; D = 64 takes
// the 4-pair loads, D = 6 one pair a thread.
TEST(GpuRope, QkvMatchesCpuReference) {
  LOOM_SKIP_WITHOUT_GPU();
  struct Case { int64_t t, hq, hk, d; DType dtype; };
  for (const Case& c : {Case{100, 32, 4, 64, DType::kF32}, Case{33, 6, 3, 6, DType::kF32},
                        Case{64, 8, 2, 128, DType::kBF16}, Case{21, 32, 4, 64, DType::kBF16}}) {
    SCOPED_TRACE(internal::StreamCat("T ", c.t, " Hq ", c.hq, " Hk ", c.hk, " D ", c.d, " ", DTypeName(c.dtype)));
    const ops::RopeTable table = Table("yarn", c.d);
    const int64_t h = c.hq + 2 * c.hk;
    // Inputs exact in the dtype; the CPU computes in f32 on them.
    const auto random = [&](const Shape& shape, uint64_t seed) {
      return testing::RandomTensor(shape, c.dtype, seed).To(DType::kF32);
    };
    const Tensor qkv = random({c.t, h, c.d}, 1), dq = random({c.t, c.hq, c.d}, 2), dk = random({c.t, c.hk, c.d}, 3),
                 dv = random({c.t, c.hk, c.d}, 4);
    const Tensor pos = Positions(c.t, 5);
    Tensor q = Tensor::Empty(dq.shape(), DType::kF32), k = Tensor::Empty(dk.shape(), DType::kF32),
           v = Tensor::Empty(dv.shape(), DType::kF32), dqkv = Tensor::Empty(qkv.shape(), DType::kF32);
    ops::RopeQkvForward(qkv, pos, table, q, k, v);
    ops::RopeQkvBackward(dq, dk, dv, pos, table, dqkv);
    const auto gpu = [&](const Tensor& t) { return ToGpu(t.To(c.dtype)); };
    const Tensor gpos = ToGpu(pos);
    Tensor gq = testing::PoisonedGpu(q.shape(), c.dtype), gk = testing::PoisonedGpu(k.shape(), c.dtype),
           gv = testing::PoisonedGpu(v.shape(), c.dtype), gdqkv = testing::PoisonedGpu(qkv.shape(), c.dtype);
    ops::RopeQkvForward(gpu(qkv), gpos, table, gq, gk, gv);
    ops::RopeQkvBackward(gpu(dq), gpu(dk), gpu(dv), gpos, table, gdqkv);
    const double rtol = c.dtype == DType::kF32 ? 1e-6 : 1.0 / 128, atol = c.dtype == DType::kF32 ? 1e-6 : 1e-3;
    const auto f32 = [](const Tensor& g) { return ToCpu(g).To(DType::kF32); };
    EXPECT_TRUE(testing::AllClose(f32(gq), q, rtol, atol)) << "q";
    EXPECT_TRUE(testing::AllClose(f32(gk), k, rtol, atol)) << "k";
    EXPECT_TRUE(testing::AllClose(f32(gv), v, 0, 0)) << "v";
    EXPECT_TRUE(testing::AllClose(f32(gdqkv), dqkv, rtol, atol)) << "dqkv";
  }
}

}  // namespace
}  // namespace loom
