#include "data/needle.h"

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "runtime/rng.h"

namespace loom {

Needle::Needle(const config::Config& config)
    : Needle(config.data().needle(), config.train().seq_len(), config.train().seed()) {}

Needle::Needle(const config::NeedleConfig& task, int64_t seq_len, uint64_t seed)
    : task_(task), seq_len_(seq_len), seed_(seed) {}

int64_t Needle::VocabNeeded(const config::NeedleConfig& task) {
  return 2 + int64_t{task.key_vocab()} + task.value_vocab() + task.filler_vocab();
}

int64_t Needle::NeedleStart(int64_t seq_len, double depth) {
  // Haystack slots 0 .. L−3; a needle of 3 tokens starts at 0 .. L−5.
  const int64_t last = seq_len - 5;
  return std::clamp<int64_t>(std::llround(depth * last), 0, last);
}

Batch Needle::MakeBatch(Split split, int64_t first, int64_t rows) const {
  const int64_t n = seq_len_, hay = n - 2, needles = task_.needles();
  const int32_t keys = task_.key_vocab(), values = task_.value_vocab(), fillers = task_.filler_vocab();
  const int32_t key0 = 2, value0 = key0 + keys, filler0 = value0 + values;
  Batch b = Batch::Allocate(rows, n, /*with_docs=*/false);
  b.targets.Fill(-100);
  const uint64_t key = RngKey(seed_, split == Split::kTrain ? "needle/train" : "needle/eval");
  for (int64_t r = 0; r < rows; ++r) {
    const auto words = Philox4x32(key, static_cast<uint64_t>(n), static_cast<uint64_t>(first + r));
    std::mt19937_64 gen((static_cast<uint64_t>(words[0]) << 32) | words[1]);
    int32_t* tok = b.tokens.data<int32_t>() + r * n;
    int32_t* tgt = b.targets.data<int32_t>() + r * n;
    int32_t* pos = b.positions.data<int32_t>() + r * n;
    std::iota(pos, pos + n, 0);
    std::uniform_int_distribution<int32_t> filler(filler0, filler0 + fillers - 1);
    for (int64_t i = 0; i < hay; ++i) tok[i] = filler(gen);
    // Distinct keys (a partial Fisher-Yates shuffle), any values.
    std::vector<int32_t> key_pool(keys);
    std::iota(key_pool.begin(), key_pool.end(), key0);
    for (int64_t i = 0; i < needles; ++i) {
      std::uniform_int_distribution<int64_t> pick(i, keys - 1);
      std::swap(key_pool[i], key_pool[pick(gen)]);
    }
    std::uniform_int_distribution<int32_t> value_dist(value0, value0 + values - 1);
    // Needle 0 is the one asked, at the configured depth or a uniform one.
    const double depth = task_.depth() >= 0 ? task_.depth() : std::uniform_real_distribution<double>(0, 1)(gen);
    std::vector<bool> used(hay, false);
    auto place = [&](int64_t at, int64_t i) {
      tok[at] = kMarker;
      tok[at + 1] = key_pool[i];
      tok[at + 2] = value_dist(gen);
      used[at] = used[at + 1] = used[at + 2] = true;
    };
    const int64_t asked_at = NeedleStart(n, depth);
    place(asked_at, 0);
    // Distractors: free 3-token slots drawn at random (validation keeps
    // 3·needles well below the haystack, so this ends quickly).
    std::uniform_int_distribution<int64_t> slot(0, hay - 3);
    for (int64_t i = 1; i < needles;) {
      const int64_t at = slot(gen);
      if (used[at] || used[at + 1] || used[at + 2]) continue;
      place(at, i++);
    }
    tok[n - 2] = kQuery;
    tok[n - 1] = key_pool[0];
    tgt[n - 1] = tok[asked_at + 2];
  }
  return b;
}

}  // namespace loom
