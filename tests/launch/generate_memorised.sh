#!/usr/bin/env bash
# loom-generate continues a memorised training sequence: a tiny hybrid model
# (one softmax, one lightning layer) trained on three sentences repeated as
# documents greedily completes the rest of one sentence from its first
# words, stopping at the end-of-document token; and bad input is one line
# on stderr with exit 2 (usage) or 1 (checkpoint).
set -eu
train=$1; prepare=$2; generate=$3; src=$4
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for i in $(seq 40); do
  echo "Loom trains long-context language models on many GPUs."
  echo "The quick brown fox jumps over the lazy dog by the river."
  echo "Lightning attention keeps a constant-size state per head."
done >"$work/corpus.txt"
"$prepare" --input "$work/corpus.txt" --output-prefix "$work/corpus" 2>/dev/null
"$train" --config "$src/configs/tiny_text.textproto" --set "data.paths[0].prefix=$work/corpus" \
  --set model.pattern=SL --set model.layers=2 --set model.hidden=64 --set model.heads=4 --set model.kv_heads=2 \
  --set data.split=95,5,0 --set train.seq_len=64 --set train.steps=150 --set train.global_batch=16 \
  --set train.micro_batch=16 --set train.eval_every=0 --set train.eval_sequences=8 --set train.log_every=50 \
  --set optim.lr=3e-3 --set optim.warmup_steps=10 --set checkpoint.every=150 --set train.run_dir="$work/run" >/dev/null
got=$("$generate" --checkpoint "$work/run/checkpoints" --prompt "The quick brown" --max_new_tokens 80 2>"$work/stats")
want=" fox jumps over the lazy dog by the river."
cat "$work/stats"
echo "prompt 'The quick brown' -> '$got' (want '$want')"
[ "$got" = "$want" ] || { echo "FAIL: greedy continuation differs from the memorised sentence"; exit 1; }
grep -q "tokens/s" "$work/stats" || { echo "FAIL: no tokens/s line"; exit 1; }
# The same prompt as ids, sampled at a low temperature inside a tight nucleus,
# stays on the memorised sentence.
ids=$(printf 'Lightning attention' | od -An -tu1 | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
got=$("$generate" --checkpoint "$work/run/checkpoints" --prompt_ids "$ids" --temperature 0.3 --top_p 0.5 --seed 7 \
      --max_new_tokens 80 2>/dev/null)
want=" keeps a constant-size state per head."
echo "prompt ids of 'Lightning attention' sampled -> '$got'"
[ "$got" = "$want" ] || { echo "FAIL: sampled continuation differs from the memorised sentence"; exit 1; }

fails=0
expect_error() {  # expect_error RC "substring" args...
  local want_rc=$1 want=$2; shift 2
  "$generate" "$@" >"$work/out" 2>"$work/err"; local rc=$?
  if [ $rc -ne "$want_rc" ] || [ "$(wc -l <"$work/err")" -ne 1 ] || ! grep -qF -- "$want" "$work/err"; then
    echo "FAIL: loom-generate $* -> rc $rc (wanted $want_rc), stderr:"; cat "$work/err"
    echo "(wanted one line containing: $want)"; fails=$((fails + 1))
  fi
}
set +e
long=$(head -c 200 /dev/zero | tr '\0' 'a')
expect_error 1 "no such checkpoint directory" --checkpoint "$work/missing" --prompt "x"
expect_error 2 "longer than the 64 allowed" --checkpoint "$work/run/checkpoints" --prompt "$long"
expect_error 2 "--top_p must be in (0, 1]" --checkpoint "$work/run/checkpoints" --prompt "x" --top_p 0
expect_error 2 "--temperature must be >= 0" --checkpoint "$work/run/checkpoints" --prompt "x" --temperature -1
expect_error 2 "exactly one of --prompt" --checkpoint "$work/run/checkpoints"
expect_error 2 "'x' is not a token id" --checkpoint "$work/run/checkpoints" --prompt_ids 1,x
expect_error 2 "outside the model's vocabulary" --checkpoint "$work/run/checkpoints" --prompt_ids 1,300
expect_error 1 "Unknown command line flag 'bogus'" --checkpoint "$work/run/checkpoints" --prompt x --bogus 1
[ $fails -eq 0 ] && echo "ok: loom-generate reproduces the memorised sentences"
