#include "model/decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "ops/add.h"
#include "ops/embedding.h"
#include "ops/lightning_attention.h"
#include "ops/linear.h"
#include "ops/rmsnorm.h"
#include "ops/rope.h"
#include "ops/sigmoid_gate.h"
#include "ops/silu.h"
#include "ops/softmax_attention.h"
#include "ops/swiglu.h"

namespace loom {

int64_t DecodeCache::bytes() const {
  int64_t n = 0;
  for (const Layer& l : layers)
    for (const Tensor* t : {&l.k, &l.v, &l.state})
      if (t->defined()) n += static_cast<int64_t>(t->nbytes());
  return n;
}

absl::StatusOr<Decoder> Decoder::Create(Model& model) {
  const ModelDims& d = model.dims();
  if (!d.device.is_cpu() || d.mixed_bf16)
    return absl::InvalidArgumentError("[decode] the model must be on the CPU in f32 or f64");
  std::map<std::string, const Param*> by_name;
  for (const Param* p : model.params()) {
    if (p->sharded())
      return absl::InvalidArgumentError(absl::StrCat("[decode] ", p->name, " is a tensor-parallel shard"));
    by_name[p->name] = p;
  }
  absl::Status missing = absl::OkStatus();
  auto get = [&](const std::string& name) -> const Tensor* {
    auto it = by_name.find(name);
    if (it != by_name.end()) return &it->second->value;
    if (missing.ok())
      missing = absl::InvalidArgumentError(absl::StrCat("[decode] the model has no parameter ", name,
                                                        " (decoding needs the whole model in one process)"));
    return nullptr;
  };
  Decoder dec(model);
  dec.embed_ = get("embed");
  dec.final_norm_ = get("final_norm");
  dec.out_ = d.tie_embeddings ? dec.embed_ : get("lm_head");
  for (int l = 0; l < d.layers; ++l) {
    const std::string p = absl::StrCat("layers.", l, ".");
    LayerWeights w;
    w.kind = d.kinds[l];
    w.norm1 = get(p + "norm1");
    w.norm2 = get(p + "norm2");
    w.wq = get(p + "attn.wq");
    w.wk = get(p + "attn.wk");
    w.wv = get(p + "attn.wv");
    w.wo = get(p + "attn.wo");
    if (d.moe.experts == 0) {
      w.w_gate = get(p + "mlp.w_gate");
      w.w_up = get(p + "mlp.w_up");
      w.w_down = get(p + "mlp.w_down");
    }
    if (!SoftmaxKind(w.kind)) {
      if (d.lightning_gate) w.wg = get(p + "attn.wg");
      if (d.lightning_norm) w.head_norm = get(p + "attn.norm");
      std::vector<double> decay(d.heads, 1.0);
      if (d.lightning_decay) decay = ops::LightningDecay(d.heads, l, d.layers);
      w.decay = Tensor::FromVector<double>(decay, {d.heads}).To(d.act_dtype());
    }
    dec.layers_.push_back(std::move(w));
  }
  for (const auto& [layer, moh] : model.MohRouters()) dec.layers_[layer].moh = moh;
  for (const auto& [layer, moe] : model.MoeLayers()) dec.layers_[layer].moe = moe;
  LOOM_RETURN_IF_ERROR(missing);
  return dec;
}

DecodeCache Decoder::NewCache(int64_t capacity) const {
  const ModelDims& d = dims();
  DecodeCache cache;
  cache.capacity = capacity;
  cache.layers.resize(d.layers);
  for (int l = 0; l < d.layers; ++l) {
    DecodeCache::Layer& c = cache.layers[l];
    if (SoftmaxKind(d.kinds[l])) {
      c.k = Tensor::Zeros({capacity, d.kv_heads, d.head_dim}, d.act_dtype());
      c.v = Tensor::Zeros({capacity, d.kv_heads, d.head_dim}, d.act_dtype());
    } else {
      c.state = Tensor::Zeros({1, d.heads, d.head_dim, d.head_dim}, d.act_dtype());
    }
  }
  return cache;
}

void Decoder::SoftmaxStep(const LayerWeights& w, DecodeCache::Layer& cache, int64_t p0, const Tensor& x,
                          Tensor& y) const {
  const ModelDims& d = dims();
  const int64_t t = x.dim(0), hq = d.heads, hk = d.kv_heads, hd = d.head_dim;
  Tensor q = d.Act({t, hq, hd}), k = d.Act({t, hk, hd}), v = d.Act({t, hk, hd});
  ops::LinearForward(x, *w.wq, q);
  ops::LinearForward(x, *w.wk, k);
  ops::LinearForward(x, *w.wv, v);
  std::vector<int32_t> pos(t);
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(p0));
  const Tensor positions = Tensor::FromVector<int32_t>(pos, {t});
  ops::RopeForward(q, positions, d.rope, q);
  ops::RopeForward(k, positions, d.rope, k);
  cache.k.Slice(p0, t).CopyFrom(k);
  cache.v.Slice(p0, t).CopyFrom(v);
  // The new queries sit at positions p0.. and see keys 0..p0+i.
  ops::AttentionOptions options;
  options.causal = true;
  options.sigmoid = d.sigmoid_attention;
  options.sigmoid_bias = d.sigmoid_bias;
  options.q_offset = p0;
  options.k_offset = 0;
  Tensor o = d.Act({t, hq, hd}), lse = d.Stat({t, hq});
  ops::SoftmaxAttentionForward(q, cache.k.Slice(0, p0 + t), cache.v.Slice(0, p0 + t), ops::TokenRows::Uniform(1, t),
                               ops::TokenRows::Uniform(1, p0 + t), options, o, lse);
  GateHeads(w, x, o);
  ops::LinearForward(o, *w.wo, y);
}

