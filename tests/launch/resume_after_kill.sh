#!/usr/bin/env bash
# Nothing lost on a crash: a run killed with SIGKILL after its checkpoint at
# step 15, and a run stopped by SIGTERM, each resumed, log the same losses as
# an uninterrupted run for every step (compared as text of round-trip
# doubles, i.e. bit for bit), no step twice, and end with the same
# parameters (the checkpoint manifests' XXH3 checksums).
set -u
bin=$1; src=$2
tmp=$(mktemp -d); trap 'kill -9 $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
# keep=0: no checkpoint is deleted while the test waits for it.
common=(--config "$src/configs/default.textproto" --set train.steps=30 --set checkpoint.every=5
        --set checkpoint.keep=0 --set train.eval_every=0 --set train.log_every=30)
losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\),.*"loss": \([^,]*\),.*/\1 \2/'; }
sums() { grep xxh3 "$1/checkpoints/step_00000030/manifest.textproto"; }
wait_for_step() {  # wait_for_step DIR N: until checkpoint step N exists (60 s at most)
  for _ in $(seq 600); do
    [ -f "$1/checkpoints/step_$(printf %08d "$2")/manifest.textproto" ] && grep -q "step_" "$1/checkpoints/latest" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
fails=0; passes=0
check() {  # check NAME DIR
  if [ "$(losses "$tmp/ref")" == "$(losses "$2")" ] && [ "$(sums "$tmp/ref")" == "$(sums "$2")" ] \
     && [ "$(losses "$2" | cut -d' ' -f1 | sort | uniq -d)" == "" ] && [ "$(losses "$2" | wc -l)" -eq 30 ]; then
    passes=$((passes + 1))
  else
    echo "FAIL: $1: resumed run differs from the uninterrupted one"; diff <(losses "$tmp/ref") <(losses "$2") | head
    fails=$((fails + 1))
  fi
}
"$bin" "${common[@]}" --set train.run_dir="$tmp/ref" >/dev/null || { echo "reference run failed"; exit 1; }

"$bin" "${common[@]}" --set train.run_dir="$tmp/kill" >/dev/null & pid=$!
wait_for_step "$tmp/kill" 15 || echo "no checkpoint 15 in time"
kill -9 $pid; wait $pid 2>/dev/null
if [ "$(losses "$tmp/kill" | wc -l)" -ge 30 ]; then
  echo "FAIL: the run finished before SIGKILL reached it"; fails=$((fails + 1))
fi
"$bin" "${common[@]}" --set train.run_dir="$tmp/kill" >"$tmp/kill.log" || echo "resume after SIGKILL failed"
grep -q "resumed from" "$tmp/kill.log" || { echo "FAIL: did not resume after SIGKILL"; fails=$((fails + 1)); }
check sigkill "$tmp/kill"

"$bin" "${common[@]}" --set train.run_dir="$tmp/term" >"$tmp/term1.log" & pid=$!
wait_for_step "$tmp/term" 10 || echo "no checkpoint 10 in time"
kill -TERM $pid; wait $pid; rc=$?
if [ "$(losses "$tmp/term" | wc -l)" -ge 30 ]; then
  echo "FAIL: the run finished before SIGTERM reached it"; fails=$((fails + 1))
fi
[ $rc -eq 0 ] && grep -q "SIGTERM" "$tmp/term1.log" || { echo "FAIL: SIGTERM exit $rc"; fails=$((fails + 1)); }
"$bin" "${common[@]}" --set train.run_dir="$tmp/term" >/dev/null || echo "resume after SIGTERM failed"
check sigterm "$tmp/term"

# A corrupted newest checkpoint is refused, named, and the previous one used.
shard="$tmp/term/checkpoints/step_00000030/rank_00000.safetensors"
printf '\xff' | dd of="$shard" bs=1 seek=$(( $(stat -c %s "$shard") - 5 )) conv=notrunc status=none
"$bin" "${common[@]}" --set train.run_dir="$tmp/term" --set train.steps=32 >"$tmp/corrupt.log" 2>&1
if grep -q "refusing checkpoint .*step_00000030.*checksum mismatch" "$tmp/corrupt.log" \
      && grep -q "resumed from .*step_00000025 at step 25" "$tmp/corrupt.log"; then
  passes=$((passes + 1))
else
  echo "FAIL: corrupted newest checkpoint:"; cat "$tmp/corrupt.log"; fails=$((fails + 1))
fi

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
