#include "data/gpt_dataset.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace loom {
namespace {

using Split = GptDataset::Split;
constexpr int32_t kEod = ByteTokenizer::kEod;

std::string TempPrefix(const std::string& name) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "loom_gpt_dataset_test";
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

// `count` documents; document k holds 3 + (7k mod 11) copies of base + k, then EOD,
// so every token names its document.
std::vector<std::vector<int32_t>> Documents(int count, int32_t base) {
  std::vector<std::vector<int32_t>> docs;
  for (int k = 0; k < count; ++k) {
    std::vector<int32_t> d(3 + (7 * k) % 11, base + k);
    d.push_back(kEod);
    docs.push_back(d);
  }
  return docs;
}

std::string Write(const std::string& name, const std::vector<std::vector<int32_t>>& docs) {
  const std::string prefix = TempPrefix(name);
  auto writer = IndexedDatasetWriter::Create(prefix, IndexedDType::kU16);
  EXPECT_TRUE(writer.ok()) << writer.status();
  for (const auto& d : docs) EXPECT_TRUE((*writer)->AddDocument(d).ok());
  EXPECT_TRUE((*writer)->Finish().ok());
  return prefix;
}

std::unique_ptr<GptDataset> OpenOrDie(const GptDatasetOptions& options) {
  auto ds = GptDataset::Open(options);
  EXPECT_TRUE(ds.ok()) << ds.status();
  return ds.ok() ? std::move(ds).value() : nullptr;
}

GptDatasetOptions OneSource(const std::string& prefix, const std::string& split, int64_t seq_len, uint64_t seed) {
  GptDatasetOptions o;
  o.sources = {{prefix, 1.0}};
  o.split = split;
  o.seq_len = seq_len;
  o.seed = seed;
  return o;
}

std::vector<int32_t> Ints(const Tensor& t) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
}

// The first `tokens` tokens of the stream of a one-source split: rows are
// consecutive windows of it.
std::vector<int32_t> Stream(const GptDataset& ds, Split split, int64_t tokens) {
  const int64_t rows = (tokens + ds.seq_len() - 1) / ds.seq_len();
  std::vector<int32_t> s = Ints(ds.MakeBatch(split, 0, rows).tokens);
  s.resize(tokens);
  return s;
}

TEST(GptDataset, SameSeedSameBatchOtherSeedOtherOrder) {
  const std::string prefix = Write("determinism", Documents(40, 1));
  auto a = OpenOrDie(OneSource(prefix, "98,1,1", 16, 7));
  auto b = OpenOrDie(OneSource(prefix, "98,1,1", 16, 7));
  auto c = OpenOrDie(OneSource(prefix, "98,1,1", 16, 8));
  ASSERT_TRUE(a && b && c);
  const Batch x = a->MakeBatch(Split::kTrain, 3, 6), y = b->MakeBatch(Split::kTrain, 3, 6);
  const Batch z = c->MakeBatch(Split::kTrain, 3, 6);
  EXPECT_EQ(Ints(x.tokens), Ints(y.tokens));
  EXPECT_EQ(Ints(x.targets), Ints(y.targets));
  EXPECT_NE(Ints(x.tokens), Ints(z.tokens));
  // Asking again (epoch indices now cached) changes nothing.
  EXPECT_EQ(Ints(x.tokens), Ints(a->MakeBatch(Split::kTrain, 3, 6).tokens));
}

void ExpectRowsEqual(const Batch& part, const Batch& whole, int64_t first_row) {
  const int64_t n = whole.seq_len, at = first_row * n, len = part.rows * n;
  auto slice = [&](const Tensor& t) {
    const auto v = Ints(t);
    return std::vector<int32_t>(v.begin() + at, v.begin() + at + len);
  };
  EXPECT_EQ(Ints(part.tokens), slice(whole.tokens));
  EXPECT_EQ(Ints(part.targets), slice(whole.targets));
  EXPECT_EQ(Ints(part.positions), slice(whole.positions));
  EXPECT_EQ(Ints(part.token_rows.doc_ids), slice(whole.token_rows.doc_ids));
  EXPECT_EQ(Ints(part.token_rows.cu_seqlens), Ints(ops::TokenRows::Uniform(part.rows, n).cu_seqlens));
}

