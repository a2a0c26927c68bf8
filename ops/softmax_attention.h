// Softmax attention (and sigmoid attention) with GQA, causal masks by
// absolute position, documents, and the LSE that ring attention merges with.
//   q [Tq, Hq, D], k, v [Tk, Hk, D], o [Tq, Hq, D], lse [Tq, Hq]
//   Query head h reads KV head h / (Hq / Hk).
//   Rows of q and k correspond one to one (q_rows.rows() == k_rows.rows()).
//   Within a row, query i has position q_offset + i, key j k_offset + j;
//   causal: visible iff q_offset + i ≥ k_offset + j; and, with documents,
//   only keys of the query's document id.
// softmax:  S = scale·q kᵀ, P = softmax(S over visible keys), o = P v,
//           lse = log Σ exp(S) (−inf and o = 0 for a row with no visible key).
// sigmoid:  P = sigmoid(scale·q kᵀ + bias) on visible keys, 0 elsewhere;
//           o = P v; no normaliser (lse is left untouched).
// Backward: dq, dk, dv written.
#pragma once

#include "ops/attention_seqs.h"
#include "runtime/tensor.h"

namespace loom::ops {

struct AttentionOptions {
  bool causal = true;
  double scale = 0;            // 0: 1/sqrt(D)
  bool sigmoid = false;        // FlashSigmoid instead of softmax
  double sigmoid_bias = 0;     // b, DESIGN.md: −log(train.seq_len)
  int64_t q_offset = 0;        // position of a row's first query
  int64_t k_offset = 0;        // position of a row's first key
};

void SoftmaxAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, const TokenRows& q_rows,
                             const TokenRows& k_rows, const AttentionOptions& options, Tensor& o, Tensor& lse);

void SoftmaxAttentionBackward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                              const Tensor& lse, const Tensor& d_o, const TokenRows& q_rows,
                              const TokenRows& k_rows, const AttentionOptions& options, Tensor& dq, Tensor& dk,
                              Tensor& dv);

}  // namespace loom::ops