void Decoder::LightningStep(const LayerWeights& w, DecodeCache::Layer& cache, const Tensor& x, Tensor& y) const {
  const ModelDims& d = dims();
  const int64_t t = x.dim(0), h = d.heads, hd = d.head_dim;
  Tensor q = d.Act({t, h, hd}), k = d.Act({t, h, hd}), v = d.Act({t, h, hd});
  ops::LinearForward(x, *w.wq, q);
  ops::LinearForward(x, *w.wk, k);
  ops::LinearForward(x, *w.wv, v);
  if (d.lightning_silu) {
    ops::SiluForward(q, q);
    ops::SiluForward(k, k);
    ops::SiluForward(v, v);
  }
  // One row of T tokens continuing from the cached state: o_t = q_t S_t,
  // S_t = λ S_{t−1} + k_tᵀ v_t (ops/lightning_attention.h with state_in).
  Tensor a = d.Act({t, h, hd});
  Tensor state_out = Tensor::Empty(cache.state.shape(), cache.state.dtype());
  ops::LightningOptions options;
  options.block = d.lightning_block;
  ops::LightningAttentionForward(q, k, v, w.decay, ops::TokenRows::Uniform(1, t), options, cache.state, a,
                                 state_out);
  cache.state = state_out;
  Tensor n = a.Reshape({t * h, hd});
  if (w.head_norm != nullptr) {
    n = d.Act({t * h, hd});
    Tensor rstd = d.Stat({t * h});
    ops::RmsNormForward(a.Reshape({t * h, hd}), *w.head_norm, d.lightning_norm_eps, n, rstd);
  }
  Tensor gated = n.Reshape({t, h * hd});
  if (w.wg != nullptr) {
    Tensor g = d.Act({t, h * hd});
    ops::LinearForward(x, *w.wg, g);
    gated = d.Act({t, h * hd});
    ops::SigmoidGateForward(n.Reshape({t, h * hd}), g, gated);
  }
  GateHeads(w, x, gated);
  ops::LinearForward(gated, *w.wo, y);
}

void Decoder::GateHeads(const LayerWeights& w, const Tensor& x, Tensor& o) {
  if (w.moh == nullptr) return;
  w.moh->Forward(x);
  o = w.moh->Gate(o);
  w.moh->ReleaseActivations();
}