TEST(GptDataset, SliceOfBatchEqualsSmallerBatch_BlendOfTwo) {
  GptDatasetOptions o;
  o.sources = {{Write("layout_a", Documents(30, 1)), 2.0}, {Write("layout_b", Documents(25, 100)), 1.0}};
  o.split = "90,5,5";
  o.seq_len = 16;
  o.reset_positions = true;
  auto ds = OpenOrDie(o);
  ASSERT_TRUE(ds);
  ExpectRowsEqual(ds->MakeBatch(Split::kTrain, 5, 3), ds->MakeBatch(Split::kTrain, 0, 8), 5);
  // Across a stored blend checkpoint, asked before the whole.
  const int64_t k = GptDataset::kBlendCheckpointEvery;
  auto fresh = OpenOrDie(o);
  ASSERT_TRUE(fresh);
  const Batch part = fresh->MakeBatch(Split::kTrain, k - 2, 5);
  ExpectRowsEqual(part, ds->MakeBatch(Split::kTrain, 0, k + 3), k - 2);
}

TEST(GptDataset, TargetsAreInputsShiftedExceptAfterEod) {
  auto ds = OpenOrDie(OneSource(Write("targets", Documents(20, 1)), "100,0,0", 16, 3));
  ASSERT_TRUE(ds);
  const int64_t rows = 12, n = 16;
  const Batch b = ds->MakeBatch(Split::kTrain, 0, rows);
  const auto tok = Ints(b.tokens), tgt = Ints(b.targets);
  int ignored = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = r * n + t;
      // The next token in the stream: row r + 1 starts where row r's window ends.
      const int32_t next = t + 1 < n ? tok[i + 1] : (r + 1 < rows ? tok[i + 1] : tgt[i]);
      if (tok[i] == kEod) {
        EXPECT_EQ(tgt[i], -100) << "row " << r << " t " << t;
        ++ignored;
      } else {
        EXPECT_EQ(tgt[i], next) << "row " << r << " t " << t;
      }
    }
  }
  EXPECT_GT(ignored, 0);
}

TEST(GptDataset, DocIdsStepAfterEodAndPositionsReset) {
  const std::string prefix = Write("docs", Documents(20, 1));
  for (bool reset : {false, true}) {
    GptDatasetOptions o = OneSource(prefix, "100,0,0", 24, 5);
    o.reset_positions = reset;
    auto ds = OpenOrDie(o);
    ASSERT_TRUE(ds);
    const int64_t rows = 10, n = 24;
    const Batch b = ds->MakeBatch(Split::kTrain, 0, rows);
    const auto tok = Ints(b.tokens), pos = Ints(b.positions), doc = Ints(b.token_rows.doc_ids);
    int restarts = 0;
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_EQ(doc[r * n], 0);
      EXPECT_EQ(pos[r * n], 0);
      for (int64_t t = 1; t < n; ++t) {
        const int64_t i = r * n + t;
        const bool starts = tok[i - 1] == kEod;
        restarts += starts;
        EXPECT_EQ(doc[i], doc[i - 1] + (starts ? 1 : 0)) << "row " << r << " t " << t;
        EXPECT_EQ(pos[i], reset && starts ? 0 : pos[i - 1] + 1) << "reset " << reset << " row " << r << " t " << t;
      }
    }
    EXPECT_GT(restarts, 0);
  }
}

