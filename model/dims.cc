#include "model/dims.h"

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace loom {

ModelDims ModelDims::FromConfig(const config::Config& config) {
  const auto& m = config.model();
  ModelDims d;
  d.layers = m.layers();
  d.hidden = m.hidden();
  d.heads = m.heads();
  d.kv_heads = m.kv_heads();
  d.head_dim = m.hidden() / m.heads();
  d.ffn = m.ffn_hidden() > 0 ? m.ffn_hidden() : (8 * m.hidden() / 3 + 63) / 64 * 64;
  d.vocab = m.vocab();
  const int multiple = 64 * config.parallel().tp();
  d.padded_vocab = (m.vocab() + multiple - 1) / multiple * multiple;
  for (int l = 0; l < d.layers; ++l) d.kinds += m.pattern()[l % m.pattern().size()];
  d.tie_embeddings = m.tie_embeddings();
  d.norm_eps = m.norm_eps();
  d.rope_theta = m.rope_theta();
  absl::StatusOr<ops::RopeTable> rope = ops::RopeTable::FromConfig(m.rope_theta(), m.rope_scaling(), d.head_dim);
  LOOM_CHECK(rope.ok(), "[model] ", rope.status().message());
  d.rope = *std::move(rope);
  d.sigmoid_attention = m.attention() == "sigmoid";
  d.sigmoid_bias = -std::log(static_cast<double>(config.train().seq_len()));
  d.attention_backend = m.attention_backend() == "cudnn" ? ops::AttentionBackend::kCudnn : ops::AttentionBackend::kLoom;
  d.lightning_block = m.lightning_block();
  d.lightning_decay = m.lightning_decay();
  d.lightning_silu = m.lightning_silu();
  d.lightning_norm = m.lightning_norm();
  d.lightning_norm_eps = m.lightning_norm_eps() > 0 ? m.lightning_norm_eps() : m.norm_eps();
  d.lightning_gate = m.lightning_gate();
  d.init_std = m.init_std();
  d.recompute.assign(d.layers, m.recompute() == "all");
  if (!m.recompute().empty() && m.recompute() != "all") {
    for (const std::string& part : std::vector<std::string>(absl::StrSplit(m.recompute(), ','))) {
      int layer = 0;
      if (absl::SimpleAtoi(part, &layer) && layer >= 0 && layer < d.layers) d.recompute[layer] = true;
    }
  }
  d.dtype = config.train().dtype() == "f64" ? DType::kF64 : DType::kF32;
  d.mixed_bf16 = config.train().dtype() == "bf16";
  d.deterministic = config.train().deterministic();
  d.seed = config.train().seed();
  const auto& moe = m.moe();
  d.moe.experts = moe.experts();
  d.moe.top_k = moe.top_k();
  d.moe.ffn = moe.moe_ffn() > 0 ? moe.moe_ffn() : d.ffn;
  d.moe.shared_experts = moe.shared_experts();
  d.moe.sigmoid = moe.router() == "sigmoid";
  d.moe.normalize_top_k = moe.normalize_top_k();
  d.moe.aux_loss_coef = moe.aux_loss_coef();
  d.moe.z_loss_coef = moe.z_loss_coef();
  d.moe.bias_balancing = moe.bias_balancing();
  d.moe.bias_update_rate = moe.bias_update_rate();
  d.moe.capacity_factor = moe.capacity_factor();
  const auto& moh = m.moh();
  d.moh.shared_heads = moh.shared_heads();
  d.moh.top_k = moh.top_k();
  d.moh.aux_loss_coef = moh.aux_loss_coef();
  d.moh.fixed_gates = moh.fixed_gates();
  return d;
}

int64_t ModelDims::ParameterCount(bool with_embeddings) const {
  const int64_t c = hidden, qd = int64_t{heads} * head_dim, kvd = int64_t{kv_heads} * head_dim;
  int64_t n = c;  // final norm
  for (char kind : kinds) {
    n += 2 * c;  // two norms
    if (moe.experts > 0) {
      n += int64_t{moe.experts} * c + int64_t{moe.experts + moe.shared_experts} * 3 * c * moe.ffn;  // router, experts
    } else {
      n += 3 * c * ffn;  // SwiGLU
    }
    if (SoftmaxKind(kind)) {
      n += c * qd + 2 * c * kvd + qd * c;
    } else {
      n += 4 * c * qd + qd * c + head_dim;  // q, k, v, gate, out, per-head norm
    }
    if (MohKind(kind)) n += MohRouterRows() * c;  // W_s, W_r, W_h
  }
  if (with_embeddings) n += int64_t{padded_vocab} * c * (tie_embeddings ? 1 : 2);
  return n;
}

int64_t ModelDims::MohRouterRows() const {
  const int shared = moh.shared_heads, routed = heads - moh.shared_heads;
  int64_t rows = routed;  // W_r selects even with fixed gates
  if (!moh.fixed_gates) rows += shared + (shared > 0 && routed > 0 ? 2 : 0);
  return rows;
}

double ModelDims::FlopsPerToken(int64_t seq_len) const {
  // 6 FLOPs per parameter per token (forward 2, backward 4) for every matmul
  // weight, the output layer included (the input embedding is a lookup).
  const double matmul_params =
      static_cast<double>(ParameterCount(false)) + static_cast<double>(padded_vocab) * hidden;
  double flops = 6.0 * matmul_params;
  // MoE: only top_k of the routed experts run for a token.
  if (moe.experts > 0) flops -= 6.0 * kinds.size() * (moe.experts - moe.top_k) * 3.0 * hidden * moe.ffn;
  for (char kind : kinds) {
    if (SoftmaxKind(kind)) {
      // QKᵀ and PV: 2·2·S·d per token and head forward, causal halves it,
      // backward twice the forward: 6·S·d per head (DESIGN.md: 6·L·S·d).
      flops += 6.0 * seq_len * head_dim * heads;
    } else {
      // Lightning, per token and head with block B: intra-block 2·B·d (QKᵀ
      // over a causal half-block, then PV), state read 2·d² and state
      // update 2·d²: forward ≈ 2·B·d + 4·d², backward twice that.
      flops += 3.0 * (2.0 * lightning_block * head_dim + 4.0 * head_dim * head_dim) * heads;
    }
  }
  return flops;
}

}  // namespace loom
