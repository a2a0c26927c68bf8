#include "data/associative_recall.h"

#include <numeric>
#include <random>
#include <vector>

#include "runtime/rng.h"

namespace loom {

AssociativeRecall::AssociativeRecall(const config::Config& config)
    : task_(config.data().recall()), seq_len_(config.train().seq_len()), seed_(config.train().seed()) {}

Batch AssociativeRecall::MakeBatch(Split split, int64_t first, int64_t rows) const {
  const int64_t n = seq_len_, pairs = task_.pairs(), queries = task_.queries();
  const int32_t keys = task_.key_vocab(), values = task_.value_vocab();
  Batch b = Batch::Allocate(rows, n, /*with_docs=*/false);
  b.tokens.Zero();
  b.targets.Fill(-100);
  const uint64_t key = RngKey(seed_, split == Split::kTrain ? "recall/train" : "recall/eval");
  for (int64_t r = 0; r < rows; ++r) {
    // A per-sample generator seeded from the counter-based stream.
    const auto words = Philox4x32(key, 0, static_cast<uint64_t>(first + r));
    std::mt19937_64 gen((static_cast<uint64_t>(words[0]) << 32) | words[1]);
    int32_t* tok = b.tokens.data<int32_t>() + r * n;
    int32_t* tgt = b.targets.data<int32_t>() + r * n;
    int32_t* pos = b.positions.data<int32_t>() + r * n;
    std::iota(pos, pos + n, 0);
    // Distinct keys: a partial Fisher-Yates shuffle of 1..K.
    std::vector<int32_t> key_pool(keys);
    std::iota(key_pool.begin(), key_pool.end(), 1);
    for (int64_t i = 0; i < pairs; ++i) {
      std::uniform_int_distribution<int64_t> pick(i, keys - 1);
      std::swap(key_pool[i], key_pool[pick(gen)]);
    }
    std::vector<int32_t> vals(pairs);
    std::uniform_int_distribution<int32_t> value_dist(keys + 1, keys + values);
    for (int64_t i = 0; i < pairs; ++i) {
      vals[i] = value_dist(gen);
      tok[2 * i] = key_pool[i];
      tok[2 * i + 1] = vals[i];
    }
    // Queries: Q distinct pairs into Q distinct 2-token slots after the context
    // (slots of two keep queries apart, as answers would stand between them).
    std::vector<int64_t> which(pairs), slots((n - 2 * pairs) / 2);
    std::iota(which.begin(), which.end(), 0);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(which.begin(), which.end(), gen);
    std::shuffle(slots.begin(), slots.end(), gen);
    for (int64_t q = 0; q < queries; ++q) {
      const int64_t at = 2 * pairs + 2 * slots[q];
      tok[at] = key_pool[which[q]];  // the next token stays filler: answers are
      tgt[at] = vals[which[q]];       // never shown, as in Zoology's MQAR
    }
  }
  return b;
}

Accuracy CountCorrect(const Tensor& predictions, const Tensor& targets, int32_t ignore_index) {
  Accuracy a;
  const int32_t* p = predictions.data<int32_t>();
  const int32_t* t = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (t[i] == ignore_index) continue;
    ++a.total;
    a.correct += p[i] == t[i];
  }
  return a;
}

}  // namespace loom
