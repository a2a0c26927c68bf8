#!/usr/bin/env bash
# A dense checkpoint (pattern LLS) loads into the MoH model of the same
# layers (RLH, docs/moh.md). With every head shared and fixed gates the MoH
# model is the dense one: its next step's loss equals the dense run's
# continuation. With routed heads, the router weights absent from the
# checkpoint start from their initialisation (one warning each) and
# training goes on with falling loss.
set -eu
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
bin=$1; src=$2
run_dir=$(mktemp -d); trap 'rm -rf "$run_dir"' EXIT

# train NAME --set ... : runs tiny_moe, keeps the log in $run_dir/NAME.log
train() {
  local name=$1; shift
  "$bin" --config "$src/configs/tiny_moe.textproto" --set train.run_dir="$run_dir/$name" --set train.log_every=1 "$@" \
    > "$run_dir/$name.log" 2>&1 || { cat "$run_dir/$name.log"; exit 1; }
}
loss_at() { grep "step *$2/" "$run_dir/$1.log" | grep -o '| loss [0-9.]*' | awk '{print $3}'; }
# Full precision, from metrics.jsonl.
exact_loss_at() { grep "\"step\": $2," "$run_dir/$1/metrics.jsonl" | grep -o '"loss": [0-9.e+-]*' | awk '{print $2}'; }

train dense --set model.pattern=LLS --set train.steps=20 --set checkpoint.every=20
ckpt="$run_dir/dense/checkpoints"  # its latest: step 20
[ -d "$ckpt" ] || { echo "no checkpoint at $ckpt"; ls -R "$run_dir/dense"; exit 1; }
resume=(--set checkpoint.resume="$ckpt" --set train.steps=21)
train cont --set model.pattern=LLS "${resume[@]}"
train fixed --set model.moh.shared_heads=4 --set model.moh.fixed_gates=true "${resume[@]}"
train routed --set checkpoint.resume="$ckpt" --set train.steps=60

a=$(exact_loss_at cont 21); b=$(exact_loss_at fixed 21)
echo "step 21: dense $a, MoH (all shared, fixed gates) $b"
[ -n "$a" ] && [ "$a" = "$b" ] || { echo "losses differ"; exit 1; }
warnings=$(grep -c 'starts from its initialisation' "$run_dir/routed.log")
echo "routed: $warnings router weights initialised; loss $(loss_at routed 21) -> $(loss_at routed 60)"
[ "$warnings" = 6 ] || { echo "expected 6 warnings (w_s, w_r, w_h of layers 0 and 2), got $warnings"; exit 1; }
awk -v a="$(loss_at routed 21)" -v b="$(loss_at routed 60)" 'BEGIN { if (!(b < a)) { print "loss did not fall"; exit 1 } }'
