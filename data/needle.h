// Needle in a haystack (Kamradt's retrieval test, as a synthetic task):
// filler tokens with key-value needles hidden at chosen depths, then a
// question naming one key; the model must answer with that needle's value.
// Only the answer counts towards the loss and the accuracy.
//
//   positions 0 .. L−3:  filler f f f ... N k_1 v_1 f f ... N k_n v_n f ...
//   positions L−2, L−1:  Q k_j          (the target at k_j is v_j)
//
// The asked needle j starts at depth·(L − 5), the haystack's first to its
// last slot (depth 0: the first token; depth 1: just before the question);
// distractor needles (needles > 1, distinct keys) take other free slots.
// Tokens: 0 the query marker Q, 1 the needle marker N, 2 .. K+1 keys,
// K+2 .. K+V+1 values, then the filler tokens; all drawn uniformly.
// Chance accuracy 1/V. Sample i of a split is a pure function of (seed,
// split, i, seq_len, config).
#pragma once

#include "configs/loom.pb.h"
#include "model/batch.h"

namespace loom {

class Needle {
 public:
  enum class Split { kTrain, kEval };
  static constexpr int32_t kQuery = 0, kMarker = 1;

  explicit Needle(const config::Config& config);
  Needle(const config::NeedleConfig& task, int64_t seq_len, uint64_t seed);

  // Samples [first, first + rows) of `split`, seq_len tokens each.
  Batch MakeBatch(Split split, int64_t first, int64_t rows) const;
  double chance() const { return 1.0 / task_.value_vocab(); }
  // Tokens the task uses: 2 + key_vocab + value_vocab + filler_vocab.
  static int64_t VocabNeeded(const config::NeedleConfig& task);
  // The first position of the asked needle's marker at `depth` in [0, 1].
  static int64_t NeedleStart(int64_t seq_len, double depth);

 private:
  config::NeedleConfig task_;
  int64_t seq_len_;
  uint64_t seed_;
};

}  // namespace loom
