#include "ops/softmax_attention.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "tests/testing.h"

namespace loom::ops {
namespace {

using testing::AllClose;
using testing::RandomTensor;

// Golden tensors are head-major: [H, N, d] -> [N, H, d], [H, N] -> [N, H].
Tensor TokenMajor(const Tensor& t) {
  const int64_t h = t.dim(0), n = t.dim(1), d = t.ndim() == 3 ? t.dim(2) : 1;
  Tensor out = Tensor::Empty(t.ndim() == 3 ? Shape{n, h, d} : Shape{n, h}, DType::kF64);
  for (int64_t a = 0; a < h; ++a)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) out.data<double>()[(i * h + a) * d + c] = t.Get((a * n + i) * d + c);
  return out;
}

TokenRows Rows(const std::vector<int32_t>& cu_seqlens, const std::vector<int32_t>& doc_ids = {}) {
  TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(cu_seqlens, {static_cast<int64_t>(cu_seqlens.size())});
  if (!doc_ids.empty()) rows.doc_ids = Tensor::FromVector(doc_ids, {static_cast<int64_t>(doc_ids.size())});
  return rows;
}

// Document ids of consecutive documents of the given lengths, from `first`.
std::vector<int32_t> Docs(const std::vector<int32_t>& lengths, int32_t first = 0) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < lengths.size(); ++i) ids.insert(ids.end(), lengths[i], first + static_cast<int32_t>(i));
  return ids;
}

struct Outputs {
  Tensor o, lse;
};

Outputs Forward(const Tensor& q, const Tensor& k, const Tensor& v, const TokenRows& q_rows, const TokenRows& k_rows,
                const AttentionOptions& options) {
  Outputs out{Tensor::Empty(q.shape(), q.dtype()), Tensor::Empty({q.dim(0), q.dim(1)}, q.dtype())};
  SoftmaxAttentionForward(q, k, v, q_rows, k_rows, options, out.o, out.lse);
  return out;
}

struct Grads {
  Tensor dq, dk, dv;
};

Grads Backward(const Tensor& q, const Tensor& k, const Tensor& v, const Outputs& out, const Tensor& d_o,
               const TokenRows& q_rows, const TokenRows& k_rows, const AttentionOptions& options) {
  // Filled with garbage: the op must write every element.
  Grads g{Tensor::Empty(q.shape(), q.dtype()), Tensor::Empty(k.shape(), k.dtype()),
          Tensor::Empty(v.shape(), v.dtype())};
  g.dq.Fill(123);
  g.dk.Fill(123);
  g.dv.Fill(123);
  SoftmaxAttentionBackward(q, k, v, out.o, out.lse, d_o, q_rows, k_rows, options, g.dq, g.dk, g.dv);
  return g;
}

// ------------------------------------------------------------ golden vectors

const testing::GoldenCase& Golden() {
  static const testing::GoldenCase golden = testing::ReadGolden("attention.txt");
  return golden;
}

