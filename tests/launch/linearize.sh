#!/usr/bin/env bash
# loom-ckpt linearize: a tiny softmax-only model (4 layers, GQA 4/2) trained
# on the GPL-3 text is linearized with --keep-every 2 (pattern SSSS -> SLSL).
# Its held-out loss before fine-tuning is within 20% of the source's, and
# after N fine-tuning steps it ends below the same SLSL shape trained N steps
# from random weights. The start is measured by loom-train's evaluation after
# one step at lr 1e-9 (train.steps must be >= 1; AdamW moves each weight by
# about 1e-9, far below the 20% being checked). Bad usage is one line,
# exit 2; a bad checkpoint one line, exit 1.
set -eu
train=$1; prepare=$2; ckpt=$3; src=$4
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$prepare" --input /usr/share/common-licenses/GPL-3 --output-prefix "$work/gpl" 2>/dev/null
common=(--config "$src/configs/tiny_text.textproto" --set "data.paths[0].prefix=$work/gpl" --set model.layers=4
        --set model.hidden=64 --set model.heads=4 --set model.kv_heads=2 --set train.seq_len=64
        --set train.global_batch=16 --set train.micro_batch=16 --set train.eval_every=0 --set train.eval_sequences=32
        --set train.log_every=50 --set optim.warmup_steps=10)
n0=${LINEARIZE_SOURCE_STEPS:-200}; n=${LINEARIZE_TUNE_STEPS:-60}
"$train" "${common[@]}" --set model.pattern=S --set train.steps=$n0 --set optim.lr=3e-3 \
  --set checkpoint.every=$n0 --set train.run_dir="$work/source" >/dev/null
"$ckpt" linearize --from "$work/source/checkpoints" --to "$work/lin" --keep-every 2 | tee "$work/lin.txt"
grep -q "pattern SSSS -> SLSL, layers 1,3" "$work/lin.txt"
hybrid=("${common[@]}" --set model.pattern=SLSL --set checkpoint.every=0)
"$train" "${hybrid[@]}" --set train.steps=1 --set optim.warmup_steps=0 --set optim.lr=1e-9 \
  --set checkpoint.resume="$work/lin" --set train.run_dir="$work/start" >/dev/null
"$train" "${hybrid[@]}" --set train.steps=$n --set optim.lr=1e-3 --set checkpoint.resume="$work/lin" \
  --set train.run_dir="$work/tuned" >/dev/null
"$train" "${hybrid[@]}" --set train.steps=$n --set optim.lr=3e-3 --set checkpoint.resume=none \
  --set train.run_dir="$work/scratch" >/dev/null
eval_loss() { grep '"eval_loss"' "$1/metrics.jsonl" | tail -1 | sed 's/.*"eval_loss": \([0-9.e+-]*\).*/\1/'; }
source_loss=$(eval_loss "$work/source"); start=$(eval_loss "$work/start")
tuned=$(eval_loss "$work/tuned"); scratch=$(eval_loss "$work/scratch")
echo "held-out loss: source (SSSS, $n0 steps) $source_loss | linearized SLSL at start $start |" \
     "after $n steps: linearized $tuned, from random weights $scratch"
awk -v s="$source_loss" -v a="$start" -v t="$tuned" -v r="$scratch" 'BEGIN {
  bad = 0
  if (s == "" || a == "" || t == "" || r == "") { print "FAIL: missing losses"; exit 1 }
  d = a - s; if (d < 0) d = -d
  if (d > 0.2 * s) { printf "FAIL: linearized start %s is %.1f%% from the source loss %s (tolerance 20%%)\n", a, 100 * d / s, s; bad = 1 }
  if (!(t < r)) { print "FAIL: the linearized model ends at " t ", not below the from-scratch hybrid " r; bad = 1 }
  exit bad }'

fails=0
expect_error() {  # expect_error RC "substring" args...
  local want_rc=$1 want=$2; shift 2
  "$ckpt" "$@" >"$work/out" 2>"$work/err"; local rc=$?
  if [ $rc -ne "$want_rc" ] || [ "$(wc -l <"$work/err")" -ne 1 ] || ! grep -qF -- "$want" "$work/err"; then
    echo "FAIL: loom-ckpt $* -> rc $rc (wanted $want_rc), stderr:"; cat "$work/err"; echo "(wanted one line containing: $want)"
    fails=$((fails + 1))
  fi
}
set +e
expect_error 2 "needs --from, --to and one of --layers, --keep-every" linearize --from "$work/lin" --to "$work/x"
expect_error 1 "layer 1 is 'L', not a softmax layer" linearize --from "$work/lin" --to "$work/x" --layers 1
expect_error 1 "layer 9 is outside the model's 4" linearize --from "$work/source/checkpoints" --to "$work/x" --layers 9
expect_error 1 "nothing to linearize" linearize --from "$work/source/checkpoints" --to "$work/x" --keep-every 1
expect_error 1 "no such checkpoint directory" linearize --from "$work/missing" --to "$work/x" --layers 1
expect_error 2 "--keep-every: '0' is not a positive integer" linearize --from "$work/lin" --to "$work/x" --keep-every 0
expect_error 2 "unknown argument '--frobnicate'" linearize --from "$work/lin" --to "$work/x" --frobnicate 1
[ $fails -eq 0 ] && echo "ok: the linearized model starts near its source and beats training from scratch"