// reset_attention = false: the same tokens, targets and positions, and no
// doc_ids (a token sees the earlier documents of its row).
TEST(GptDataset, WithoutResetAttentionBatchesCarryNoDocIds) {
  GptDatasetOptions o = OneSource(Write("no_reset", Documents(20, 1)), "100,0,0", 24, 5);
  auto with_docs = OpenOrDie(o);
  o.reset_attention = false;
  auto without = OpenOrDie(o);
  ASSERT_TRUE(with_docs && without);
  const Batch a = with_docs->MakeBatch(Split::kTrain, 3, 7), b = without->MakeBatch(Split::kTrain, 3, 7);
  ASSERT_TRUE(a.token_rows.has_docs());
  EXPECT_FALSE(b.token_rows.has_docs());
  EXPECT_EQ(Ints(a.tokens), Ints(b.tokens));
  EXPECT_EQ(Ints(a.targets), Ints(b.targets));
  EXPECT_EQ(Ints(a.positions), Ints(b.positions));
  EXPECT_EQ(Ints(a.token_rows.cu_seqlens), Ints(b.token_rows.cu_seqlens));
}

TEST(GptDataset, EveryTrainDocumentOncePerEpoch) {
  const auto docs = Documents(20, 1);
  auto ds = OpenOrDie(OneSource(Write("epochs", docs), "80,10,10", 16, 11));
  ASSERT_TRUE(ds);
  ASSERT_EQ(ds->num_documents(Split::kTrain), 16);
  ASSERT_EQ(ds->num_documents(Split::kValid), 2);
  ASSERT_EQ(ds->num_documents(Split::kTest), 2);
  int64_t train_tokens = 0;
  for (int k = 0; k < 16; ++k) train_tokens += static_cast<int64_t>(docs[k].size());
  ASSERT_EQ(ds->num_tokens(Split::kTrain), train_tokens);
  const auto stream = Stream(*ds, Split::kTrain, 3 * train_tokens);
  std::vector<std::vector<int32_t>> orders;
  for (int e = 0; e < 3; ++e) {
    // Cut the epoch at EODs: each piece must be one whole train document.
    std::vector<int32_t> order, piece;
    for (int64_t i = e * train_tokens; i < (e + 1) * train_tokens; ++i) {
      piece.push_back(stream[i]);
      if (stream[i] != kEod) continue;
      const int k = piece.front() - 1;
      ASSERT_TRUE(k >= 0 && k < 16) << "epoch " << e << ": token " << piece.front() << " is no train document";
      EXPECT_EQ(piece, docs[k]) << "epoch " << e << " document " << k;
      order.push_back(k);
      piece.clear();
    }
    EXPECT_TRUE(piece.empty()) << "epoch " << e << " ends inside a document";
    EXPECT_EQ(std::set<int32_t>(order.begin(), order.end()).size(), 16u) << "epoch " << e;
    EXPECT_EQ(order.size(), 16u) << "epoch " << e;
    orders.push_back(order);
  }
  EXPECT_NE(orders[0], orders[1]);  // a new permutation each epoch
  EXPECT_NE(orders[1], orders[2]);
}

TEST(GptDataset, SplitsAreDisjointDocumentRanges) {
  auto ds = OpenOrDie(OneSource(Write("splits", Documents(20, 1)), "80,10,10", 8, 2));
  ASSERT_TRUE(ds);
  const std::pair<int32_t, int32_t> expected[3] = {{1, 16}, {17, 18}, {19, 20}};  // token values of each split
  for (Split s : {Split::kTrain, Split::kValid, Split::kTest}) {
    const auto [lo, hi] = expected[static_cast<int>(s)];
    std::set<int32_t> seen;
    for (int32_t v : Stream(*ds, s, 2 * ds->num_tokens(s))) {
      if (v != kEod) seen.insert(v);
    }
    EXPECT_EQ(*seen.begin(), lo) << "split " << static_cast<int>(s);
    EXPECT_EQ(*seen.rbegin(), hi) << "split " << static_cast<int>(s);
    EXPECT_EQ(seen.size(), static_cast<size_t>(hi - lo + 1)) << "split " << static_cast<int>(s);
  }
  EXPECT_EQ(ds->document_range(0, Split::kValid), std::make_pair(int64_t{16}, int64_t{18}));
}