// One row of the golden case `name` through the f64 op; o and lse held to
// 1e-12 relative, an lse of −∞ (no visible key) exactly.
void ExpectMatchesGolden(const std::string& name, bool sigmoid) {
  const testing::GoldenCase& g = Golden();
  const Tensor q = TokenMajor(g.t(name + ".q")), k = TokenMajor(g.t(name + ".k")), v = TokenMajor(g.t(name + ".v"));
  const Tensor o_expected = TokenMajor(g.t(name + ".o"));
  AttentionOptions options;
  options.q_offset = static_cast<int64_t>(g.params.at(name + ".q_offset"));
  options.k_offset = static_cast<int64_t>(g.params.at(name + ".k_offset"));
  options.sigmoid = sigmoid;
  if (sigmoid) options.sigmoid_bias = g.params.at(name + ".sigmoid_bias");
  const TokenRows q_rows = TokenRows::Uniform(1, q.dim(0)), k_rows = TokenRows::Uniform(1, k.dim(0));

  Outputs out{Tensor::Empty(q.shape(), DType::kF64), Tensor::Empty({q.dim(0), q.dim(1)}, DType::kF64)};
  out.lse.Fill(7);  // sigmoid must leave it alone
  SoftmaxAttentionForward(q, k, v, q_rows, k_rows, options, out.o, out.lse);
  EXPECT_TRUE(AllClose(out.o, o_expected, 1e-12, 1e-13)) << name << ": o";

  if (sigmoid) {
    for (int64_t i = 0; i < out.lse.numel(); ++i) ASSERT_EQ(out.lse.Get(i), 7.0) << name << ": lse written at " << i;
    return;
  }
  const Tensor lse_expected = TokenMajor(g.t(name + ".lse"));
  ASSERT_EQ(out.lse.numel(), lse_expected.numel());
  for (int64_t i = 0; i < out.lse.numel(); ++i) {
    const double x = out.lse.Get(i), y = lse_expected.Get(i);
    if (std::isinf(y)) {
      EXPECT_EQ(x, y) << name << ": lse element " << i << " of a query that sees no key";
    } else {
      EXPECT_LE(std::abs(x - y), 1e-13 + 1e-12 * std::abs(y)) << name << ": lse element " << i << ": " << x
                                                              << " vs expected " << y;
    }
  }
}

// Each document of each row becomes a row: a document that runs on past a
// row's end is cut there.
TEST(TokenRows, SplitAtDocumentsGivesEachDocumentOfEachRow) {
  TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(std::vector<int32_t>{0, 5, 9}, {3});
  rows.doc_ids = Tensor::FromVector(std::vector<int32_t>{0, 0, 1, 1, 1, 1, 1, 2, 2}, {9});
  auto ints = [](const Tensor& t) { return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel()); };
  const DocumentRows docs = SplitAtDocuments(rows);
  EXPECT_EQ(ints(docs.rows.cu_seqlens), (std::vector<int32_t>{0, 2, 5, 7, 9}));
  EXPECT_EQ(docs.first, (std::vector<int64_t>{0, 2, 4}));
  EXPECT_FALSE(docs.rows.has_docs());
  const DocumentRows plain = SplitAtDocuments(TokenRows::Uniform(2, 3));  // one document a row
  EXPECT_EQ(ints(plain.rows.cu_seqlens), (std::vector<int32_t>{0, 3, 6}));
  EXPECT_EQ(plain.first, (std::vector<int64_t>{0, 1, 2}));
}

// The kernels bound their tiles by the documented order of doc ids
// (non-decreasing within a row; a new row may start anywhere), so ids that
// go down inside a row stop with the row and token named.
TEST(TokenRows, DocumentsMustNotDecreaseWithinARow) {
  TokenRows rows;
  rows.cu_seqlens = Tensor::FromVector(std::vector<int32_t>{0, 3, 6}, {3});
  rows.doc_ids = Tensor::FromVector(std::vector<int32_t>{4, 5, 5, 0, 1, 1}, {6});
  CheckDocumentsInOrder(rows, "test", "rows");  // down from 5 to 0 only across rows
  rows.doc_ids = Tensor::FromVector(std::vector<int32_t>{0, 1, 1, 2, 3, 2}, {6});
  EXPECT_DEATH(CheckDocumentsInOrder(rows, "test", "rows"), "\\[test\\] rows.doc_ids decrease at token 5 in row 1");
}

TEST(SoftmaxAttention, MatchesGolden_Causal) { ExpectMatchesGolden("causal", false); }
TEST(SoftmaxAttention, MatchesGolden_OffsetBlock) { ExpectMatchesGolden("offset_block", false); }
TEST(SoftmaxAttention, MatchesGolden_PastBlock) { ExpectMatchesGolden("past_block", false); }
TEST(SoftmaxAttention, MatchesGolden_FutureBlockIsFullyMasked) { ExpectMatchesGolden("future_block", false); }
TEST(SoftmaxAttention, MatchesGolden_Sigmoid) { ExpectMatchesGolden("sigmoid", true); }

