#!/usr/bin/env bash
# Loom's training step equals the PyTorch oracle's (bench/torch_oracle.py,
# docs/oracle.md): loom-train --export_oracle on the CPU in f32, then the
# oracle on the CPU in f32 replays the exported weights and micro-batches;
# every step's loss must agree within 1e-4 relative. Two models of
# configs/default.textproto: the hybrid (S, L, L, S) and softmax only
# (model.pattern=S); two micro-batches a step (gradient accumulation), the
# LR schedule in warm-up. Then configs/tiny_text.textproto's hybrid in f64
# on paragraphs of license texts (documents start inside rows: the
# lightning states and attention reset there), within 1e-9. Exits 77
# (skipped) when python3 cannot import torch.
set -u
bin=$1; src=$2; steps=${3:-6}
python=${PYTHON:-python3}
if ! why=$("$python" -c "import torch, numpy" 2>&1); then
  echo "SKIPPED: $python cannot import torch and numpy, which the oracle needs: $(echo "$why" | tail -1)"
  exit 77
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
status=0
lic=/usr/share/common-licenses
"$(dirname "$bin")/loom-prepare" --input "$lic/GPL-3,$lic/Apache-2.0,$lic/GFDL-1.3" --output-prefix "$tmp/licenses" \
  > /dev/null 2>&1 || { echo "loom-prepare failed on $lic"; exit 1; }
for variant in hybrid softmax text; do
  run_dir="$tmp/$variant"
  config=default dtype=f32 rtol=1e-4
  sets=(--set train.steps="$steps" --set optim.warmup_steps=3 --set train.run_dir="$run_dir" --set train.eval_every=0
        --set train.log_every=1000 --set checkpoint.every=0)
  case $variant in
    softmax) sets+=(--set model.pattern=S --set train.micro_batch=32) ;;
    hybrid) sets+=(--set train.micro_batch=32) ;;
    text) config=tiny_text dtype=f64 rtol=1e-9
          sets+=(--set "data.paths[0].prefix=$tmp/licenses" --set train.dtype=f64 --set train.micro_batch=8) ;;
  esac
  if ! "$bin" --config "$src/configs/$config.textproto" "${sets[@]}" --export_oracle > "$tmp/loom.log" 2>&1; then
    echo "loom-train failed ($variant):"; cat "$tmp/loom.log"; exit 1
  fi
  echo "== $variant: $(grep -c '"loss"' "$run_dir/metrics.jsonl") Loom steps; the oracle replays them"
  "$python" "$src/bench/torch_oracle.py" --export "$run_dir/oracle" --device cpu --dtype "$dtype" --threads 1 \
    --compare "$run_dir/metrics.jsonl" --rtol "$rtol" > "$tmp/oracle.log" 2>&1 || status=1
  grep -v '^{' "$tmp/oracle.log"
done
exit $status
