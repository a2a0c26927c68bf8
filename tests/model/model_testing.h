// Helpers of the whole-model tests (model_test.cc, moe_test.cc,
// moh_test.cc): a dense recall batch and the finite-difference check of
// every parameter.
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "data/associative_recall.h"
#include "model/model.h"
#include "runtime/config.h"
#include "tests/testing.h"

namespace loom::model_testing {

// A recall batch whose every position has a target (the next token), so
// every weight gets gradient.
inline Batch DenseBatch(const config::Config& c, int64_t rows) {
  Batch b = AssociativeRecall(c).MakeBatch(AssociativeRecall::Split::kTrain, 0, rows);
  const int64_t n = b.seq_len;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i)
      b.targets.data<int32_t>()[r * n + i] = i + 1 < n ? b.tokens.data<int32_t>()[r * n + i + 1] : -100;
  return b;
}

// The model's gradients from ForwardBackward on `batch` (whose loss must
// equal Evaluate's) against central differences of Evaluate, up to
// max_elements entries a parameter.
inline void CheckGradients(Model& model, const Batch& batch, double normalizer, int max_elements) {
  model.ZeroGrad();
  const double loss = model.ForwardBackward(batch, normalizer).loss;
  EXPECT_EQ(loss, model.Evaluate(batch, normalizer, nullptr).loss);
  std::vector<testing::GradInput> inputs;
  for (Param* p : model.params()) inputs.push_back({p->name, p->value, p->grad});
  testing::ExpectGradientsMatch([&] { return model.Evaluate(batch, normalizer, nullptr).loss; }, inputs,
                                /*tol=*/1e-7, /*eps=*/1e-6, max_elements);
}

// The same for a fresh model of `c` on two dense rows.
inline void CheckModelGradients(const config::Config& c, int max_elements) {
  Model model(ModelDims::FromConfig(c));
  const Batch batch = DenseBatch(c, 2);
  CheckGradients(model, batch, 2.0 * (batch.seq_len - 1), max_elements);
}

}  // namespace loom::model_testing
