#!/usr/bin/env bash
# Loom's training step equals the PyTorch oracle's (bench/torch_oracle.py,
# docs/oracle.md): loom-train --export_oracle on the CPU in f32, then the
# oracle on the CPU in f32 replays the exported weights and micro-batches;
# every step's loss must agree within 1e-4 relative. Two models of
# configs/default.textproto: the hybrid (S, L, L, S) and softmax only
# (model.pattern=S); two micro-batches a step (gradient accumulation), the
# LR schedule in warm-up. Exits 77 (skipped) when python3 cannot import torch.
set -u
bin=$1; src=$2; steps=${3:-6}
python=${PYTHON:-python3}
if ! why=$("$python" -c "import torch, numpy" 2>&1); then
  echo "SKIPPED: $python cannot import torch and numpy, which the oracle needs: $(echo "$why" | tail -1)"
  exit 77
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
status=0
for variant in hybrid softmax; do
  run_dir="$tmp/$variant"
  sets=(--set train.steps="$steps" --set optim.warmup_steps=3 --set train.run_dir="$run_dir" --set train.micro_batch=32
        --set train.eval_every=0
        --set train.log_every=1000)
  [ "$variant" = softmax ] && sets+=(--set model.pattern=S)
  if ! "$bin" --config "$src/configs/default.textproto" "${sets[@]}" --export_oracle > "$tmp/loom.log" 2>&1; then
    echo "loom-train failed ($variant):"; cat "$tmp/loom.log"; exit 1
  fi
  echo "== $variant: $(grep -c '"loss"' "$run_dir/metrics.jsonl") Loom steps; the oracle replays them"
  "$python" "$src/bench/torch_oracle.py" --export "$run_dir/oracle" --device cpu --dtype f32 --threads 1 \
    --compare "$run_dir/metrics.jsonl" --rtol 1e-4 > "$tmp/oracle.log" 2>&1 || status=1
  grep -v '^{' "$tmp/oracle.log"
done
exit $status
