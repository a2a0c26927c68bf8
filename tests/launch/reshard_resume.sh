#!/usr/bin/env bash
# Checkpoints load under another layout: a run at tp2 x pp2 x dp2 with ZeRO-1
# (8 ranks) saves at step 5 and goes on to step 10; resuming its step-5
# checkpoint on one process (tp1 pp1) and at tp4 (zero off) gives the same
# losses for steps 6-10 (f32, 1e-5 relative: the layouts sum in different
# orders). Also: `mpirun -np 2 ... --set parallel.tp=2` as the README shows.
set -eu
bin=$1; src=$2
mpi=(mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
common=(--config "$src/configs/default.textproto" --set train.steps=10 --set optim.warmup_steps=2
        --set train.micro_batch=16 --set train.eval_sequences=64 --set train.log_every=5)

"${mpi[@]}" -np 8 "$bin" "${common[@]}" --set train.run_dir="$work/a" --set checkpoint.every=5 \
  --set parallel.tp=2 --set parallel.pp=2 --set parallel.zero=1 | grep -E "ranks|step +10|checkpoint"
step5="$work/a/checkpoints/step_00000005"
[ -d "$step5" ] || { echo "no step-5 checkpoint"; exit 1; }

"$bin" "${common[@]}" --set train.run_dir="$work/b" --set checkpoint.resume="$step5" | grep -E "resumed|step +10"
"${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.run_dir="$work/c" --set checkpoint.resume="$step5" \
  --set parallel.tp=4 | grep -E "ranks|resumed|step +10"

losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\).*"loss": \([0-9.e+-]*\).*/\1 \2/' | awk '$1 > 5'; }
for run in b c; do
  paste <(losses "$work/a") <(losses "$work/$run") | awk -v run="$run" '
    { n++; if ($1 != $3) { print run ": step " $1 " vs " $3; bad = 1 }
      d = $2 - $4; if (d < 0) d = -d; if (d > 1e-5 * $2) { print run ": step " $1 " loss " $2 " vs " $4; bad = 1 } }
    END { if (n != 5) { print run ": " n " resumed steps, want 5"; bad = 1 }; exit bad }'
  echo "resumed under layout $run: steps 6-10 match the tp2 x pp2 x dp2 + zero run"
done

# The README's example.
"${mpi[@]}" -np 2 "$bin" --config "$src/configs/default.textproto" --set parallel.tp=2 --set train.steps=3 \
  --set optim.warmup_steps=1 --set train.run_dir="$work/d" --set train.eval_sequences=64 | grep -q "done: 3 steps"