// ------------------------------------------------------------ gradients

struct GradCase {
  int64_t hq = 4, hk = 2, d = 8;
  TokenRows q_rows, k_rows;
  AttentionOptions options;
};

// Loss Σ o ⊙ w for random w: its gradients are the backward with d_o = w.
void ExpectGradientsMatchFiniteDifferences(const GradCase& c) {
  const int64_t tq = c.q_rows.end(c.q_rows.rows() - 1), tk = c.k_rows.end(c.k_rows.rows() - 1);
  const Tensor q = RandomTensor({tq, c.hq, c.d}, DType::kF64, 1, -1.5, 1.5);
  const Tensor k = RandomTensor({tk, c.hk, c.d}, DType::kF64, 2, -1.5, 1.5);
  const Tensor v = RandomTensor({tk, c.hk, c.d}, DType::kF64, 3);
  const Tensor w = RandomTensor({tq, c.hq, c.d}, DType::kF64, 4);
  auto loss = [&] { return testing::Dot(Forward(q, k, v, c.q_rows, c.k_rows, c.options).o, w); };
  const Outputs out = Forward(q, k, v, c.q_rows, c.k_rows, c.options);
  const Grads g = Backward(q, k, v, out, w, c.q_rows, c.k_rows, c.options);
  testing::ExpectGradientsMatch(loss, {{"q", q, g.dq}, {"k", k, g.dk}, {"v", v, g.dv}});
}

TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_GqaVarlen) {
  GradCase c;
  c.q_rows = c.k_rows = Rows({0, 7, 19});
  ExpectGradientsMatchFiniteDifferences(c);
}

TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_Documents) {
  GradCase c;
  std::vector<int32_t> docs = Docs({3, 4, 1, 5});
  const std::vector<int32_t> second = Docs({6, 2}, 10);
  docs.insert(docs.end(), second.begin(), second.end());
  c.q_rows = c.k_rows = Rows({0, 13, 21}, docs);
  ExpectGradientsMatchFiniteDifferences(c);
}

// A block of 6 queries at positions 10.. against 9 keys at 8..: the first
// queries see only the oldest keys (the shape of a ring-attention step).
TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_Offsets) {
  GradCase c;
  c.q_rows = Rows({0, 6, 11});
  c.k_rows = Rows({0, 9, 16});
  c.options.q_offset = 10;
  c.options.k_offset = 8;
  ExpectGradientsMatchFiniteDifferences(c);
}

// Keys start 3 positions after the queries: queries 0..2 of each row see
// nothing, and must get o = 0, lse = −∞ and zero (not NaN) gradients.
TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_FullyMaskedQueries) {
  GradCase c;
  c.q_rows = Rows({0, 6, 12});
  c.k_rows = Rows({0, 5, 10});
  c.options.k_offset = 3;
  ExpectGradientsMatchFiniteDifferences(c);

  const Tensor q = RandomTensor({12, c.hq, c.d}, DType::kF64, 5), k = RandomTensor({10, c.hk, c.d}, DType::kF64, 6);
  const Tensor v = RandomTensor({10, c.hk, c.d}, DType::kF64, 7), d_o = RandomTensor({12, c.hq, c.d}, DType::kF64, 8);
  const Outputs out = Forward(q, k, v, c.q_rows, c.k_rows, c.options);
  const Grads g = Backward(q, k, v, out, d_o, c.q_rows, c.k_rows, c.options);
  for (int64_t t : {0, 1, 2, 6, 7, 8}) {
    for (int64_t h = 0; h < c.hq; ++h) {
      EXPECT_EQ(out.lse.Get(t * c.hq + h), -std::numeric_limits<double>::infinity()) << "token " << t << " head " << h;
      for (int64_t i = 0; i < c.d; ++i) {
        EXPECT_EQ(out.o.Get((t * c.hq + h) * c.d + i), 0.0) << "token " << t;
        EXPECT_EQ(g.dq.Get((t * c.hq + h) * c.d + i), 0.0) << "token " << t;
      }
    }
  }
  for (const Tensor* t : {&g.dq, &g.dk, &g.dv})
    for (int64_t i = 0; i < t->numel(); ++i) ASSERT_TRUE(std::isfinite(t->Get(i))) << i;
}

