// Incremental decoding of a trained Model (loom-generate): the same math as
// Model's forward, one chunk of new tokens at a time, with a per-sequence
// cache so that no token is ever processed twice.
//
//   softmax layer 'S'  the cache keeps K and V of every earlier position
//                      (RoPE applied at their absolute positions), [P, Hkv, D]
//                      preallocated for `capacity` positions; new queries at
//                      positions p0..p0+T−1 attend causally over keys 0..p0+T−1.
//   lightning layer 'L' the cache keeps only the recurrent state
//                      S [H, D, D] (f32/f64, the model's dtype):
//                        S_t = λ_h S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t
//                      so its memory does not grow with the sequence. The
//                      step reuses ops::LightningAttentionForward with
//                      state_in = S on a one-row chunk (its o and final state
//                      are exactly the recurrence above), then SiLU, head
//                      norm, gate and W_o as model/lightning_attention_layer.cc.
//
// Prefill runs the same Extend on the whole prompt at once (one chunk of T
// tokens: the block algorithm inside lightning layers, causal attention
// inside softmax layers); decoding calls Extend with one token. Both give
// the logits of every new position, equal to the full-sequence forward's
// (tests/model/decode_test.cc).
//
// MoH layers ('H', 'R') gate the new tokens' head outputs before W_o with
// the layer's own router (MohRouter::Forward on the new tokens: the gates
// are per token); MoE MLPs run the layer's MoeLayer::Forward on the new
// tokens. Both are exact for dropless routing; with an MoE capacity the
// drops depend on the tokens of one call, so decoding can differ there.
//
// Weights are read by name from Model::params() (no copy): the model must be
// one process's whole model (no TP/PP shards), on the CPU.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace loom {

struct DecodeCache {
  struct Layer {
    Tensor k, v;   // softmax: [capacity, Hkv, D]; rows [0, length) are filled
    Tensor state;  // lightning: [1, H, D, D]
  };
  std::vector<Layer> layers;
  int64_t length = 0;    // positions consumed so far
  int64_t capacity = 0;  // most positions a softmax layer can hold
  // Bytes held by the cache's tensors (the K/V buffers at full capacity).
  int64_t bytes() const;
};

class Decoder {
 public:
  // Checks that `model` can be decoded (see the top); keeps a reference:
  // the model must outlive the decoder.
  // MoH and MoE layers are run through the model's own router and layer
  // objects (their saved activations are overwritten and released).
  static absl::StatusOr<Decoder> Create(Model& model);

  // An empty cache for up to `capacity` positions (softmax layers allocate
  // their K/V for all of them now; lightning layers need none).
  DecodeCache NewCache(int64_t capacity) const;

  // Feeds tokens [T] (ids in [0, vocab)) at positions cache.length ..
  // cache.length + T − 1 and returns the logits of each, [T, vocab] (the
  // true vocabulary: padding rows dropped), in the model's dtype. Errors if
  // the cache would exceed its capacity or an id is out of range.
  absl::StatusOr<Tensor> Extend(DecodeCache& cache, const std::vector<int32_t>& tokens) const;

  const ModelDims& dims() const { return model_->dims(); }

 private:
  struct LayerWeights {
    char kind = 'S';
    const Tensor *norm1 = nullptr, *norm2 = nullptr;
    const Tensor *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    const Tensor *wg = nullptr, *head_norm = nullptr;  // lightning, when enabled
    const Tensor *w_gate = nullptr, *w_up = nullptr, *w_down = nullptr;  // dense MLP
    Tensor decay;  // lightning: λ_h [H]
    MohRouter* moh = nullptr;  // H, R layers
    MoeLayer* moe = nullptr;   // MoE MLP
  };
  explicit Decoder(const Model& model) : model_(&model) {}
  // MoH: the head outputs o [T, H·D] of the new tokens x [T, C] times their gates (in place).
  static void GateHeads(const LayerWeights& w, const Tensor& x, Tensor& o);
  // x [T, C] is the normed block input; writes the mixer's output y [T, C].
  void SoftmaxStep(const LayerWeights& w, DecodeCache::Layer& cache, int64_t p0, const Tensor& x, Tensor& y) const;
  void LightningStep(const LayerWeights& w, DecodeCache::Layer& cache, const Tensor& x, Tensor& y) const;

  const Model* model_;
  const Tensor *embed_ = nullptr, *final_norm_ = nullptr, *out_ = nullptr;
  std::vector<LayerWeights> layers_;
};

// Next-token choice from one position's logits [vocab] (f32 or f64):
// temperature 0 is greedy (argmax, lowest id on ties); otherwise softmax of
// logits / temperature, restricted to the nucleus (the most probable ids
// whose cumulative probability first reaches top_p; top_p ≥ 1 keeps all),
// sampled with uniform `u` in [0, 1).
int32_t SampleToken(const Tensor& logits, double temperature, double top_p, double u);

}  // namespace loom
