#!/usr/bin/env bash
# Real text end to end: loom-prepare on Debian's license texts, then
# configs/tiny_text.textproto; validation perplexity must end at least 30%
# below its first evaluation; without a held-out share the summary line says so.
set -eu
bin_dir=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
lic=/usr/share/common-licenses
"$bin_dir/loom-prepare" --input "$lic/GPL-3,$lic/Apache-2.0,$lic/GFDL-1.3" --output-prefix "$tmp/licenses" 2>/dev/null
"$bin_dir/loom-train" --config "$src/configs/tiny_text.textproto" --set "data.paths[0].prefix=$tmp/licenses" \
  --set train.run_dir="$tmp/run" --set checkpoint.every=0 | grep -E "^eval"
ppl=$(grep '"perplexity"' "$tmp/run/metrics.jsonl" | sed 's/.*"perplexity": \([0-9.e+-]*\).*/\1/')
first=$(echo "$ppl" | head -1); last=$(echo "$ppl" | tail -1)
echo "validation perplexity: first $first, last $last (needs <= 0.7 x first)"
awk -v f="$first" -v l="$last" 'BEGIN { exit !(l <= 0.7 * f) }'
# Without a held-out share the summary says so (not "eval loss 0.0000").
"$bin_dir/loom-train" --config "$src/configs/tiny_text.textproto" --set "data.paths[0].prefix=$tmp/licenses" \
  --set data.split=100,0,0 --set train.steps=2 --set optim.warmup_steps=1 --set train.eval_every=0 \
  --set train.run_dir="$tmp/no_eval" --set checkpoint.every=0 2>&1 | grep -E "^done: .*\| no held-out data$"
