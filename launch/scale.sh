#!/usr/bin/env bash
# Scaling measurements on the GPUs of this machine (issue 12), written to
# docs/scaling/ as Markdown tables and PNG plots:
#   comm  collective bus bandwidth of Loom's NCCL communicator beside
#         torch.distributed (same NCCL), by size;
#   cp    context-parallel weak scaling: 32K tokens per GPU (seq = 32K × n
#         at cp = n): lasp1 and lasp2 on an all-lightning model, ring and
#         allgather on a softmax model, and ulysses where the 4 KV heads
#         split over the GPUs (cp = 1, 2, 4), ring + lasp2 on the hybrid;
#   dp    data-parallel weak scaling of gpu_1b_softmax (8 sequences of 8K
#         per GPU), without and with ZeRO-1;
#   tp    gpu_1b_softmax at tp = 1, 2, 4, 8;
#   longest  the longest sequence each context-parallel scheme trains (one
#         step) on all the GPUs: from the weak-scaling length 32K × n it
#         doubles until a run fails (out of memory) or passes
#         LOOM_SCALE_MAX_SEQ (default 16M), then bisects to 1/8 of the last
#         good length; the table gives each scheme's longest, its memory per
#         GPU (pool peak and --dry-run's plan) and why the next length failed.
# Efficiency = model TFLOP/s per GPU (loom-train's tflops_per_rank) over the
# one-GPU run of the same scheme (bench/scaling_report.py); memory per GPU is
# the CUDA pool's peak.
# Usage, from the repository root with a CUDA build:
#   launch/scale.sh [comm|cp|dp|tp|longest|all] [output dir]
# LOOM_SCALE_STEPS (default 4) steps a run; LOOM_SCALE_TIMEOUT (default
# 1200) seconds a run at most. LOOM_SCALE_SMOKE=1 runs the cp/dp/tp/longest
# commands on the CPU with configs/default.textproto at toy sizes and 2
# ranks (longest up to 256 tokens): it checks this script and the report,
# and measures nothing. LOOM_SCALE_SMOKE=gpu does the same on the GPU build
# and the GPUs there are (2 ranks on one GPU share it over the MPI backend).
set -euo pipefail
what=${1:-all}
out=${2:-docs/scaling}
build=${LOOM_BUILD:-build-cuda}
steps=${LOOM_SCALE_STEPS:-4}
run_timeout=${LOOM_SCALE_TIMEOUT:-1200}
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
smoke=${LOOM_SCALE_SMOKE:-0}
if [ "$smoke" = 1 ] || [ "$smoke" = gpu ]; then
  gpus=2 build=${LOOM_BUILD:-build}
  base_seq=64 softmax_cfg=configs/default.textproto hybrid_cfg=configs/default.textproto
  common=(--set train.device=cpu --set train.micro_batch=1)
  per_gpu_batch=2 suffix=smoke all_l=() max_seq=${LOOM_SCALE_MAX_SEQ:-256}
  if [ "$smoke" = gpu ]; then
    build=${LOOM_BUILD:-build-cuda} common=(--set train.device=cuda --set train.micro_batch=1) suffix=smoke_gpu
  fi
else
  gpus=$(nvidia-smi -L | wc -l)
  [ "$gpus" -ge 2 ] || { echo "scale.sh: $gpus GPU(s): the scaling runs need at least 2"; exit 1; }
  base_seq=32768 softmax_cfg=configs/gpu_1b_softmax.textproto hybrid_cfg=configs/gpu_1b_hybrid.textproto
  common=()
  per_gpu_batch=8 suffix=${gpus}gpu
  # All-lightning at 32K a GPU: ten recomputed layers keep the plan at
  # 58.9 GiB (loom-train --dry-run), room for the LASP states.
  all_l=(--set model.recompute=0,1,2,3,4,5,6,7,8,9)
  max_seq=${LOOM_SCALE_MAX_SEQ:-16777216}
