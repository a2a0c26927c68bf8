#!/usr/bin/env bash
# MoE with data and expert parallelism trains to the losses of one process
# (configs/tiny_moe.textproto in f64, auxiliary loss and bias balancing on):
# dp2 ep2, dp4 ep4 and dp4 ep2 give the 6 losses of one process within 1e-10
# relative (router statistics summed over dp, experts split over ep and
# reached by all-to-all); so do cp2 and cp2 dp2 ep2 (statistics over dp × cp,
# expert gradients over the expert-dp group, which spans cp). A checkpoint saved under ep2 at step 3 (experts
# gathered from their owners, the selection bias included) resumes under
# ep4 and in one process to the same losses at steps 4-6. Pipeline
# parallelism (4 layers, RLHR, split over 2 stages; each stage adds its
# layers' router losses and updates their selection bias): pp2 with 4
# micro-batches, and pp2 x dp2 x ep2, give one process's losses too, and
# pp2's metrics.jsonl carries every stage's layers' routing statistics (the
# second stage's layers 2 and 3 included), equal to one process's.
set -eu
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
bin=$1; src=$2
mpi=(mpirun --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
losses() { grep '"loss"' "$1/metrics.jsonl" | sed 's/.*"step": \([0-9]*\).*"loss": \([0-9.e+-]*\).*/\1 \2/'; }
steps=6
common=(--config "$src/configs/tiny_moe.textproto" --set train.steps=$steps --set optim.warmup_steps=2
        --set train.log_every=1 --set train.dtype=f64 --set model.moe.bias_balancing=true
        --set model.moe.bias_update_rate=0.05)
"$bin" "${common[@]}" --set train.micro_batch=32 --set train.run_dir="$work/one" | grep -E "step +$steps"
"${mpi[@]}" -np 2 "$bin" "${common[@]}" --set train.micro_batch=16 --set parallel.ep=2 --set checkpoint.every=3 \
  --set train.run_dir="$work/ep2" | grep -E "ranks|step +$steps"
"${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.micro_batch=8 --set parallel.ep=4 \
  --set train.run_dir="$work/ep4" | grep -E "step +$steps"
"${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.micro_batch=8 --set parallel.ep=2 \
  --set train.run_dir="$work/dp4ep2" | grep -E "step +$steps"
# (cp also splits tiny_moe's MoH heads' sequences: ring + lasp2.)
"${mpi[@]}" -np 2 "$bin" "${common[@]}" --set train.micro_batch=32 --set parallel.cp=2 \
  --set train.run_dir="$work/cp2" | grep -E "step +$steps"
"${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.micro_batch=16 --set parallel.cp=2 --set parallel.ep=2 \
  --set train.run_dir="$work/cp2ep2" | grep -E "step +$steps"
ckpt="$work/ep2/checkpoints/step_00000003"
"${mpi[@]}" -np 4 "$bin" "${common[@]}" --set train.micro_batch=8 --set parallel.ep=4 \
  --set checkpoint.resume="$ckpt" --set train.run_dir="$work/resume_ep4" | grep -E "resumed|step +$steps"
"$bin" "${common[@]}" --set train.micro_batch=32 --set checkpoint.resume="$ckpt" \
  --set train.run_dir="$work/resume_one" | grep -E "resumed|step +$steps"
four=(--set model.layers=4)
"$bin" "${common[@]}" "${four[@]}" --set train.micro_batch=32 --set train.run_dir="$work/one4" | grep -E "step +$steps"
"$bin" "${common[@]}" "${four[@]}" --set train.micro_batch=8 --set train.run_dir="$work/one4_mb8" | grep -E "step +$steps"
"${mpi[@]}" -np 2 "$bin" "${common[@]}" "${four[@]}" --set train.micro_batch=8 --set parallel.pp=2 \
  --set train.run_dir="$work/pp2" | grep -E "ranks|step +$steps"
"${mpi[@]}" -np 4 "$bin" "${common[@]}" "${four[@]}" --set train.micro_batch=16 --set parallel.pp=2 --set parallel.ep=2 \
  --set train.run_dir="$work/pp2ep2" | grep -E "ranks|step +$steps"
compare() {  # run, expected number of steps[, the one-process run to match]
  paste <(losses "$work/${3:-one}" | tail -n "$2") <(losses "$work/$1") | awk -v run="$1" -v want="$2" '
    { n++; d = $2 - $4; if (d < 0) d = -d; if ($1 != $3 || d > 1e-10 * $2) { print run ": step " $1 " loss " $2 " vs " $3 " " $4; bad = 1 } }
    END { if (n != want) { print run ": " n " steps, want " want; bad = 1 }; exit bad }'
  echo "$1: $2 losses match one process within 1e-10"
}
compare ep2 $steps
compare ep4 $steps
compare dp4ep2 $steps
compare cp2 $steps
compare cp2ep2 $steps
compare resume_ep4 3
compare resume_one 3
compare pp2 $steps one4_mb8
compare pp2ep2 $steps one4
cv() { grep '"moe/layer' "$work/$1/metrics.jsonl" | tail -n 1 | grep -o "\"moe/layer$2/load_cv\": [0-9.e+-]*" | awk '{print $2}'; }
for layer in 0 1 2 3; do
  a=$(cv pp2 $layer); b=$(cv one4_mb8 $layer)
  [ -n "$a" ] || { echo "pp2: no moe/layer$layer/load_cv in metrics.jsonl"; exit 1; }
  awk -v a="$a" -v b="$b" -v l="$layer" 'BEGIN { d = a - b; if (d < 0) d = -d;
    if (d > 1e-9 * (b > 0 ? b : 1)) { print "pp2 layer " l " load cv " a " vs one process " b; exit 1 } }'
done
echo "pp2: the routing statistics of all 4 layers match one process"
