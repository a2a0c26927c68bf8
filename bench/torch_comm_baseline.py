"""torch.distributed NCCL collectives, timed like `loom-bench --what=comm`.

The baseline for issue 12's collective table: run it on the same machine in
the same call as Loom's bench, e.g.
    torchrun --nproc_per_node=2 bench/torch_comm_baseline.py --max-bytes 268435456
Prints one JSON line per (op, bytes) on rank 0 with nccl-tests' algbw/busbw
(f32 payload; `bytes` is the per-rank message size as Loom's bench counts it:
the all_reduce tensor, the all_gather input × ranks, the reduce_scatter input,
the all_to_all tensor). PyTorch is a tool for this check, not a dependency.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-bytes", type=int, default=1 << 20)
    ap.add_argument("--max-bytes", type=int, default=256 << 20)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    factors = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
               "all_to_all": (n - 1) / n}
    size = args.min_bytes
    while size <= args.max_bytes:
        elems = size // 4
        for op, factor in factors.items():
            if op == "all_reduce":
                x = torch.ones(elems, device="cuda")
                run = lambda: dist.all_reduce(x)
            elif op == "all_gather":
                out = torch.empty(elems, device="cuda")
                x = torch.ones(elems // n, device="cuda")
                run = lambda: dist.all_gather_into_tensor(out, x)
            elif op == "reduce_scatter":
                x = torch.ones(elems, device="cuda")
                out = torch.empty(elems // n, device="cuda")
                run = lambda: dist.reduce_scatter_tensor(out, x)
            else:
                x = torch.ones(elems, device="cuda")
                out = torch.empty(elems, device="cuda")
                run = lambda: dist.all_to_all_single(out, x)
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                run()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / args.iters
            algbw = size / seconds / 1e9
            if rank == 0:
                print(json.dumps({"what": "comm", "backend": "torch-nccl", "op": op, "ranks": n, "bytes": size,
                                  "time_us": seconds * 1e6, "algbw_gbps": algbw, "busbw_gbps": algbw * factor}),
                      flush=True)
        size *= 4
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
