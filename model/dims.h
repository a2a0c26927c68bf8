// Model hyper-parameters resolved from the config: derived sizes computed
// once (head_dim, ffn width, padded vocab, per-layer kinds).
#pragma once

#include <string>
#include <vector>

#include "configs/loom.pb.h"
#include "ops/rope.h"
#include "ops/softmax_attention.h"
#include "runtime/tensor.h"

namespace loom {

struct MoeParallel;  // model/moe.h
class Communicator;

// Mixture-of-experts MLP (configs/loom.proto MoeConfig); experts == 0: dense.
struct MoeDims {
  int experts = 0;
  int top_k = 2;
  int ffn = 0;  // each expert's inner width, resolved
  int shared_experts = 0;
  bool sigmoid = false;
  bool normalize_top_k = false;
  double aux_loss_coef = 0;
  double z_loss_coef = 0;
  bool bias_balancing = false;
  double bias_update_rate = 0;
  double capacity_factor = 0;  // 0: dropless
  const MoeParallel* parallel = nullptr;  // not owned; set by the caller, not the config (model/moe.h)
};

// Mixture-of-head attention of the H and R layers (configs/loom.proto
// MohConfig, model/moh.h).
struct MohDims {
  int shared_heads = 0;
  int top_k = 2;
  double aux_loss_coef = 0;
  bool fixed_gates = false;
  // Not the config: the dp × cp group the routing statistics are summed over
  // (model/moh.h); null: this process alone. Set by the launcher.
  Communicator* stats = nullptr;
};

// Layer letters: 'S' and 'H' run softmax attention, 'L' and 'R' lightning;
// 'H' and 'R' gate their heads (MoH).
inline bool SoftmaxKind(char kind) { return kind == 'S' || kind == 'H'; }
inline bool MohKind(char kind) { return kind == 'H' || kind == 'R'; }

struct ModelDims {
  int layers = 0;
  int hidden = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int ffn = 0;
  int vocab = 0;         // true vocabulary
  int padded_vocab = 0;  // multiple of 64·tp; rows ≥ vocab are masked
  std::string kinds;     // one letter a layer: 'S', 'L', 'H' or 'R'
  bool tie_embeddings = false;
  double norm_eps = 1e-5;
  double rope_theta = 10000;
  ops::RopeTable rope;  // softmax layers' RoPE frequencies: rope_theta and rope_scaling
  bool sigmoid_attention = false;
  double sigmoid_bias = 0;  // −log(train.seq_len)
  ops::AttentionBackend attention_backend = ops::AttentionBackend::kLoom;  // bf16 CUDA softmax attention
  int lightning_block = 64;
  bool lightning_decay = true;
  bool lightning_silu = true;
  bool lightning_norm = true;
  double lightning_norm_eps = 1e-5;  // the per-head output norm's (model.lightning_norm_eps, or norm_eps if 0)
  bool lightning_gate = true;
  double init_std = 0.02;
  std::vector<bool> recompute;  // per layer
  // Precision and place (docs/gpu.md). dtype: parameters, their gradients
  // and the optimizer (the master weights). act_dtype(): activations and the
  // residual stream, bf16 in mixed-precision GPU runs, else dtype.
  // Statistics (norm rstd, lightning states, decays) are act_dtype() on the
  // CPU and f32 on the GPU.
  DType dtype = DType::kF32;
  bool mixed_bf16 = false;  // train.dtype = bf16
  bool deterministic = false;  // train.deterministic: GPU reductions in a fixed order
  Device device;  // set by the launcher (FromConfig leaves the CPU)
  uint64_t seed = 0;
  MoeDims moe;
  MohDims moh;

  static ModelDims FromConfig(const config::Config& config);

  DType act_dtype() const { return mixed_bf16 ? DType::kBF16 : dtype; }
  DType stat_dtype() const { return device.is_cpu() ? act_dtype() : DType::kF32; }
  // Uninitialised activations and statistics on the model's device.
  Tensor Act(const Shape& shape) const { return Tensor::Empty(shape, act_dtype(), device); }
  Tensor Stat(const Shape& shape) const { return Tensor::Empty(shape, stat_dtype(), device); }

  // Parameters, with or without the embedding and output matrices.
  int64_t ParameterCount(bool with_embeddings) const;
  // Rows of an MoH layer's router weights W_s, W_r, W_h together ([rows, C]).
  int64_t MohRouterRows() const;
  // Model FLOPs per token, forward + backward, at sequence length seq_len
  // (the formula is in docs/metrics.md).
  double FlopsPerToken(int64_t seq_len) const;
};

}  // namespace loom
