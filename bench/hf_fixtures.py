#!/usr/bin/env python3
"""Generates tests/fixtures/hf/: Hugging Face reference data for Loom's
import/export (checkpoint/hf.h) and RoPE scaling (ops/rope.h) tests.

Run once, with PyTorch and transformers installed, and commit the output;
CI reads the files and never needs Python:

    python3 bench/hf_fixtures.py [--out tests/fixtures/hf]

Writes
  llama_f32/     a tiny LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV
                 heads, vocab 100, untied, default RoPE) saved as two F32
                 safetensors shards plus model.safetensors.index.json
  llama_f32.logits.safetensors   input_ids [T] i64 and its logits [T, 100] f32
  llama_yarn_bf16/  a 1-layer variant, tied embeddings, YaRN RoPE (attention
                 factor != 1) in the older rope_theta/rope_scaling spelling,
                 one BF16 shard
  llama_yarn_bf16.logits.safetensors
  rope.json      for each RoPE type, the config fields given to transformers,
                 its inv_freq (f32, as transformers computes it) and
                 attention_factor, from transformers' ROPE_INIT_FUNCTIONS.

"dynamic" (NTK) is evaluated at a fixed seq_len: transformers'
_compute_dynamic_ntk_parameters gives
  base' = base · (factor·L/m − (factor − 1))^(d/(d−2)),  L = max(seq_len, m),
m = max_position_embeddings. Loom's "dynamic" is this formula frozen at
L = rope_scaling.dynamic_seq_len (static NTK-aware base scaling).

The logits are computed in f32 on the CPU (the math is the same f32 math as
on a GPU with TF32 off).
"""
import argparse
import copy
import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SEED = 1234
INPUT_LEN = 24


def build_model(config, seed):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        # Norm weights away from 1, so a mixed-up norm is seen in the logits.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def input_ids(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (INPUT_LEN,), generator=g)


def save_logits(model, ids, path):
    with torch.no_grad():
        logits = model(input_ids=ids[None, :]).logits[0].float().contiguous()
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits}, path)
    return logits


def save_sharded(model, folder, dtype, shards):
    """save_pretrained, but with an exact shard split and dtype we choose."""
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    per = (len(names) + shards - 1) // shards
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def rope_cases():
    """(name, config kwargs, seq_len) for each RoPE type Loom implements."""
    base = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    return [
        ("default", dict(base, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None),
        ("linear", dict(base, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), None),
        # Older spelling: rope_theta at the top, rope_scaling with "type".
        ("dynamic", dict(base, rope_theta=500000.0, rope_scaling={"type": "dynamic", "factor": 4.0}), 256),
        ("yarn", dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                             "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                             "beta_slow": 1.0}), None),
        ("yarn_mscale", dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 16, "mscale": 1.0,
                                                    "mscale_all_dim": 0.5, "truncate": False}), None),
        ("llama3", dict(base, max_position_embeddings=1024,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}), None),
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/fixtures/hf")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_default_dtype(torch.float32)

    # 1. The main model: untied, default RoPE, two F32 shards.
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=False, initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    model = build_model(cfg, SEED)
    save_sharded(model, os.path.join(args.out, "llama_f32"), torch.float32, shards=2)
    logits = save_logits(model, input_ids(100, SEED), os.path.join(args.out, "llama_f32.logits.safetensors"))
    print(f"llama_f32: logits std {logits.std():.3f}, max |logit| {logits.abs().max():.3f}")

    # 2. Tied, YaRN (old spelling), one BF16 shard; logits from the
    # bf16-rounded weights computed in f32.
    cfg2 = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                       rms_norm_eps=1e-6, rope_theta=10000.0,
                       rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                       tie_word_embeddings=True, initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    model2 = build_model(cfg2, SEED + 1)
    with torch.no_grad():
        for p in model2.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    folder2 = os.path.join(args.out, "llama_yarn_bf16")
    save_sharded(model2, folder2, torch.bfloat16, shards=1)
    # transformers 5 writes rope_parameters; keep this folder in the older
    # spelling (rope_theta + rope_scaling) that most published models use.
    with open(os.path.join(folder2, "config.json")) as f:
        c = json.load(f)
    c.pop("rope_parameters")
    c["rope_theta"] = 10000.0
    c["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    with open(os.path.join(folder2, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    reloaded = LlamaForCausalLM.from_pretrained(folder2, dtype=torch.float32).eval()
    assert abs(reloaded.model.rotary_emb.attention_scaling - model2.model.rotary_emb.attention_scaling) < 1e-12
    logits2 = save_logits(model2, input_ids(100, SEED + 1),
                          os.path.join(args.out, "llama_yarn_bf16.logits.safetensors"))
    print(f"llama_yarn_bf16: attention factor {model2.model.rotary_emb.attention_scaling:.6f}, "
          f"logits std {logits2.std():.3f}")

    # 3. RoPE tables.
    cases = []
    for name, kwargs, seq_len in rope_cases():
        config = LlamaConfig(**copy.deepcopy(kwargs))  # it rewrites rope dicts in place
        rope_type = config.rope_parameters["rope_type"]
        if rope_type == "default":
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
            attention_factor = 1.0
        else:
            inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
        cases.append({
            "name": name,
            "config": kwargs,  # the config.json fields, as a user's config.json spells them
            "seq_len": seq_len,
            "head_dim": config.head_dim,
            "inv_freq": [float(x) for x in inv_freq.tolist()],
            "attention_factor": float(attention_factor),
        })
        print(f"rope {name}: attention_factor {attention_factor:.9f}, inv_freq[-1] {inv_freq[-1].item():.6e}")
    with open(os.path.join(args.out, "rope.json"), "w") as f:
        json.dump({"generator": "bench/hf_fixtures.py", "transformers": __import__("transformers").__version__,
                   "torch": torch.__version__, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
