// Hugging Face Llama folders <-> Loom checkpoints (`loom-ckpt import-hf`,
// `export-hf`).
//
// A Hugging Face folder: config.json (model_type "llama",
// LlamaForCausalLM) and the weights in model.safetensors, or in several
// shards named by model.safetensors.index.json's weight_map. Tensors map
// one to one, layouts unchanged (nn.Linear's [out, in] is Loom's W):
//
//   model.embed_tokens.weight                  embed        [V, C] -> [Vp, C]
//   model.layers.N.input_layernorm.weight      layers.N.norm1
//   model.layers.N.self_attn.q_proj.weight     layers.N.attn.wq   [H·D, C]
//   model.layers.N.self_attn.k_proj.weight     layers.N.attn.wk   [Hkv·D, C]
//   model.layers.N.self_attn.v_proj.weight     layers.N.attn.wv   [Hkv·D, C]
//   model.layers.N.self_attn.o_proj.weight     layers.N.attn.wo   [C, H·D]
//   model.layers.N.post_attention_layernorm.weight  layers.N.norm2
//   model.layers.N.mlp.gate_proj.weight        layers.N.mlp.w_gate [F, C]
//   model.layers.N.mlp.up_proj.weight          layers.N.mlp.w_up   [F, C]
//   model.layers.N.mlp.down_proj.weight        layers.N.mlp.w_down [C, F]
//   model.norm.weight                          final_norm
//   lm_head.weight (untied only)               lm_head      [V, C] -> [Vp, C]
//
// q_proj/k_proj rows need no permutation: transformers' rotate_half pairs
// dimension i with i + D/2, as Loom's RoPE does (ops/rope.h). The vocabulary
// is padded to ModelDims::padded_vocab with zero rows on import; export
// drops the padding. Weights are stored as f32 whatever the source dtype
// (F32, BF16, F16).
//
// config.json -> model config: pattern "S", layers, hidden, heads, kv_heads,
// vocab, ffn_hidden = intermediate_size, tie_embeddings, norm_eps =
// rms_norm_eps, rope_theta and rope_scaling from rope_theta/rope_scaling or
// rope_parameters. Anything Loom cannot represent (another architecture,
// attention or MLP bias, head_dim != hidden/heads, partial rotary, another
// activation, another RoPE type) is an error naming it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "configs/loom.pb.h"
#include "runtime/status.h"

namespace loom::checkpoint {

// The RoPE fields of a config.json text (rope_theta + rope_scaling, or
// rope_parameters) into model->rope_theta and model->rope_scaling: its type
// and the fields that type reads; others are left as they are. Errors
// start with "[hf]".
absl::Status RopeFromHfConfig(std::string_view config_json, config::ModelConfig* model);

// A whole Loom config (defaults, then the model section from config.json),
// validated.
absl::StatusOr<config::Config> ConfigFromHf(std::string_view config_json);

// The folder's config and its weights under Loom's names (f32, vocab
// padded), in Model::params() order. Errors name the folder and what is
// missing or unsupported: "[hf] <dir>: tensor model.norm.weight missing".
struct HfModel {
  config::Config config;
  std::vector<NamedTensor> tensors;
};
absl::StatusOr<HfModel> ReadHfModel(const std::string& dir);

// ReadHfModel, then a Loom checkpoint at step 0 in ckpt_dir (step_00000000/
// and `latest`): the weights, zero AdamW moments and optim.steps = 0, so
// that loom-train can fine-tune from it (checkpoint.resume = its path).
absl::Status ImportHf(const std::string& hf_dir, const std::string& ckpt_dir);

// A Loom checkpoint (a directory with `latest` or a step directory) of an
// all-softmax dense model as a Hugging Face folder: config.json and
// model.safetensors, or shards of at most max_shard_bytes with
// model.safetensors.index.json. Weights in f32; optimizer state dropped.
absl::Status ExportHf(const std::string& ckpt_path, const std::string& hf_dir,
                      int64_t max_shard_bytes = int64_t{2} << 30);

}  // namespace loom::checkpoint
