#!/usr/bin/env bash
# loom-train fine-tunes a Hugging Face model imported by `loom-ckpt import-hf`:
# resuming the imported checkpoint (step 0, zero moments) with the same
# model config starts from the imported weights (its first loss differs from
# a fresh initialisation's on the same batches) and trains (the loss falls).
set -eu
train=$1; ckpt=$2; src=$3
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$ckpt" import-hf --from "$src/tests/fixtures/hf/llama_f32" --to "$work/imported"
# The fixture's model (config.json), and a recall task small enough for its
# 100-token vocabulary.
common=(--config "$src/configs/default.textproto" --set model.pattern=S --set model.layers=2 --set model.hidden=64 --set model.heads=4
        --set model.kv_heads=2 --set model.vocab=100 --set model.ffn_hidden=96 --set model.norm_eps=1e-5
        --set data.recall.key_vocab=32 --set data.recall.value_vocab=32 --set data.recall.pairs=8
        --set data.recall.queries=8 --set train.seq_len=64 --set train.steps=30 --set train.global_batch=8
        --set train.micro_batch=8 --set train.log_every=1 --set train.eval_every=0 --set optim.lr=3e-3
        --set optim.warmup_steps=2)
"$train" "${common[@]}" --set train.run_dir="$work/tuned" --set checkpoint.resume="$work/imported" \
  | grep -E "resumed from .*step_00000000 at step 0"
"$train" "${common[@]}" --set train.run_dir="$work/fresh" --set checkpoint.resume=none >/dev/null
loss() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\).*"loss": \([0-9.e+-]*\).*/\1 \2/' | awk -v s="$2" '$1 == s { print $2 }'; }
t1=$(loss "$work/tuned" 1); f1=$(loss "$work/fresh" 1); t30=$(loss "$work/tuned" 30)
echo "step 1 loss: imported $t1, fresh init $f1; imported at step 30: $t30"
awk -v t1="$t1" -v f1="$f1" -v t30="$t30" 'BEGIN {
  bad = 0
  if (t1 == "" || f1 == "" || t30 == "") { print "FAIL: missing losses"; exit 1 }
  d = t1 - f1; if (d < 0) d = -d
  if (d < 1e-3) { print "FAIL: the imported run starts at the fresh run'"'"'s loss (" t1 " vs " f1 "): weights not loaded"; bad = 1 }
  if (!(t30 < t1 - 0.5)) { print "FAIL: fine-tuning did not lower the loss by 0.5 (" t1 " -> " t30 ")"; bad = 1 }
  exit bad }'
echo "ok: loom-train fine-tunes the imported checkpoint"
