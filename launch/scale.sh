#!/usr/bin/env bash
# Scaling measurements on the GPUs of this machine (issue 12), written to
# docs/scaling/ as Markdown tables and PNG plots. So far: collective bus
# bandwidth of Loom's NCCL communicator beside torch.distributed (same NCCL),
# by size. Usage, from the repository root on a GPU machine with a CUDA
# build (build-cuda/): launch/scale.sh [loom-bench binary] [output dir]
set -euo pipefail
bench=${1:-build-cuda/bin/loom-bench}
out=${2:-docs/scaling}
gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -ge 2 ] || { echo "scale.sh: $gpus GPU(s): the scaling runs need at least 2"; exit 1; }
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mpirun -np "$gpus" --allow-run-as-root -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$bench" --what=comm \
  --comm_backends=nccl --comm_min_bytes=1048576 --comm_ops=all_reduce,all_gather,reduce_scatter,all_to_all \
  --json > "$tmp/loom.jsonl"
torchrun --nproc_per_node="$gpus" bench/torch_comm_baseline.py > "$tmp/torch.jsonl"
python3 bench/comm_report.py "$tmp/loom.jsonl" "$tmp/torch.jsonl" "$out/collectives_${gpus}gpu"
echo "wrote $out/collectives_${gpus}gpu.md"
