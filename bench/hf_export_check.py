#!/usr/bin/env python3
"""Checks that transformers loads Loom's export-hf output and computes the
same logits as the fixture model Loom imported.

    build/bin/loom-ckpt import-hf --from tests/fixtures/hf/llama_f32 --to /tmp/ck
    build/bin/loom-ckpt export-hf --from /tmp/ck --to /tmp/hf_out
    python3 bench/hf_export_check.py /tmp/hf_out tests/fixtures/hf/llama_f32.logits.safetensors

Loads the folder with LlamaForCausalLM.from_pretrained in f32 (on a GPU if
one is visible, TF32 off), runs the fixture's input ids, and prints the
largest logit difference; exit 1 if it exceeds --tol (default 1e-4) or if
transformers reports missing or unexpected weights.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("logits_fixture")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = LlamaForCausalLM.from_pretrained(args.export_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print(f"FAIL: transformers loading {args.export_dir}: {bad}")
        return 1
    model = model.to(device).eval()
    ref = load_file(args.logits_fixture)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"][None, :].to(device)).logits[0].float().cpu()
    diff = (logits - ref["logits"]).abs().max().item()
    ok = diff <= args.tol
    print(f"{'ok' if ok else 'FAIL'}: {args.export_dir} on {device}: max |logit - fixture| = {diff:.3e} "
          f"(tolerance {args.tol:g}), attention factor {model.model.rotary_emb.attention_scaling:.6f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
