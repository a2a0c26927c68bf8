// Shared by the GPU attention tests (Loom's kernels and cuDNN's): one case
// is drawn, run through the CPU reference in f32 on bf16-rounded inputs and
// through a CUDA backend, and every output and gradient is compared. See
// tests/gpu/softmax_attention_gpu_test.cc for where the tolerances come from.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ops/softmax_attention.h"
#include "runtime/cuda_runtime.h"
#include "tests/testing.h"

namespace loom::ops::gpu_test {

struct Case {
  std::string name;
  int64_t d = 128, hq = 4, hk = 4;
  std::vector<int32_t> q_lens;                // row lengths of q
  std::vector<int32_t> k_lens;                // empty: as q_lens
  std::vector<std::vector<int32_t>> doc_lens;  // per row, documents' lengths (q and k alike); empty: none
  std::vector<std::vector<int32_t>> k_doc_lens;  // k's own documents; empty: as doc_lens
  int32_t q_first_doc = 0;                       // q's doc ids count from here (k's from 0)
  bool causal = true;
  bool sigmoid = false;
  int64_t q_offset = 0, k_offset = 0;
  bool deterministic = false;  // Loom's backward: dq without atomics
  int64_t nan_tail = 0;        // GPU tensors hold this many NaN tokens past the last row (in no row)
};

// The case's mask and variant (sigmoid bias −log 1024).
inline AttentionOptions OptionsOf(const Case& c) {
  AttentionOptions options;
  options.causal = c.causal;
  options.sigmoid = c.sigmoid;
  options.sigmoid_bias = c.sigmoid ? -std::log(1024.0) : 0.0;
  options.q_offset = c.q_offset;
  options.k_offset = c.k_offset;
  options.deterministic = c.deterministic;
  return options;
}

using loom::testing::PoisonedGpu;
using loom::testing::ToCpu;
using loom::testing::ToGpu;
inline TokenRows Rows(const std::vector<int32_t>& lens, const std::vector<std::vector<int32_t>>& docs,
                      int32_t first_doc = 0) {
  std::vector<int32_t> cu{0};
  for (int32_t n : lens) cu.push_back(cu.back() + n);
  TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(cu, {static_cast<int64_t>(cu.size())});
  if (!docs.empty()) {
    std::vector<int32_t> ids;
    int32_t id = first_doc;
    for (const auto& row : docs)
      for (int32_t n : row) ids.insert(ids.end(), n, id++);
    EXPECT_EQ(static_cast<int32_t>(ids.size()), cu.back()) << "doc_lens must cover every row";
    rows.doc_ids = Tensor::FromVector(ids, {static_cast<int64_t>(ids.size())});
  }
  return rows;
}

// ‖a − b‖ / ‖b‖ ≤ rel over finite entries, and element-wise
// |a − b| ≤ atol_frac · max|b| + rtol · |b| (−∞ must match exactly).
inline ::testing::AssertionResult Close(const Tensor& gpu, const Tensor& ref, double rel, double atol_frac,
                                        double rtol) {
  const Tensor a = ToCpu(gpu);
  double num = 0, den = 0, maxabs = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.Get(i), y = ref.Get(i);
    if (std::isinf(y)) continue;
    num += (x - y) * (x - y);
    den += y * y;
    maxabs = std::max(maxabs, std::abs(y));
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (!(err <= rel))
    return ::testing::AssertionFailure() << "normwise error " << err << " > " << rel;
  return testing::AllClose(a, ref, rtol, atol_frac * std::max(maxabs, 1e-3));
}

inline void RunCase(cuda::AttentionBackend backend, const Case& c, bool backward = true) {
  SCOPED_TRACE(c.name);
  const std::vector<int32_t>& k_lens = c.k_lens.empty() ? c.q_lens : c.k_lens;
  const TokenRows q_rows = Rows(c.q_lens, c.doc_lens, c.q_first_doc),
                  k_rows = Rows(k_lens, c.k_doc_lens.empty() ? c.doc_lens : c.k_doc_lens);
  const int64_t tq = q_rows.end(q_rows.rows() - 1), tk = k_rows.end(k_rows.rows() - 1);
  // Inputs in bf16; the CPU reads the same values in f32.
  const Tensor q = testing::RandomTensor({tq, c.hq, c.d}, DType::kF32, 11, -2, 2).To(DType::kBF16);
  const Tensor k = testing::RandomTensor({tk, c.hk, c.d}, DType::kF32, 12, -2, 2).To(DType::kBF16);
  const Tensor v = testing::RandomTensor({tk, c.hk, c.d}, DType::kF32, 13).To(DType::kBF16);
  const Tensor d_o = testing::RandomTensor({tq, c.hq, c.d}, DType::kF32, 14).To(DType::kBF16);
  const Tensor q32 = q.To(DType::kF32), k32 = k.To(DType::kF32), v32 = v.To(DType::kF32), do32 = d_o.To(DType::kF32);

  const AttentionOptions options = OptionsOf(c);

  Tensor o = Tensor::Empty(q32.shape(), DType::kF32);
  Tensor lse = c.sigmoid ? Tensor() : Tensor::Empty({tq, c.hq}, DType::kF32);
  SoftmaxAttentionForward(q32, k32, v32, q_rows, k_rows, options, o, lse);
  Tensor dq = Tensor::Empty(q32.shape(), DType::kF32), dk = Tensor::Empty(k32.shape(), DType::kF32),
         dv = Tensor::Empty(v32.shape(), DType::kF32);
  SoftmaxAttentionBackward(q32, k32, v32, o, lse, do32, q_rows, k_rows, options, dq, dk, dv);

  const cuda::CudaTokenRows gq_rows = cuda::ToDevice(q_rows, 0), gk_rows = cuda::ToDevice(k_rows, 0);
  // The GPU's tensors, with c.nan_tail NaN tokens after the rows' tokens.
  auto on_gpu = [&c](const Tensor& t) {
    Shape shape = t.shape();
    shape[0] += c.nan_tail;
    Tensor padded = Tensor::Empty(shape, t.dtype());
    padded.Fill(std::numeric_limits<double>::quiet_NaN());
    if (t.dim(0) > 0) padded.Slice(0, t.dim(0)).CopyFrom(t);
    return ToGpu(padded);
  };
  // The rows' tokens of a GPU output, on the CPU.
  auto rows_of = [](const Tensor& g, int64_t n) { return ToCpu(g).Slice(0, n); };
  const Tensor gq = on_gpu(q), gk = on_gpu(k), gv = on_gpu(v), gdo = on_gpu(d_o);
  Tensor go = PoisonedGpu(gq.shape(), DType::kBF16);
  Tensor glse = c.sigmoid ? Tensor() : PoisonedGpu({gq.dim(0), c.hq}, DType::kF32);
  cuda::AttentionForward(backend, gq, gk, gv, gq_rows, gk_rows, options, go, glse);
  if (!backward) {
    CudaSynchronize();
    EXPECT_TRUE(Close(rows_of(go, tq), o, 1e-2, 3e-2, 2e-2)) << "o";
    if (!c.sigmoid) {
      EXPECT_TRUE(Close(rows_of(glse, tq), lse, 1e-4, 1e-3, 0)) << "lse";
    }
    return;
  }
  Tensor gdq = PoisonedGpu(gq.shape(), DType::kBF16), gdk = PoisonedGpu(gk.shape(), DType::kBF16),
         gdv = PoisonedGpu(gv.shape(), DType::kBF16);
  cuda::AttentionBackward(backend, gq, gk, gv, go, glse, gdo, gq_rows, gk_rows, options, gdq, gdk, gdv);
  CudaSynchronize();

  EXPECT_TRUE(Close(rows_of(go, tq), o, 1e-2, 3e-2, 2e-2)) << "o";
  if (!c.sigmoid) {
    EXPECT_TRUE(Close(rows_of(glse, tq), lse, 1e-4, 1e-3, 0)) << "lse";
  }
  EXPECT_TRUE(Close(rows_of(gdq, tq), dq, 1e-2, 3e-2, 2e-2)) << "dq";
  EXPECT_TRUE(Close(rows_of(gdk, tk), dk, 1e-2, 3e-2, 2e-2)) << "dk";
  EXPECT_TRUE(Close(rows_of(gdv, tk), dv, 1e-2, 3e-2, 2e-2)) << "dv";
}

}  // namespace loom::ops::gpu_test
