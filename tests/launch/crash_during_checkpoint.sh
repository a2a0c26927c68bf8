#!/usr/bin/env bash
# Checkpoints never lose a step: 20 training steps with a checkpoint every 5;
# the process dies (LOOM_FAULT) at each stage of writing the step-15
# checkpoint in turn — during a tensor write, before fsync, before the
# rename, before `latest` moves — once by SIGKILL at a random step after 12,
# and once is stopped by SIGTERM (which must save and exit 0). Each resumed
# run logs, for every step, the same loss as an uninterrupted run
# (round-trip doubles, i.e. bit patterns), no step twice, and ends with the
# same parameters (XXH3 checksums of the final checkpoint). Last, a
# corrupted newest checkpoint is refused by name and the previous one used,
# and with every checkpoint corrupted the run stops rather than start afresh.
# With a third argument `async`, every run writes its checkpoints in the
# background (checkpoint.async): the step-15 write then dies while steps 16
# on train, and the resumed run must still repeat the uninterrupted one.
set -u
bin=$1; src=$2; mode=${3:-sync}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
common=(--config "$src/configs/default.textproto" --set train.steps=20 --set checkpoint.every=5
        --set checkpoint.keep=0 --set train.eval_every=0 --set train.log_every=20)
[ "$mode" = async ] && common+=(--set checkpoint.async=true)
losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\),.*"loss": \([^,]*\),.*/\1 \2/'; }
sums() { grep xxh3 "$1/checkpoints/step_00000020/manifest.textproto"; }
fails=0; passes=0
compare() {  # compare NAME DIR
  if [ "$(losses "$tmp/ref")" == "$(losses "$2")" ] && [ "$(sums "$tmp/ref")" == "$(sums "$2")" ] \
     && [ -z "$(losses "$2" | cut -d' ' -f1 | uniq -d)" ]; then
    passes=$((passes + 1))
  else
    echo "FAIL: $1: the resumed run differs from the uninterrupted one"
    diff <(losses "$tmp/ref") <(losses "$2") | head -5
    fails=$((fails + 1))
  fi
}
"$bin" "${common[@]}" --set train.run_dir="$tmp/ref" >/dev/null || { echo "reference run failed"; exit 1; }
[ "$(losses "$tmp/ref" | wc -l)" -eq 20 ] || { echo "reference run logged $(losses "$tmp/ref" | wc -l) steps"; exit 1; }

for stage in tensor_write before_fsync before_rename before_latest; do
  dir="$tmp/$stage"
  LOOM_FAULT=$stage LOOM_FAULT_STEP=15 "$bin" "${common[@]}" --set train.run_dir="$dir" >/dev/null 2>&1
  rc=$?
  [ $rc -eq 77 ] || { echo "FAIL: $stage: the injected crash did not happen (exit $rc)"; fails=$((fails + 1)); continue; }
  "$bin" "${common[@]}" --set train.run_dir="$dir" >"$dir.log" 2>&1 || { echo "FAIL: $stage: resume failed"; cat "$dir.log"; }
  grep -q "resumed from" "$dir.log" || echo "note: $stage: nothing to resume from"
  compare "$stage" "$dir"
done

# SIGKILL at a random step after 12 (the run polls its own metrics).
kill_at=$((13 + RANDOM % 6))
dir="$tmp/sigkill"
"$bin" "${common[@]}" --set train.run_dir="$dir" >/dev/null 2>&1 & pid=$!
for _ in $(seq 3000); do
  [ -f "$dir/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$dir/metrics.jsonl")" -ge "$kill_at" ] && break
  sleep 0.01
done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
logged=$(grep -c '"loss"' "$dir/metrics.jsonl")
"$bin" "${common[@]}" --set train.run_dir="$dir" >/dev/null 2>&1 || echo "FAIL: resume after SIGKILL failed"
if [ "$logged" -ge 20 ]; then echo "note: the run had finished before SIGKILL (logged $logged)"; fi
echo "SIGKILL after step $logged (aimed at $kill_at)"
compare sigkill "$dir"

# SIGTERM once step 10 is logged: a checkpoint at the stop, exit 0.
dir="$tmp/sigterm"
"$bin" "${common[@]}" --set train.run_dir="$dir" >"$dir.log" 2>&1 & pid=$!
for _ in $(seq 3000); do
  [ -f "$dir/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$dir/metrics.jsonl")" -ge 10 ] && break
  sleep 0.01
done
kill -TERM $pid; wait $pid; rc=$?
{ [ $rc -eq 0 ] && grep -q "SIGTERM: stopped cleanly" "$dir.log"; } || { echo "FAIL: SIGTERM: exit $rc"; fails=$((fails + 1)); }
"$bin" "${common[@]}" --set train.run_dir="$dir" >/dev/null 2>&1 || echo "FAIL: resume after SIGTERM failed"
compare sigterm "$dir"

# A flipped byte in the newest checkpoint: refused, named, the previous used.
shard="$dir/checkpoints/step_00000020/rank_00000.safetensors"
printf '\xff' | dd of="$shard" bs=1 seek=$(( $(stat -c %s "$shard") - 5 )) conv=notrunc status=none
"$bin" "${common[@]}" --set train.run_dir="$dir" --set train.steps=22 >"$tmp/corrupt.log" 2>&1
if grep -q "refusing checkpoint .*step_00000020.*checksum mismatch" "$tmp/corrupt.log" \
    && grep -q "resumed from .*step_00000015 at step 15" "$tmp/corrupt.log"; then
  passes=$((passes + 1))
else
  echo "FAIL: corrupted newest checkpoint:"; cat "$tmp/corrupt.log"; fails=$((fails + 1))
fi

# Every checkpoint corrupted: the run stops with one line instead of
# starting afresh (whose first save would prune them), and keeps them all.
for shard in "$dir"/checkpoints/step_*/rank_00000.safetensors; do
  printf '\xff' | dd of="$shard" bs=1 seek=$(( $(stat -c %s "$shard") - 5 )) conv=notrunc status=none
done
kept=$(ls -d "$dir"/checkpoints/step_* | wc -l)
"$bin" "${common[@]}" --set train.run_dir="$dir" --set train.steps=24 >"$tmp/allbad.log" 2>&1; rc=$?
if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q "none of its $kept checkpoints verifies .*checkpoint.resume=none" "$tmp/allbad.log" \
    && [ "$(ls -d "$dir"/checkpoints/step_* | wc -l)" -eq "$kept" ]; then
  passes=$((passes + 1))
else
  echo "FAIL: every checkpoint corrupted (exit $rc):"; cat "$tmp/allbad.log"; fails=$((fails + 1))
fi

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
