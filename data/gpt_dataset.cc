#include "data/gpt_dataset.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <numeric>

#include "runtime/rng.h"

namespace loom {
namespace {

constexpr const char* kSplitNames[GptDataset::kSplits] = {"train", "valid", "test"};
// Epoch indices kept at once (over all datasets and splits); the least
// recently used goes first.
constexpr size_t kEpochCacheSize = 16;

absl::Status SplitError(const std::string& split, const std::string& why) {
  return absl::InvalidArgumentError(
      absl::StrCat("[gpt_dataset] split \"", split, "\": ", why, " (expected e.g. \"98,1,1\")"));
}

}  // namespace

absl::StatusOr<std::array<double, GptDataset::kSplits>> ParseGptSplit(const std::string& split) {
  std::array<double, GptDataset::kSplits> f = {0.0, 0.0, 0.0};
  size_t at = 0;
  int n = 0;
  while (true) {
    const size_t comma = split.find(',', at);
    const std::string part = split.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    if (n == GptDataset::kSplits) return SplitError(split, "more than 3 numbers");
    if (part.empty()) return SplitError(split, "empty number");
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(part.c_str(), &end);
    if (errno != 0 || end != part.c_str() + part.size() || !std::isfinite(v)) {
      return SplitError(split, absl::StrCat("\"", part, "\" is not a number"));
    }
    if (v < 0) return SplitError(split, absl::StrCat(part, " is negative"));
    f[n++] = v;
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  const double sum = f[0] + f[1] + f[2];
  if (!(sum > 0)) return SplitError(split, "fractions sum to 0");
  for (double& v : f) v /= sum;
  return f;
}

absl::StatusOr<std::unique_ptr<GptDataset>> GptDataset::Open(const GptDatasetOptions& options) {
  if (options.sources.empty()) {
    return absl::InvalidArgumentError("[gpt_dataset] sources: empty, need at least one {prefix, weight}");
  }
  if (options.seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("[gpt_dataset] seq_len: ", options.seq_len, ", must be > 0"));
  }
  LOOM_ASSIGN_OR_RETURN(const auto fractions, ParseGptSplit(options.split));
  double weight_sum = 0;
  for (size_t k = 0; k < options.sources.size(); ++k) {
    const double w = options.sources[k].weight;
    if (!(w > 0) || !std::isfinite(w)) {
      return absl::InvalidArgumentError(absl::StrCat("[gpt_dataset] sources[", k, "].weight (",
                                                     options.sources[k].prefix, "): ", w, ", must be > 0"));
    }
    weight_sum += w;
  }

  std::unique_ptr<GptDataset> ds(new GptDataset(options));
  for (size_t k = 0; k < options.sources.size(); ++k) {
    const std::string& prefix = options.sources[k].prefix;
    auto opened = IndexedDataset::Open(prefix);
    if (!opened.ok()) {
      return absl::Status(opened.status().code(),
                          absl::StrCat("[gpt_dataset] sources[", k, "]: ", opened.status().message()));
    }
    const int64_t docs = (*opened)->num_documents();
    if (docs == 0) {
      return absl::InvalidArgumentError(absl::StrCat("[gpt_dataset] sources[", k, "] ", prefix, ": no documents"));
    }
    std::array<int64_t, kSplits + 1> b;
    b[0] = 0;
    b[1] = std::llround(static_cast<double>(docs) * fractions[0]);
    b[2] = std::max(b[1], static_cast<int64_t>(std::llround(static_cast<double>(docs) * (fractions[0] + fractions[1]))));
    b[2] = std::min(b[2], docs);
    b[3] = docs;
    if (b[1] == 0) {
      return absl::InvalidArgumentError(absl::StrCat("[gpt_dataset] sources[", k, "] ", prefix, ": split \"",
                                                     options.split, "\" leaves 0 of ", docs,
                                                     " documents for train"));
    }
    ds->datasets_.push_back(std::move(opened).value());
    ds->weights_.push_back(options.sources[k].weight / weight_sum);
    ds->bounds_.push_back(b);
    std::array<int64_t, kSplits> tokens = {0, 0, 0};
    for (int s = 0; s < kSplits; ++s) {
      for (int64_t d = b[s]; d < b[s + 1]; ++d) tokens[s] += ds->DocumentTokens(static_cast<int>(k), d);
    }
    if (tokens[0] == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("[gpt_dataset] sources[", k, "] ", prefix, ": the train documents hold 0 tokens"));
    }
    ds->tokens_.push_back(tokens);
  }