// Cross attention: rows of q and k of different lengths, an explicit scale.
TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_NonCausal) {
  GradCase c;
  c.hk = 1;
  c.q_rows = Rows({0, 5, 12});
  c.k_rows = Rows({0, 9, 13});
  c.options.causal = false;
  c.options.scale = 0.3;
  ExpectGradientsMatchFiniteDifferences(c);
}

TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_Sigmoid) {
  GradCase c;
  c.q_rows = c.k_rows = Rows({0, 7, 19});
  c.options.sigmoid = true;
  c.options.sigmoid_bias = -std::log(32.0);
  ExpectGradientsMatchFiniteDifferences(c);
}

// Rows longer than a tile (64), documents crossing tile edges: the per-tile
// key and query ranges and both backward passes' tiling.
TEST(SoftmaxAttention, GradientsMatchFiniteDifferences_ManyTilesWithDocuments) {
  GradCase c;
  c.hq = 2;
  c.hk = 1;
  c.d = 4;
  std::vector<int32_t> docs = Docs({60, 70, 20});
  const std::vector<int32_t> second = Docs({1, 89}, 3);
  docs.insert(docs.end(), second.begin(), second.end());
  c.q_rows = c.k_rows = Rows({0, 150, 240}, docs);
  ExpectGradientsMatchFiniteDifferences(c);
}

// ------------------------------------------------------------ properties

// Packing documents into a row with doc_ids is the same as giving each
// document its own row.
TEST(SoftmaxAttention, DocumentMaskEqualsSeparateRows) {
  const std::vector<int32_t> lengths = {30, 50, 1, 19, 70, 10};
  std::vector<int32_t> docs = Docs({30, 50, 1, 19});
  const std::vector<int32_t> second = Docs({70, 10}, 4);
  docs.insert(docs.end(), second.begin(), second.end());
  const TokenRows packed = Rows({0, 100, 180}, docs);
  std::vector<int32_t> cu = {0};
  for (int32_t n : lengths) cu.push_back(cu.back() + n);
  const TokenRows separate = Rows(cu);

  const int64_t t = 180, hq = 4, hk = 2, d = 16;
  const Tensor q = RandomTensor({t, hq, d}, DType::kF64, 11), k = RandomTensor({t, hk, d}, DType::kF64, 12);
  const Tensor v = RandomTensor({t, hk, d}, DType::kF64, 13), d_o = RandomTensor({t, hq, d}, DType::kF64, 14);
  for (bool sigmoid : {false, true}) {
    AttentionOptions options;
    options.sigmoid = sigmoid;
    options.sigmoid_bias = -4;
    const Outputs a = Forward(q, k, v, packed, packed, options), b = Forward(q, k, v, separate, separate, options);
    EXPECT_TRUE(AllClose(a.o, b.o, 1e-12, 1e-14)) << "o, sigmoid " << sigmoid;
    if (!sigmoid) {
      EXPECT_TRUE(AllClose(a.lse, b.lse, 1e-12, 1e-14)) << "lse";
    }
    const Grads ga = Backward(q, k, v, a, d_o, packed, packed, options);
    const Grads gb = Backward(q, k, v, b, d_o, separate, separate, options);
    EXPECT_TRUE(AllClose(ga.dq, gb.dq, 1e-12, 1e-14)) << "dq, sigmoid " << sigmoid;
    EXPECT_TRUE(AllClose(ga.dk, gb.dk, 1e-12, 1e-14)) << "dk, sigmoid " << sigmoid;
    EXPECT_TRUE(AllClose(ga.dv, gb.dv, 1e-12, 1e-14)) << "dv, sigmoid " << sigmoid;
  }
}

