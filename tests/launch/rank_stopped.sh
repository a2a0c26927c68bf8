#!/usr/bin/env bash
# A rank that stops makes the others fail fast (issue 5, launch): ranks
# train with parallel.timeout_s = 5, first three (dp = 3), then four
# (tp = 2 x dp = 2, where a rank's DP peer waits on it while it waits on the
# stopped rank in the TP group); once they are stepping, world rank 1 gets
# SIGSTOP. Each other rank must, on its own, exit non-zero
# within 5 + 15 s, and say "world rank 1 stopped answering"; mpirun must
# then return non-zero. Each rank's loom-train runs in a session of its own
# (setsid) under a small script that writes its output to rank.<r>.log and
# "<exit code> <time>" to exit.<r> when it ends: mpirun tears the job down
# once a rank exits without MPI_Finalize (what a rank that detects a silent
# peer does), and its signals must not cut the other ranks' records short.
# Nothing can hang: mpirun runs under `timeout`, and whatever is left is
# continued and killed on the way out.
# Usage: rank_stopped.sh LOOM_TRAIN SOURCE_DIR [MPIRUN]
set -u
bin=$1; src=$2; mpirun=${3:-mpirun}
timeout_s=5; bound=15
dir=$(mktemp -d)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# This run's loom-train processes (other runs may share the machine): their
# command lines name this run's unique directory.
ours() {
  for pid in $(pgrep -f -- "$dir/run" 2>/dev/null); do
    [ "$(cat /proc/$pid/comm 2>/dev/null)" = loom-train ] && echo "$pid"
  done
}
world_rank_of() { tr '\0' '\n' </proc/$1/environ 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p'; }
cleanup() {
  for pid in $(ours); do kill -CONT "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; done
  [ -n "${mpirun_pid:-}" ] && kill "$mpirun_pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$dir"/out.txt "$dir"/rank.*.log; do [ -f "$f" ] && { echo "--- $f:"; grep -v '^step' "$f"; }; done
  exit 1
}

cat >"$dir/rank.sh" <<'EOF'
r=$OMPI_COMM_WORLD_RANK
"$@" >"$LOOM_TEST_DIR/rank.$r.log" 2>&1
echo "$? $(date +%s.%N)" >"$LOOM_TEST_DIR/exit.$r"
EOF

# stop_rank_1 NP SETTINGS...: one run of NP ranks with these --set pairs.
stop_rank_1() {
  local np=$1; shift
  rm -f "$dir"/exit.* "$dir"/rank.*.log
  echo "== $np ranks: $*"
  LOOM_TEST_DIR=$dir timeout 120 "$mpirun" -np "$np" --oversubscribe -x LOOM_TEST_DIR -x OMP_NUM_THREADS=1 \
    -x OPENBLAS_NUM_THREADS=1 setsid --wait bash "$dir/rank.sh" \
    "$bin" --config "$src/configs/default.textproto" --set parallel.timeout_s=$timeout_s \
    "$@" --set train.steps=100000 --set train.log_every=1 \
    --set train.run_dir="$dir/run$np" >"$dir/out.txt" 2>&1 &
  mpirun_pid=$!

  # Stepping: rank 0 has logged a step (every rank has passed a collective).
  for _ in $(seq 600); do
    grep -qs 'step *2/' "$dir/rank.0.log" && break
    kill -0 "$mpirun_pid" 2>/dev/null || fail "mpirun ended before training started"
    sleep 0.1
  done
  grep -qs 'step *2/' "$dir/rank.0.log" || fail "no step logged within 60 s"

  victim=""
  for pid in $(ours); do [ "$(world_rank_of "$pid")" = 1 ] && victim=$pid; done
  [ -n "$victim" ] || fail "no loom-train process of world rank 1 found"
  kill -STOP "$victim"
  stopped_at=$(date +%s.%N)
  echo "stopped world rank 1 (pid $victim)"

  # Every other rank must leave on its own within the timeout plus the bound.
  others=$(seq 0 $((np - 1)) | grep -vx 1)
  for _ in $(seq $(((timeout_s + bound + 5) * 10))); do
    n=0; for rank in $others; do [ -f "$dir/exit.$rank" ] && n=$((n + 1)); done
    [ "$n" = $((np - 1)) ] && break
    sleep 0.1
  done
  for rank in $others; do
    [ -f "$dir/exit.$rank" ] || fail "world rank $rank still running $((timeout_s + bound + 5)) s after the stop"
    read -r code at <"$dir/exit.$rank"
    took=$(awk -v a="$at" -v b="$stopped_at" 'BEGIN { printf "%.1f", a - b }')
    echo "world rank $rank exited with $code, $took s after the stop"
    [ "$code" != 0 ] || fail "world rank $rank exited 0"
    awk -v t="$took" -v max=$((timeout_s + bound)) 'BEGIN { exit !(t <= max) }' \
      || fail "world rank $rank took $took s (bound $((timeout_s + bound)) s)"
    grep -q "world rank 1 stopped answering" "$dir/rank.$rank.log" \
      || fail "world rank $rank did not say that world rank 1 stopped answering"
  done

  # Release the stopped rank (it may not wake to anything but SIGKILL) and
  # collect mpirun's verdict.
  kill -CONT "$victim"; kill -KILL "$victim"
  wait "$mpirun_pid"; rc=$?
  echo "mpirun returned $rc"
  [ "$rc" != 0 ] || fail "mpirun returned 0"
  [ "$rc" != 124 ] || fail "mpirun hung until the 120 s timeout"
  grep -h "stopped answering" "$dir"/rank.*.log
}

stop_rank_1 3 --set train.global_batch=48 --set train.micro_batch=16
stop_rank_1 4 --set train.global_batch=32 --set train.micro_batch=16 --set parallel.tp=2
echo "PASS"
