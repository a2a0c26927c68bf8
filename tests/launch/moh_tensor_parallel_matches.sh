#!/usr/bin/env bash
# MoH under tensor parallelism trains to the losses of one process:
# configs/tiny_moe.textproto without its MoE MLPs (RLH: MoH over lightning
# and softmax heads) in f64, tp2, tp2 with sequence parallelism and tp2 x cp2
# give the single process's 6 losses within 1e-10 relative (every rank
# computes all gates from the replicated router and keeps its heads';
# model/moh.h).
set -eu
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
bin=$1; src=$2
mpi=(mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
losses() { grep -o '"loss": [0-9.e+-]*' "$1/metrics.jsonl" | cut -d' ' -f2; }
steps=6
common=(--config "$src/configs/tiny_moe.textproto" --set model.moe.experts=0 --set train.steps=$steps
        --set optim.warmup_steps=2 --set train.log_every=1 --set train.dtype=f64)
"$bin" "${common[@]}" --set train.run_dir="$work/one" >/dev/null
"${mpi[@]}" -np 2 "$bin" "${common[@]}" --set parallel.tp=2 --set train.run_dir="$work/tp2" >/dev/null
"${mpi[@]}" -np 2 "$bin" "${common[@]}" --set parallel.tp=2 --set parallel.sequence_parallel=true \
  --set train.run_dir="$work/tp2sp" >/dev/null
"${mpi[@]}" -np 4 "$bin" "${common[@]}" --set parallel.tp=2 --set parallel.cp=2 --set train.run_dir="$work/tp2cp2" \
  >/dev/null
for run in tp2 tp2sp tp2cp2; do
  paste <(losses "$work/one") <(losses "$work/$run") | awk -v run="$run" -v want=$steps '
    { n++; d = $1 - $2; if (d < 0) d = -d; if (d > 1e-10 * $1) { print run ": step " n " loss " $1 " vs " $2; bad = 1 } }
    END { if (n != want) { print run ": " n " steps, want " want; bad = 1 }; exit bad }'
  echo "$run: $steps losses match one process within 1e-10"
done