// The training dtype against f64 on rows of several tiles, with GQA.
TEST(SoftmaxAttention, F32MatchesF64_ManyTiles) {
  const int64_t t = 600, hq = 8, hk = 2, d = 32;
  const TokenRows rows = TokenRows::Uniform(2, 300);
  const Tensor q = RandomTensor({t, hq, d}, DType::kF64, 21, -2, 2), k = RandomTensor({t, hk, d}, DType::kF64, 22, -2, 2);
  const Tensor v = RandomTensor({t, hk, d}, DType::kF64, 23), d_o = RandomTensor({t, hq, d}, DType::kF64, 24);
  for (bool sigmoid : {false, true}) {
    AttentionOptions options;
    options.sigmoid = sigmoid;
    options.sigmoid_bias = -std::log(300.0);
    const Outputs x = Forward(q, k, v, rows, rows, options);
    const Outputs y = Forward(q.To(DType::kF32), k.To(DType::kF32), v.To(DType::kF32), rows, rows, options);
    EXPECT_TRUE(AllClose(y.o, x.o, 1e-5, 1e-6)) << "o, sigmoid " << sigmoid;
    if (!sigmoid) {
      EXPECT_TRUE(AllClose(y.lse, x.lse, 1e-6, 1e-6)) << "lse";
    }
    const Grads gx = Backward(q, k, v, x, d_o, rows, rows, options);
    const Grads gy = Backward(q.To(DType::kF32), k.To(DType::kF32), v.To(DType::kF32), y, d_o.To(DType::kF32), rows,
                              rows, options);
    EXPECT_TRUE(AllClose(gy.dq, gx.dq, 3e-5, 3e-6)) << "dq, sigmoid " << sigmoid;
    EXPECT_TRUE(AllClose(gy.dk, gx.dk, 3e-5, 3e-6)) << "dk, sigmoid " << sigmoid;
    EXPECT_TRUE(AllClose(gy.dv, gx.dv, 3e-5, 3e-6)) << "dv, sigmoid " << sigmoid;
  }
}

// Every output element is computed by one tile in a fixed order, so the
// thread count cannot change a bit of the result.
TEST(SoftmaxAttention, SameBitsForAnyThreadCount) {
  const int64_t t = 400, hq = 4, hk = 2, d = 16;
  const TokenRows rows = Rows({0, 250, 400}, Docs({100, 150, 30, 120}));
  const Tensor q = RandomTensor({t, hq, d}, DType::kF32, 31), k = RandomTensor({t, hk, d}, DType::kF32, 32);
  const Tensor v = RandomTensor({t, hk, d}, DType::kF32, 33), d_o = RandomTensor({t, hq, d}, DType::kF32, 34);
  const AttentionOptions options;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Outputs a = Forward(q, k, v, rows, rows, options);
  const Grads ga = Backward(q, k, v, a, d_o, rows, rows, options);
  omp_set_num_threads(std::max(threads, 4));
  const Outputs b = Forward(q, k, v, rows, rows, options);
  const Grads gb = Backward(q, k, v, b, d_o, rows, rows, options);
  omp_set_num_threads(threads);
  for (auto [x, y, name] : {std::tuple{&a.o, &b.o, "o"}, {&a.lse, &b.lse, "lse"}, {&ga.dq, &gb.dq, "dq"},
                            {&ga.dk, &gb.dk, "dk"}, {&ga.dv, &gb.dv, "dv"}}) {
    EXPECT_EQ(std::memcmp(x->raw(), y->raw(), x->nbytes()), 0) << name;
  }
}

}  // namespace
}  // namespace loom::ops
