// Multi-query associative recall (MQAR, Arora et al., "Zoology"): a context
// of key-value pairs, then queries of keys seen in it; at each query the
// model must predict the key's value. The loss and the accuracy count only
// those predictions.
//
//   positions 0 .. 2P−1:  k_1 v_1 k_2 v_2 ... k_P v_P
//   the rest:             filler (token 0) with Q query keys k_i placed at
//                         random even offsets; the target at k_i is v_i. The
//                         answers never appear in the input, so a model
//                         cannot shortcut by excluding values already asked.
// Tokens: 0 filler, 1..K keys, K+1..K+V values. Chance accuracy 1/V.
// Sample i of a split is a pure function of (seed, split, i).
#pragma once

#include "configs/loom.pb.h"
#include "model/batch.h"

namespace loom {

class AssociativeRecall {
 public:
  enum class Split { kTrain, kEval };
  explicit AssociativeRecall(const config::Config& config);

  // Samples [first, first + rows) of `split` as one batch of seq_len tokens each.
  Batch MakeBatch(Split split, int64_t first, int64_t rows) const;
  double chance() const { return 1.0 / task_.value_vocab(); }

 private:
  config::AssociativeRecallTask task_;
  int64_t seq_len_;
  uint64_t seed_;
};

// Fraction of non-ignored targets whose prediction is right.
struct Accuracy {
  int64_t correct = 0;
  int64_t total = 0;
  double value() const { return total ? static_cast<double>(correct) / total : 0.0; }
};
Accuracy CountCorrect(const Tensor& predictions, const Tensor& targets, int32_t ignore_index = -100);

}  // namespace loom