absl::StatusOr<Tensor> Decoder::Extend(DecodeCache& cache, const std::vector<int32_t>& tokens) const {
  const ModelDims& d = dims();
  const int64_t t = static_cast<int64_t>(tokens.size()), c = d.hidden, p0 = cache.length;
  if (t == 0) return absl::InvalidArgumentError("[decode] no tokens to feed");
  if (static_cast<int>(cache.layers.size()) != d.layers)
    return absl::InvalidArgumentError("[decode] the cache was made for another model");
  if (d.kinds.find_first_of("SH") != std::string::npos && p0 + t > cache.capacity)
    return absl::OutOfRangeError(absl::StrCat("[decode] ", p0 + t, " positions exceed the cache's capacity of ",
                                              cache.capacity));
  for (int64_t i = 0; i < t; ++i)
    if (tokens[i] < 0 || tokens[i] >= d.vocab)
      return absl::InvalidArgumentError(
          absl::StrCat("[decode] token id ", tokens[i], " is outside the vocabulary [0, ", d.vocab, ")"));
  // x = Embed(tokens); per block x1 = x + Mixer(RMSNorm(x)), x = x1 + MLP(RMSNorm(x1)).
  Tensor x = d.Act({t, c});
  ops::EmbeddingForward(Tensor::FromVector<int32_t>(tokens, {t}), *embed_, x);
  Tensor n = d.Act({t, c}), rstd = d.Stat({t}), mixed = d.Act({t, c});
  const int64_t f = d.ffn;
  Tensor gate = d.Act({t, f}), up = d.Act({t, f}), hidden = d.Act({t, f});
  for (int l = 0; l < d.layers; ++l) {
    const LayerWeights& w = layers_[l];
    ops::RmsNormForward(x, *w.norm1, d.norm_eps, n, rstd);
    if (SoftmaxKind(w.kind)) {
      SoftmaxStep(w, cache.layers[l], p0, n, mixed);
    } else {
      LightningStep(w, cache.layers[l], n, mixed);
    }
    ops::AddInPlace(mixed, x);  // x1
    std::swap(x, mixed);
    ops::RmsNormForward(x, *w.norm2, d.norm_eps, n, rstd);
    if (w.moe != nullptr) {
      w.moe->Forward(n, mixed);
      w.moe->ReleaseActivations();
    } else {
      ops::LinearForward(n, *w.w_gate, gate);
      ops::LinearForward(n, *w.w_up, up);
      ops::SwigluForward(gate, up, hidden);
      ops::LinearForward(hidden, *w.w_down, mixed);
    }
    ops::AddInPlace(mixed, x);
    std::swap(x, mixed);
  }
  cache.length = p0 + t;
  ops::RmsNormForward(x, *final_norm_, d.norm_eps, n, rstd);
  Tensor padded = d.Act({t, d.padded_vocab});
  ops::LinearForward(n, *out_, padded);
  Tensor logits = d.Act({t, d.vocab});
  const size_t row_bytes = static_cast<size_t>(d.vocab) * DTypeSize(d.act_dtype());
  for (int64_t i = 0; i < t; ++i)
    std::memcpy(static_cast<char*>(logits.raw()) + i * row_bytes, padded.Slice(i, 1).raw(), row_bytes);
  return logits;
}

int32_t SampleToken(const Tensor& logits, double temperature, double top_p, double u) {
  const int64_t v = logits.numel();
  LOOM_CHECK(v > 0, "[sample] empty logits");
  int64_t best = 0;
  for (int64_t i = 1; i < v; ++i)
    if (logits.Get(i) > logits.Get(best)) best = i;
  if (temperature <= 0) return static_cast<int32_t>(best);
  // p_i ∝ exp((l_i − max) / temperature), most probable first.
  const double top = logits.Get(best);
  std::vector<double> p(v);
  for (int64_t i = 0; i < v; ++i) p[i] = std::exp((logits.Get(i) - top) / temperature);
  const double sum = std::accumulate(p.begin(), p.end(), 0.0);
  std::vector<int64_t> order(v);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  // The nucleus: the shortest prefix whose probability reaches top_p.
  int64_t kept = 0;
  double mass = 0;
  while (kept < v && (kept == 0 || mass < top_p * sum)) mass += p[order[kept++]];
  double target = u * mass;
  for (int64_t i = 0; i < kept; ++i) {
    target -= p[order[i]];
    if (target < 0) return static_cast<int32_t>(order[i]);
  }
  return static_cast<int32_t>(order[kept - 1]);
}

}  // namespace loom