fi
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# The machine, for the reports' headers.
{ date -u +"%Y-%m-%d %H:%M UTC"
  if [ "$smoke" = 1 ]; then echo "CPU smoke run ($(nproc) cores), measures nothing"
  elif [ "$smoke" = gpu ]; then echo "GPU smoke run on $(nvidia-smi -L | head -1 | cut -d'(' -f1), measures nothing"
  else nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c | sed 's/^ *//'; fi
  echo "loom $(git -C "$(dirname "$0")/.." rev-parse --short HEAD 2>/dev/null || echo '?')"; } >"$tmp/machine.txt"
counts=(); for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts+=("$n"); done

# loom DIR GPUS CONFIG [--set ...]: one loom-train run into DIR (its log
# in DIR/log); its exit status.
loom() {
  local dir=$1 n=$2 cfg=$3; shift 3
  mkdir -p "$dir"
  local cmd=(mpirun -np "$n" --allow-run-as-root --oversubscribe -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE
             -x OMP_NUM_THREADS=1 "$build/bin/loom-train" --config "$cfg" "${common[@]}" --set optim.warmup_steps=1
             --set train.log_every=1 --set train.eval_every=0 --set checkpoint.every=0 "$@")
  echo "${cmd[*]}" >"$dir/cmd"  # for the report, without the temporary run_dir
  timeout -k 60 "$run_timeout" "${cmd[@]}" --set train.run_dir="$dir" >"$dir/log" 2>&1
}

# train GROUP LABEL GPUS CONFIG [--set ...]: one run, recorded in runs.jsonl.
train() {
  local group=$1 label=$2 n=$3 cfg=$4; shift 4
  local dir="$tmp/${group}_${label//[^a-zA-Z0-9]/_}_$n"
  echo "[scale] $group | $label | $n GPU(s)"
  loom "$dir" "$n" "$cfg" --set train.steps="$steps" "$@" || echo "[scale]   failed: $(tail -1 "$dir/log")"
  printf '{"group": "%s", "label": "%s", "gpus": %d, "run_dir": "%s"}\n' "$group" "$label" "$n" "$dir" >>"$tmp/runs.jsonl"
}

# longest_try LABEL GPUS SEQ CONFIG [--set ...]: one step at SEQ tokens,
# recorded in longest.jsonl with its exit status and --dry-run's plan (GiB
# a GPU); 0 when it trained.
longest_try() {
  local label=$1 n=$2 seq=$3 cfg=$4; shift 4
  local dir="$tmp/longest_${label//[^a-zA-Z0-9]/_}_$seq" rc=0 plan
  plan=$("$build/bin/loom-train" --config "$cfg" "${common[@]}" "$@" --set train.seq_len="$seq" --dry-run \
           --world-size "$n" 2>&1 | awk '$1 == "0" && NF >= 8 {
           printf "%.2f", $(NF-1) / ($NF == "GiB" ? 1 : $NF == "MiB" ? 1024 : 1048576)}')
  echo "[scale] longest | $label | $n GPU(s) | seq $seq (plan: ${plan:-?} GiB a GPU)"
  loom "$dir" "$n" "$cfg" "$@" --set train.steps=1 --set train.seq_len="$seq" || rc=$?
  if [ "$rc" = 0 ] && [ ! -s "$dir/metrics.jsonl" ]; then rc=1; fi
  printf '{"label": "%s", "gpus": %d, "seq": %d, "rc": %d, "plan": "%s", "run_dir": "%s"}\n' \
    "$label" "$n" "$seq" "$rc" "$plan" "$dir" >>"$tmp/longest.jsonl"
  return "$rc"
}

# longest LABEL GPUS UNIT CONFIG [--set ...]: the longest multiple of UNIT
# tokens that trains one step on GPUS ranks, from 4 UNITs up: doubling until
# a length fails or passes max_seq, then bisecting to 1/8 of the longest.
longest() {
  local label=$1 n=$2 unit=$3 cfg=$4; shift 4
  local good=0 bad=0 m=4
  while [ $((m * unit)) -le "$max_seq" ]; do
    if longest_try "$label" "$n" $((m * unit)) "$cfg" "$@"; then good=$m; m=$((m * 2)); else bad=$m; break; fi
  done
  while [ "$good" -gt 0 ] && [ "$bad" -gt 0 ] && [ $((bad - good)) -gt $((good / 8 > 1 ? good / 8 : 1)) ]; do
    m=$(((good + bad) / 2))
    if longest_try "$label" "$n" $((m * unit)) "$cfg" "$@"; then good=$m; else bad=$m; fi
  done
}

