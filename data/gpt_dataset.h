// GPT pre-training samples from one or several indexed datasets (.idx/.bin
// written by loom-prepare), Megatron-style, but with the sample index derived
// on the fly instead of stored:
//
//   Split.   Each dataset's documents are cut into three contiguous ranges in
//            document order, train then valid then test, by the fractions of
//            `split` ("98,1,1"; normalised). Boundaries: b1 = round(N·f0),
//            b2 = round(N·(f0+f1)), b3 = N.
//   Stream.  For (dataset d, split s), epoch e shuffles the split's documents
//            with a Fisher-Yates permutation drawn from Philox under
//            RngKey(seed, "gpt_dataset/shuffle/<d>/<s>") at counters (e, i),
//            and concatenates them: an endless token stream, epoch after epoch.
//            Per epoch only the prefix sums of the shuffled document lengths
//            are kept (O(documents)); a position is found by binary search.
//   Sample.  Sample j of (d, s) is stream tokens [j·L, j·L + L + 1), L =
//            seq_len: L inputs and the L shifted targets.
//   Blend.   Global sample i of split s goes to the dataset furthest below its
//            share (Megatron's greedy rule, helpers.cpp build_blending_indices):
//              d(i) = argmax_d  w_d·(i+1) − c_d(i),   ties to the lowest d,
//            with c_d(i) the samples given to d before i; that sample is
//            sample c_d(i) of d. Over the first n samples each c_d is within
//            one of w_d·n. Only datasets with tokens in split s take part
//            (weights renormalised over them); every dataset must have train
//            documents.
//
// Every sample is a pure function of (files, options, split, i): any rank can
// build any slice of the global batch, and MakeBatch(s, a, n) row r equals
// MakeBatch(s, 0, a + n) row a + r.
//
// Documents: each ends with the EOD token; a document starts right after an
// EOD. Within a row doc_ids count the document starts (0, 1, 2, ...) (with
// reset_attention; else batches have no doc_ids), and with reset_positions
// the positions restart at 0 there. The target of an
// EOD input (the next document's first token) is −100: no loss crosses a
// document boundary, while predicting EOD itself is kept.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "data/byte_tokenizer.h"
#include "data/indexed_dataset.h"
#include "model/batch.h"
#include "runtime/status.h"

namespace loom {

struct GptDatasetSource {
  std::string prefix;   // path without .idx/.bin
  double weight = 1.0;  // > 0; weights are normalised over all sources
};

struct GptDatasetOptions {
  std::vector<GptDatasetSource> sources;
  std::string split = "969,30,1";  // train,valid,test fractions of documents (1-3 numbers)
  int64_t seq_len = 0;             // tokens per sample, > 0
  uint64_t seed = 1234;
  int32_t eod_token = ByteTokenizer::kEod;
  bool reset_positions = false;  // positions restart at 0 at each document start
  bool reset_attention = true;   // batches carry doc_ids (attention stays within a document)
};

class GptDataset {
 public:
  enum class Split { kTrain = 0, kValid = 1, kTest = 2 };
  static constexpr int kSplits = 3;
  // Samples whose blend counters are stored; the rest are replayed (≤ this many steps).
  static constexpr int64_t kBlendCheckpointEvery = 4096;

  static absl::StatusOr<std::unique_ptr<GptDataset>> Open(const GptDatasetOptions& options);
  GptDataset(const GptDataset&) = delete;
  GptDataset& operator=(const GptDataset&) = delete;

  // Samples [first_sample, first_sample + rows) of `split`, rows × seq_len
  // tokens. The split must have tokens (num_tokens(split) > 0): checked.
  Batch MakeBatch(Split split, int64_t first_sample, int64_t rows) const;

  // Which dataset global sample i of `split` comes from, and its sample index there.
  struct SampleSource {
    int dataset = 0;
    int64_t sample = 0;
  };
  SampleSource SourceOf(Split split, int64_t sample) const;

  int num_datasets() const { return static_cast<int>(datasets_.size()); }
  double weight(int dataset) const { return weights_[dataset]; }  // normalised
  int64_t seq_len() const { return options_.seq_len; }
  int32_t eod_token() const { return options_.eod_token; }
  bool reset_positions() const { return options_.reset_positions; }
  // Documents [first, last) of `dataset` in `split`, and their token count.
  std::pair<int64_t, int64_t> document_range(int dataset, Split split) const;
  int64_t num_tokens(int dataset, Split split) const;
  // Sums over all datasets.
  int64_t num_documents(Split split) const;
  int64_t num_tokens(Split split) const;

 private:
  // One epoch of one (dataset, split): documents in shuffled order and the
  // prefix sums of their lengths (cum[0] = 0, cum[n] = tokens of the split).
  struct EpochIndex {
    std::vector<int64_t> documents;
    std::vector<int64_t> cum;
  };
  // Greedy blend of one split: counters c_d at every kBlendCheckpointEvery-th sample.
  struct BlendTable {
    std::vector<int> active;       // datasets with tokens in this split
    std::vector<double> weights;   // renormalised over `active`
    std::vector<int64_t> counts;   // [checkpoints × active.size()]
  };

  explicit GptDataset(GptDatasetOptions options) : options_(std::move(options)) {}
  int64_t DocumentTokens(int dataset, int64_t doc) const;
  std::shared_ptr<const EpochIndex> Epoch(int dataset, Split split, int64_t epoch) const;
  // Tokens [begin, begin + length) of the stream of (dataset, split) into out.
  void ReadStream(int dataset, Split split, int64_t begin, int64_t length, int32_t* out) const;
  // Sources of samples [first, first + count) of `split`.
  std::vector<SampleSource> Sources(Split split, int64_t first, int64_t count) const;

  GptDatasetOptions options_;
  std::vector<std::unique_ptr<IndexedDataset>> datasets_;
  std::vector<double> weights_;
  // [dataset][split]: document bounds and tokens.
  std::vector<std::array<int64_t, kSplits + 1>> bounds_;
  std::vector<std::array<int64_t, kSplits>> tokens_;

  mutable std::mutex mu_;  // guards the two lazily filled caches below
  mutable BlendTable blend_[kSplits];
  // (dataset, split, epoch) -> index, with a use stamp for eviction.
  mutable std::map<std::tuple<int, int, int64_t>, std::pair<std::shared_ptr<const EpochIndex>, uint64_t>> epochs_;
  mutable uint64_t epoch_clock_ = 0;
};

// Parses "98,1,1" (one to three non-negative numbers, missing ones 0, sum > 0)
// into fractions summing to 1.
absl::StatusOr<std::array<double, GptDataset::kSplits>> ParseGptSplit(const std::string& split);

}  // namespace loom