TEST(GptDataset, BlendThreeToOneIsExactlyGreedy) {
  GptDatasetOptions o;
  o.sources = {{Write("blend_a", Documents(30, 1)), 3.0}, {Write("blend_b", Documents(30, 100)), 1.0}};
  o.split = "100,0,0";
  o.seq_len = 16;
  auto ds = OpenOrDie(o);
  ASSERT_TRUE(ds);
  EXPECT_DOUBLE_EQ(ds->weight(0), 0.75);
  EXPECT_DOUBLE_EQ(ds->weight(1), 0.25);
  int64_t count[2] = {0, 0};
  for (int64_t i = 0; i < 400; ++i) {
    const auto s = ds->SourceOf(Split::kTrain, i);
    ASSERT_TRUE(s.dataset == 0 || s.dataset == 1);
    EXPECT_EQ(s.sample, count[s.dataset]) << "sample " << i;  // each dataset's samples in order
    ++count[s.dataset];
    // Greedy: never more than one sample from the exact share.
    EXPECT_LE(std::abs(static_cast<double>(count[0]) - 0.75 * static_cast<double>(i + 1)), 1.0) << "sample " << i;
  }
  EXPECT_EQ(count[0], 300);
  EXPECT_EQ(count[1], 100);
  // The rows really come from those datasets (b's tokens are >= 100).
  const Batch b = ds->MakeBatch(Split::kTrain, 0, 400);
  const auto tok = Ints(b.tokens);
  int64_t rows_b = 0;
  for (int64_t r = 0; r < 400; ++r) {
    const bool from_b = tok[r * 16] != kEod ? tok[r * 16] >= 100 : tok[r * 16 + 1] >= 100;
    EXPECT_EQ(from_b, ds->SourceOf(Split::kTrain, r).dataset == 1) << "row " << r;
    rows_b += from_b;
  }
  EXPECT_EQ(rows_b, 100);
}

void ExpectError(const GptDatasetOptions& o, absl::StatusCode code, const std::string& needle) {
  auto ds = GptDataset::Open(o);
  ASSERT_FALSE(ds.ok()) << "expected an error containing \"" << needle << "\"";
  EXPECT_EQ(ds.status().code(), code) << ds.status();
  EXPECT_NE(std::string(ds.status().message()).find(needle), std::string::npos)
      << ds.status() << " does not name \"" << needle << "\"";
  EXPECT_EQ(std::string(ds.status().message()).find('\n'), std::string::npos) << ds.status();
}

TEST(GptDataset, BadInputsGiveErrors) {
  const auto invalid = absl::StatusCode::kInvalidArgument;
  const std::string good = Write("bad_good", Documents(10, 1));
  GptDatasetOptions o = OneSource(good, "98,1,1", 16, 1);
  ASSERT_TRUE(GptDataset::Open(o).ok());

  GptDatasetOptions none = o;
  none.sources.clear();
  ExpectError(none, invalid, "sources: empty");
  for (double w : {0.0, -1.0}) {
    GptDatasetOptions bad = o;
    bad.sources.push_back({good, w});
    ExpectError(bad, invalid, "sources[1].weight");
  }
  for (const char* split : {"a,b", "1,2,3,4", "", "0,0,0", "-1,1", "98,,1", "9 8"}) {
    GptDatasetOptions bad = o;
    bad.split = split;
    ExpectError(bad, invalid, absl::StrCat("split \"", split, "\""));
  }
  GptDatasetOptions no_len = o;
  no_len.seq_len = 0;
  ExpectError(no_len, invalid, "seq_len");
  GptDatasetOptions missing = o;
  missing.sources = {{TempPrefix("does_not_exist"), 1.0}};
  ExpectError(missing, absl::StatusCode::kNotFound, "does_not_exist");

  GptDatasetOptions empty = o;
  empty.sources = {{Write("bad_empty", {}), 1.0}};
  ExpectError(empty, invalid, "no documents");
  GptDatasetOptions no_train = o;
  no_train.sources = {{Write("bad_two", Documents(2, 1)), 1.0}};
  no_train.split = "1,50,49";
  ExpectError(no_train, invalid, "leaves 0 of 2 documents for train");
}

}  // namespace
}  // namespace loom