  for (int s = 0; s < kSplits; ++s) {
    BlendTable& t = ds->blend_[s];
    double sum = 0;
    for (int d = 0; d < ds->num_datasets(); ++d) {
      if (ds->tokens_[d][s] == 0) continue;
      t.active.push_back(d);
      sum += ds->weights_[d];
    }
    for (int d : t.active) t.weights.push_back(ds->weights_[d] / sum);
    t.counts.assign(t.active.size(), 0);  // checkpoint 0: nothing given yet
  }
  return ds;
}

int64_t GptDataset::DocumentTokens(int dataset, int64_t doc) const {
  const IndexedDataset& data = *datasets_[dataset];
  const auto [first, last] = data.document_range(doc);
  int64_t n = 0;
  for (int64_t q = first; q < last; ++q) n += data.sequence_length(q);
  return n;
}

std::pair<int64_t, int64_t> GptDataset::document_range(int dataset, Split split) const {
  const int s = static_cast<int>(split);
  return {bounds_[dataset][s], bounds_[dataset][s + 1]};
}

int64_t GptDataset::num_tokens(int dataset, Split split) const { return tokens_[dataset][static_cast<int>(split)]; }

int64_t GptDataset::num_documents(Split split) const {
  int64_t n = 0;
  for (int d = 0; d < num_datasets(); ++d) {
    const auto [first, last] = document_range(d, split);
    n += last - first;
  }
  return n;
}

int64_t GptDataset::num_tokens(Split split) const {
  int64_t n = 0;
  for (int d = 0; d < num_datasets(); ++d) n += num_tokens(d, split);
  return n;
}

std::shared_ptr<const GptDataset::EpochIndex> GptDataset::Epoch(int dataset, Split split, int64_t epoch) const {
  const int s = static_cast<int>(split);
  std::lock_guard<std::mutex> lock(mu_);
  const auto key = std::make_tuple(dataset, s, epoch);
  auto it = epochs_.find(key);
  if (it != epochs_.end()) {
    it->second.second = ++epoch_clock_;
    return it->second.first;
  }
  auto index = std::make_shared<EpochIndex>();
  const auto [first, last] = document_range(dataset, split);
  const int64_t n = last - first;
  index->documents.resize(n);
  std::iota(index->documents.begin(), index->documents.end(), first);
  // Fisher-Yates; draw i is a pure function of (seed, dataset, split, epoch, i).
  const uint64_t rng = RngKey(options_.seed, absl::StrCat("gpt_dataset/shuffle/", dataset, "/", kSplitNames[s]));
  for (int64_t i = n - 1; i > 0; --i) {
    const auto w = Philox4x32(rng, static_cast<uint64_t>(epoch), static_cast<uint64_t>(i));
    const uint64_t r = (static_cast<uint64_t>(w[0]) << 32) | w[1];
    // Lemire's multiply-shift maps r onto [0, i] (bias below 2^-40 here).
    const auto j = static_cast<int64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(index->documents[i], index->documents[j]);
  }
  index->cum.resize(n + 1);
  index->cum[0] = 0;
  for (int64_t k = 0; k < n; ++k) index->cum[k + 1] = index->cum[k] + DocumentTokens(dataset, index->documents[k]);
  LOOM_CHECK(index->cum[n] == tokens_[dataset][s], "[gpt_dataset] epoch tokens ", index->cum[n], " vs ",
             tokens_[dataset][s]);

  if (epochs_.size() >= kEpochCacheSize) {
    auto oldest = epochs_.begin();
    for (auto e = epochs_.begin(); e != epochs_.end(); ++e) {
      if (e->second.second < oldest->second.second) oldest = e;
    }
    epochs_.erase(oldest);
  }
  epochs_.emplace(key, std::make_pair(index, ++epoch_clock_));
  return index;
}

