#!/usr/bin/env bash
# loom-eval end to end, and what it is for: a tiny softmax model trained on
# the needle task at 32 tokens (stage 1) retrieves the needle at 32 but not
# at 256 tokens; a short fine-tune at 256 (stage 2, 30 steps) must raise its
# mean needle accuracy at 256 by at least 20 points. loom-eval must print the
# perplexity-by-position table (here on held-out license text through
# --data) whose 8 buckets add up to the "all" row (token-weighted mean loss
# within 1e-6 relative), and the needle grid, and write eval.md/eval.json.
# (The full-size demonstration, 64 -> 512 tokens, is in docs/long_context.md.)
set -eu
bin=$1
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
lic=/usr/share/common-licenses
"$bin/loom-prepare" --input "$lic/GPL-3,$lic/Apache-2.0" --output-prefix "$work/text" 2>/dev/null >/dev/null
cat > "$work/needle.textproto" <<EOC
model { pattern: "SS" layers: 2 hidden: 32 heads: 4 kv_heads: 4 vocab: 320 }
data { task: "needle" needle { needles: 1 key_vocab: 8 value_vocab: 16 filler_vocab: 32 } }
train { global_batch: 32 micro_batch: 32 seed: 11 log_every: 50 eval_sequences: 64 run_dir: "$work/run"
  stages { seq_len: 32 steps: 200 }
  stages { seq_len: 256 steps: 30 lr_scale: 0.3 warmup_steps: 3 } }
optim { lr: 5e-3 warmup_steps: 20 weight_decay: 0.0 }
EOC
evaluate() {  # out dir
  "$bin/loom-eval" --checkpoint "$work/run/checkpoints" --out "$1" --data "$work/text" --seq_len 256 --sequences 8 \
    --needle_lengths 32,256 --needle_depths 0,0.25,0.5,0.75,1 --needle_samples 32 > "$1.log"
  cat "$1.log"
  grep -q "^Perplexity by position: 8 sequences of 256 tokens" "$1.log" || { echo "no perplexity table"; exit 1; }
  [ "$(grep -cE '^\| [0-9]+-[0-9]+ \| [0-9]+ \| [0-9.]+ \|' "$1.log")" = 8 ] || { echo "want 8 bucket rows"; exit 1; }
  grep -q "^Needle in a haystack" "$1.log" || { echo "no needle grid"; exit 1; }
  [ -s "$1/eval.md" ] && [ -s "$1/eval.json" ] || { echo "eval.md or eval.json missing"; exit 1; }
  python3 - "$1/eval.json" <<'EOP'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["perplexity_by_position"]
tokens = sum(b["tokens"] for b in p["buckets"])
mean = sum(b["tokens"] * b["loss"] for b in p["buckets"]) / tokens
if tokens != p["all"]["tokens"] or abs(mean - p["all"]["loss"]) > 1e-6 * p["all"]["loss"]:
    sys.exit(f"buckets: {tokens} tokens, mean loss {mean}; all positions: {p['all']['tokens']}, {p['all']['loss']} "
             f"(tolerance 1e-6 relative)")
EOP
}
accuracy_at_256() {
  python3 -c "import json,sys; g=json.load(open(sys.argv[1]))['needle']; a=g['accuracy'][g['lengths'].index(256)]; print(100*sum(a)/len(a))" "$1/eval.json"
}

# Stage 1 alone (a config without stage 2, checkpointing at its end), evaluated;
# then the two-stage config resumes there and runs stage 2.
grep -v "seq_len: 256" "$work/needle.textproto" | sed 's/stages { seq_len: 32 steps: 200 }/& }/' > "$work/short.textproto"
"$bin/loom-train" --config "$work/short.textproto" --set checkpoint.every=200 | grep -E "^(eval|done)"
evaluate "$work/before"
"$bin/loom-train" --config "$work/needle.textproto" --set checkpoint.every=1000 | grep -E "^(stage|eval|done)"
evaluate "$work/after"
before=$(accuracy_at_256 "$work/before"); after=$(accuracy_at_256 "$work/after")
echo "mean needle accuracy at 256 tokens: $before% after stage 1 (32 tokens), $after% after 30 steps at 256 (needs +20 points)"
awk -v b="$before" -v a="$after" 'BEGIN { exit !(a >= b + 20) }'