# The context-parallel schemes of the cp and longest measurements, "label|--set
# words": both run on the hybrid config with one sequence a step and Loom's
# attention kernels at every count (cuDNN, the configs' choice, takes no ring
# offsets, so with it the one-GPU run and the ring runs would time different
# kernels).
schemes=("lasp2 (L)|--set model.pattern=L ${all_l[*]} --set parallel.cp_linear=lasp2"
         "lasp1 (L)|--set model.pattern=L ${all_l[*]} --set parallel.cp_linear=lasp1"
         "ring (S)|--set model.pattern=S --set parallel.cp_softmax=ring"
         "allgather (S)|--set model.pattern=S --set parallel.cp_softmax=allgather"
         "ulysses (S)|--set model.pattern=S --set parallel.cp_softmax=ulysses"
         "hybrid LLLS (ring + lasp2)|")
# cp_scheme SCHEME GPUS: sets label, extra (the scheme's --set words) and
# cp_set; fails where the scheme cannot run (ulysses splits the 4 KV heads).
cp_scheme() {
  label=${1%%|*}
  [[ $label == ulysses* ]] && [ $((4 % $2)) -ne 0 ] && return 1
  # shellcheck disable=SC2206  # the scheme's --set words split on spaces
  extra=(${1#*|})
  cp_set=(--set train.global_batch=1 --set train.micro_batch=1 --set parallel.cp="$2"
          --set model.attention_backend=loom)
}

if [ "$what" = comm ] || [ "$what" = all ]; then
  [ "$smoke" != 0 ] || {
    mpirun -np "$gpus" --allow-run-as-root -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$build/bin/loom-bench" --what=comm \
      --comm_backends=nccl --comm_min_bytes=1048576 --comm_ops=all_reduce,all_gather,reduce_scatter,all_to_all \
      --json >"$tmp/loom.jsonl"
    torchrun --nproc_per_node="$gpus" bench/torch_comm_baseline.py >"$tmp/torch.jsonl"
    python3 bench/comm_report.py "$tmp/loom.jsonl" "$tmp/torch.jsonl" "$out/collectives_${gpus}gpu"
  }
fi
if [ "$what" = cp ] || [ "$what" = all ]; then
  for n in "${counts[@]}"; do
    for scheme in "${schemes[@]}"; do
      cp_scheme "$scheme" "$n" || continue
      train cp "$label" "$n" "$hybrid_cfg" --set train.seq_len=$((base_seq * n)) "${cp_set[@]}" "${extra[@]}"
    done
  done
fi
if [ "$what" = dp ] || [ "$what" = all ]; then
  for n in "${counts[@]}"; do
    for zero in 0 1; do
      train dp "dp, zero $zero" "$n" "$softmax_cfg" --set train.global_batch=$((per_gpu_batch * n)) --set parallel.zero=$zero
    done
  done
fi
if [ "$what" = tp ] || [ "$what" = all ]; then
  for n in "${counts[@]}"; do
    train tp "tp" "$n" "$softmax_cfg" --set parallel.tp="$n" --set train.global_batch="$per_gpu_batch"
  done
fi
if [ "$what" = longest ] || [ "$what" = all ]; then
  n=$gpus
  for scheme in "${schemes[@]}"; do
    cp_scheme "$scheme" "$n" || continue
    longest "$label" "$n" $((base_seq * n / 4)) "$hybrid_cfg" "${cp_set[@]}" "${extra[@]}"
  done
  python3 bench/scaling_report.py --longest "$tmp/longest.jsonl" "$out" "$suffix"
fi
if [ -f "$tmp/runs.jsonl" ]; then
  python3 bench/scaling_report.py "$tmp/runs.jsonl" "$out" "$suffix"
  for f in "$tmp"/*/log; do grep -q "loom-train:" "$f" && { echo "== $f"; tail -3 "$f"; }; done || true
fi