void GptDataset::ReadStream(int dataset, Split split, int64_t begin, int64_t length, int32_t* out) const {
  const int64_t total = num_tokens(dataset, split);
  LOOM_CHECK(total > 0, "[gpt_dataset] reading an empty split");
  const IndexedDataset& data = *datasets_[dataset];
  while (length > 0) {
    const auto index = Epoch(dataset, split, begin / total);
    int64_t offset = begin % total;
    const auto& cum = index->cum;
    // The document holding `offset`: last k with cum[k] <= offset (skips empty documents).
    auto k = static_cast<int64_t>(std::upper_bound(cum.begin(), cum.end(), offset) - cum.begin()) - 1;
    const auto n = static_cast<int64_t>(index->documents.size());
    for (; k < n && length > 0; ++k) {
      int64_t within = offset - cum[k];
      int64_t take = std::min(cum[k + 1] - offset, length);
      begin += take;
      offset += take;
      length -= take;
      const auto [first, last] = data.document_range(index->documents[k]);
      for (int64_t q = first; q < last && take > 0; ++q) {
        const int64_t seq_len = data.sequence_length(q);
        if (within >= seq_len) {
          within -= seq_len;
          continue;
        }
        const int64_t m = std::min(seq_len - within, take);
        data.Read(q, within, m, out);
        out += m;
        take -= m;
        within = 0;
      }
    }
  }
}

std::vector<GptDataset::SampleSource> GptDataset::Sources(Split split, int64_t first, int64_t count) const {
  const BlendTable& t = blend_[static_cast<int>(split)];
  const auto a = static_cast<int64_t>(t.active.size());
  LOOM_CHECK(a > 0, "[gpt_dataset] split ", kSplitNames[static_cast<int>(split)], " holds no tokens");
  std::vector<SampleSource> out(count);
  if (a == 1) {
    for (int64_t i = 0; i < count; ++i) out[i] = {t.active[0], first + i};
    return out;
  }
  // One greedy step at global sample i: counters c are updated in place.
  auto step = [&](int64_t i, int64_t* c) {
    int64_t best = 0;
    double best_error = t.weights[0] * static_cast<double>(i + 1) - static_cast<double>(c[0]);
    for (int64_t d = 1; d < a; ++d) {
      const double error = t.weights[d] * static_cast<double>(i + 1) - static_cast<double>(c[d]);
      if (error > best_error) {
        best = d;
        best_error = error;
      }
    }
    const SampleSource s{t.active[best], c[best]};
    ++c[best];
    return s;
  };
  const int64_t block = first / kBlendCheckpointEvery;
  std::vector<int64_t> c(a);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& counts = blend_[static_cast<int>(split)].counts;
    // Extend the checkpoints up to `block`, each from the one before.
    for (int64_t have = static_cast<int64_t>(counts.size()) / a; have <= block; ++have) {
      c.assign(counts.end() - a, counts.end());
      for (int64_t i = (have - 1) * kBlendCheckpointEvery; i < have * kBlendCheckpointEvery; ++i) step(i, c.data());
      counts.insert(counts.end(), c.begin(), c.end());
    }
    c.assign(counts.begin() + block * a, counts.begin() + (block + 1) * a);
  }
  for (int64_t i = block * kBlendCheckpointEvery; i < first + count; ++i) {
    const SampleSource s = step(i, c.data());
    if (i >= first) out[i - first] = s;
  }
  return out;
}

GptDataset::SampleSource GptDataset::SourceOf(Split split, int64_t sample) const {
  return Sources(split, sample, 1)[0];
}

Batch GptDataset::MakeBatch(Split split, int64_t first_sample, int64_t rows) const {
  LOOM_CHECK(first_sample >= 0 && rows >= 0, "[gpt_dataset] samples [", first_sample, ", +", rows, ")");
  const int64_t n = options_.seq_len;
  const int32_t eod = options_.eod_token;
  Batch b = Batch::Allocate(rows, n, /*with_docs=*/options_.reset_attention);
  const std::vector<SampleSource> sources = Sources(split, first_sample, rows);
  std::vector<int32_t> stream(n + 1);
  for (int64_t r = 0; r < rows; ++r) {
    ReadStream(sources[r].dataset, split, sources[r].sample * n, n + 1, stream.data());
    int32_t* tok = b.tokens.data<int32_t>() + r * n;
    int32_t* tgt = b.targets.data<int32_t>() + r * n;
    int32_t* pos = b.positions.data<int32_t>() + r * n;
    int32_t* doc = options_.reset_attention ? b.token_rows.doc_ids.data<int32_t>() + r * n : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      tok[t] = stream[t];
      // After an EOD comes another document: nothing to learn across it.
      tgt[t] = stream[t] == eod ? -100 : stream[t + 1];
      const bool starts = t > 0 && stream[t - 1] == eod;
      if (doc != nullptr) doc[t] = t == 0 ? 0 : doc[t - 1] + (starts ? 1 : 0);
      pos[t] = t == 0 ? 0 : (options_.reset_positions && starts ? 0 : pos[t - 1] + 1);
    }
  }
  return b;
}

}  // namespace loom
