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
#   tp    gpu_1b_softmax at tp = 1, 2, 4, 8.
# Efficiency = model TFLOP/s per GPU (loom-train's tflops_per_rank) over the
# one-GPU run of the same scheme (bench/scaling_report.py); memory per GPU is
# the CUDA pool's peak.
# Usage, from the repository root with a CUDA build:
#   launch/scale.sh [comm|cp|dp|tp|all] [output dir]
# LOOM_SCALE_STEPS (default 4) steps a run. LOOM_SCALE_SMOKE=1 runs the
# cp/dp/tp commands on the CPU with configs/default.textproto at toy sizes
# and 2 ranks: it checks this script and the report, and measures nothing.
set -euo pipefail
what=${1:-all}
out=${2:-docs/scaling}
build=${LOOM_BUILD:-build-cuda}
steps=${LOOM_SCALE_STEPS:-4}
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ "${LOOM_SCALE_SMOKE:-0}" = 1 ]; then
  gpus=2 build=${LOOM_BUILD:-build}
  base_seq=64 softmax_cfg=configs/default.textproto hybrid_cfg=configs/default.textproto
  common=(--set train.device=cpu --set train.micro_batch=1)
  per_gpu_batch=2 suffix=smoke all_l=()
else
  gpus=$(nvidia-smi -L | wc -l)
  [ "$gpus" -ge 2 ] || { echo "scale.sh: $gpus GPU(s): the scaling runs need at least 2"; exit 1; }
  base_seq=32768 softmax_cfg=configs/gpu_1b_softmax.textproto hybrid_cfg=configs/gpu_1b_hybrid.textproto
  common=()
  per_gpu_batch=8 suffix=${gpus}gpu
  # All-lightning at 32K a GPU: ten recomputed layers keep the plan at
  # 58.9 GiB (loom-train --dry-run), room for the LASP states.
  all_l=(--set model.recompute=0,1,2,3,4,5,6,7,8,9)
fi
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
counts=(); for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts+=("$n"); done

# train GROUP LABEL GPUS CONFIG [--set ...]: one loom-train run, recorded in runs.jsonl.
train() {
  local group=$1 label=$2 n=$3 cfg=$4; shift 4
  local dir="$tmp/${group}_${label//[^a-zA-Z0-9]/_}_$n"
  mkdir -p "$dir"
  echo "[scale] $group | $label | $n GPU(s)"
  mpirun -np "$n" --allow-run-as-root --oversubscribe -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x OMP_NUM_THREADS=1 \
    "$build/bin/loom-train" --config "$cfg" "${common[@]}" --set train.steps="$steps" --set optim.warmup_steps=1 \
    --set train.log_every=1 --set train.eval_every=0 --set checkpoint.every=0 --set train.run_dir="$dir" "$@" \
    >"$dir/log" 2>&1 || echo "[scale]   failed: $(tail -1 "$dir/log")"
  printf '{"group": "%s", "label": "%s", "gpus": %d, "run_dir": "%s"}\n' "$group" "$label" "$n" "$dir" >>"$tmp/runs.jsonl"
}

if [ "$what" = comm ] || [ "$what" = all ]; then
  [ "${LOOM_SCALE_SMOKE:-0}" = 1 ] || {
    mpirun -np "$gpus" --allow-run-as-root -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$build/bin/loom-bench" --what=comm \
      --comm_backends=nccl --comm_min_bytes=1048576 --comm_ops=all_reduce,all_gather,reduce_scatter,all_to_all \
      --json >"$tmp/loom.jsonl"
    torchrun --nproc_per_node="$gpus" bench/torch_comm_baseline.py >"$tmp/torch.jsonl"
    python3 bench/comm_report.py "$tmp/loom.jsonl" "$tmp/torch.jsonl" "$out/collectives_${gpus}gpu"
  }
fi
if [ "$what" = cp ] || [ "$what" = all ]; then
  for n in "${counts[@]}"; do
    # Loom's attention kernels at every count: cuDNN (the configs' choice)
    # takes no ring offsets, so with it the one-GPU run and the ring runs
    # would time different kernels.
    cp_run=(--set train.seq_len=$((base_seq * n)) --set train.global_batch=1 --set train.micro_batch=1
            --set parallel.cp="$n" --set model.attention_backend=loom)
    train cp "lasp2 (L)" "$n" "$hybrid_cfg" "${cp_run[@]}" --set model.pattern=L "${all_l[@]}" --set parallel.cp_linear=lasp2
    train cp "lasp1 (L)" "$n" "$hybrid_cfg" "${cp_run[@]}" --set model.pattern=L "${all_l[@]}" --set parallel.cp_linear=lasp1
    train cp "ring (S)" "$n" "$hybrid_cfg" "${cp_run[@]}" --set model.pattern=S --set parallel.cp_softmax=ring
    train cp "allgather (S)" "$n" "$hybrid_cfg" "${cp_run[@]}" --set model.pattern=S --set parallel.cp_softmax=allgather
    if [ $((4 % n)) -eq 0 ]; then  # ulysses splits the KV heads over the ranks
      train cp "ulysses (S)" "$n" "$hybrid_cfg" "${cp_run[@]}" --set model.pattern=S --set parallel.cp_softmax=ulysses
    fi
    train cp "hybrid LLLS (ring + lasp2)" "$n" "$hybrid_cfg" "${cp_run[@]}"
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
if [ -f "$tmp/runs.jsonl" ]; then
  python3 bench/scaling_report.py "$tmp/runs.jsonl" "$out" "$suffix"
  for f in "$tmp"/*/log; do grep -q "loom-train:" "$f" && { echo "== $f"; tail -3 "$f"; }; done || true
fi
