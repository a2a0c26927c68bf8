#!/usr/bin/env bash
# The default config learns associative recall: a shortened run of
# configs/default.textproto must end with held-out answer accuracy >= 80%
# (chance 1/16), read back from metrics.jsonl.
set -eu
bin=$1; src=$2
run_dir=$(mktemp -d); trap 'rm -rf "$run_dir"' EXIT
"$bin" --config "$src/configs/default.textproto" --set train.steps=200 --set train.run_dir="$run_dir" \
  --set train.log_every=50 | tail -3
accuracy=$(grep '"accuracy"' "$run_dir/metrics.jsonl" | tail -1 | sed 's/.*"accuracy": \([0-9.e+-]*\).*/\1/')
echo "final held-out accuracy: $accuracy (needs >= 0.8)"
awk -v a="$accuracy" 'BEGIN { exit !(a >= 0.8) }'
for key in step loss lr grad_norm tokens_per_s; do
  head -1 "$run_dir/metrics.jsonl" | grep -q "\"$key\"" || { echo "metrics.jsonl lacks $key"; exit 1; }
done
[ -s "$run_dir/config.textproto" ] && grep -q "loom" "$run_dir/version.txt"
