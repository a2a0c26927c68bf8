#!/usr/bin/env bash
# A preemption signal that reaches one rank stops every rank cleanly and
# loses no step: `mpirun -np 2` (dp = 2, ZeRO-1, so each rank writes its
# own moment shards) trains 20 steps with no periodic checkpoints and
# background saves (checkpoint.async); once step 8 is logged, world rank 1
# alone gets SIGTERM. The ranks must agree on the step to stop after, save
# it (every rank writes its file, rank 0 publishes the step once all have),
# and mpirun must exit 0; the restarted run resumes from that step and ends
# with the losses (bit patterns) and the final parameters (XXH3) of an
# uninterrupted run. Then rank 1 alone dies half-way through writing its
# step-10 file (checkpoints every 5): the restart resumes from step 5 and
# again ends as the uninterrupted run. Last, a corrupted byte in rank 1's
# file of the newest checkpoint makes every rank resume from the one before.
# Usage: rank_sigterm.sh LOOM_TRAIN SOURCE_DIR [MPIRUN]
set -u
bin=$1; src=$2; mpirun=${3:-mpirun}
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi=("$mpirun" -np 2 --oversubscribe -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1)
common=(--config "$src/configs/default.textproto" --set train.steps=20 --set train.micro_batch=32
        --set checkpoint.async=true --set train.eval_every=0 --set train.log_every=20 --set parallel.zero=1)
losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\),.*"loss": \([^,]*\),.*/\1 \2/'; }
sums() { grep xxh3 "$1/checkpoints/step_00000020/manifest.textproto"; }
fail() { echo "FAIL: $*"; exit 1; }
# restart WHAT LOG RUN STEP ARGS...: a restart in RUN resumes from STEP and
# ends with the uninterrupted run's losses and final parameters.
restart() {
  local what=$1 log=$2 run=$3 step=$4; shift 4
  timeout 300 "${mpi[@]}" "$bin" "${common[@]}" --set train.run_dir="$run" "$@" >"$log" 2>&1 ||
    { tail -5 "$log"; fail "$what: the restarted run failed"; }
  grep -q "resumed from .*step_$(printf %08d "$step") at step $step" "$log" ||
    { cat "$log"; fail "$what: the restart did not resume from step $step"; }
  [ "$(losses "$dir/ref")" == "$(losses "$run")" ] ||
    { diff <(losses "$dir/ref") <(losses "$run") | head -5; fail "$what: the resumed run's losses differ"; }
  [ "$(sums "$dir/ref")" == "$(sums "$run")" ] || fail "$what: the final parameters differ"
}

timeout 300 "${mpi[@]}" "$bin" "${common[@]}" --set checkpoint.every=20 --set train.run_dir="$dir/ref" >"$dir/ref.log" 2>&1 ||
  { tail -5 "$dir/ref.log"; fail "the reference run failed"; }

run="$dir/stopped"
timeout 300 "${mpi[@]}" "$bin" "${common[@]}" --set train.run_dir="$run" >"$dir/stopped.log" 2>&1 & job=$!
for _ in $(seq 3000); do
  [ -f "$run/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$run/metrics.jsonl")" -ge 8 ] && break
  sleep 0.01
done
rank1=""
for pid in $(pgrep -f -- "$run" 2>/dev/null); do
  [ "$(cat /proc/$pid/comm 2>/dev/null)" = loom-train ] || continue
  [ "$(tr '\0' '\n' </proc/$pid/environ 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')" = 1 ] && rank1=$pid
done
[ -n "$rank1" ] || { wait $job; fail "world rank 1 was not found (the run had ended?)"; }
kill -TERM "$rank1"
wait $job; rc=$?
[ $rc -eq 0 ] || { tail -5 "$dir/stopped.log"; fail "mpirun exited $rc after SIGTERM to one rank"; }
stop=$(sed -n 's/.*stopped cleanly after step \([0-9]*\).*/\1/p' "$dir/stopped.log")
[ -n "$stop" ] && [ "$stop" -lt 20 ] || { cat "$dir/stopped.log"; fail "no clean stop before step 20"; }
grep -q "checkpoint .*step_$(printf %08d "$stop") saved in" "$dir/stopped.log" ||
  { cat "$dir/stopped.log"; fail "the stop at step $stop saved no checkpoint"; }

restart "SIGTERM" "$dir/resumed.log" "$run" "$stop" --set checkpoint.every=20
echo "SIGTERM to rank 1: every rank stopped after step $stop, saved it, and the restart matched the uninterrupted run"

run="$dir/crashed"
every=(--set checkpoint.every=5 --set train.run_dir="$run")
timeout 300 "$mpirun" --oversubscribe -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1 -np 1 "$bin" "${common[@]}" \
  "${every[@]}" : -np 1 env LOOM_FAULT=tensor_write LOOM_FAULT_STEP=10 "$bin" "${common[@]}" "${every[@]}" \
  >"$dir/crashed.log" 2>&1 && { tail -5 "$dir/crashed.log"; fail "the run with a crashing rank 1 exited 0"; }
[ -d "$run/checkpoints/step_00000010" ] && fail "step 10 was published though rank 1 died writing it"
restart "rank 1 killed" "$dir/after_crash.log" "$run" 5 --set checkpoint.every=5
echo "rank 1 killed writing step 10: the restart resumed from step 5 and matched the uninterrupted run"

# A flipped byte in rank 1's file of the newest checkpoint: rank 0 refuses
# it by name and every rank resumes from the one before.
shard="$run/checkpoints/step_00000020/rank_00001.safetensors"
[ -f "$shard" ] || fail "no rank-1 file in the step-20 checkpoint"
printf '\xff' | dd of="$shard" bs=1 seek=$(( $(stat -c %s "$shard") - 5 )) conv=notrunc status=none
timeout 300 "${mpi[@]}" "$bin" "${common[@]}" "${every[@]}" --set train.steps=22 >"$dir/corrupt.log" 2>&1 ||
  { tail -5 "$dir/corrupt.log"; fail "the run after the corruption failed"; }
grep -q "refusing checkpoint .*step_00000020/rank_00001.safetensors.*checksum mismatch" "$dir/corrupt.log" &&
  grep -q "resumed from .*step_00000015 at step 15" "$dir/corrupt.log" ||
  { cat "$dir/corrupt.log"; fail "a corrupted rank-1 file was not refused, or the resume did not fall back to step 15"; }
echo "a corrupted rank-1 file of step 20: refused by name, every rank resumed from step 15"
