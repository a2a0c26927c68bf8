#!/usr/bin/env python3
"""The flash-linear-attention baseline of `loom-bench --what=lightning`.

Runs Loom's bench (as a subprocess, --json, which also dumps one B=2, S=4096
case), then flash-linear-attention's `chunk_simple_gla` (fla.ops.simple_gla,
Triton) on the same shapes in the same process run: B·S = 65,536, H = 32,
D = 128, S in {4096, 16384, 65536}, the same per-head decays given as fla's
head-wise log decay g_gamma = log λ_h (shape [H]; the same function as a
per-token g = log λ_h of shape [B, T, H], but fla 0.6.0 refuses the
per-token g's backward on Hopper with Triton < 3.7.1, which it says gives
wrong results there), scale 1 (lightning attention has no 1/√d), no initial
or final state. Inputs are uniform in [-1, 1) like Loom's.
Times are medians of CUDA-event timings after warm-ups (the first call
autotunes fla's Triton kernels at S = 4096, which takes minutes on a fresh
machine; Triton keeps the results in its cache, TRITON_CACHE_DIR). Prints both and
Loom's speed-up (fla time / Loom time), then checks that fla and Loom agree
on the dumped case: o, dq, dk, dv within bf16 tolerance
(‖loom − fla‖ / ‖fla‖ <= 2e-2: each side carries a few bf16 roundings,
about 4e-3 each).

  python3 bench/fla_baseline.py --loom-bench build/bin/loom-bench
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

TOKENS, HEADS, DIM = 65536, 32, 128
LENGTHS = (4096, 16384, 65536)
AGREE_TOL = 2e-2


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def fla_fns(chunk_simple_gla, q, k, v, g_gamma, do):
    """Forward, and forward+backward, of fla on leaf tensors q, k, v."""

    def forward():
        with torch.no_grad():
            chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)

    def forward_backward():
        for t in (q, k, v):
            t.grad = None
        o, _ = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)
        o.backward(do)

    return forward, forward_backward


def load_bf16(path, shape):
    raw = np.fromfile(path, dtype=np.uint16).astype(np.int32) << 16
    return torch.from_numpy(raw.view(np.float32).reshape(shape)).to(torch.bfloat16)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loom-bench", default="build/bin/loom-bench")
    ap.add_argument("--config", default="configs/default.textproto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dump-dir", default="")
    args = ap.parse_args()

    dump = args.dump_dir or tempfile.mkdtemp(prefix="loom_lightning_")
    os.makedirs(dump, exist_ok=True)
    cmd = [args.loom_bench, "--what=lightning", "--json", f"--steps={args.steps}", f"--config={args.config}",
           f"--lightning_dump={dump}"]
    print("$", " ".join(cmd), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        sys.exit(f"loom-bench failed with exit code {run.returncode}")
    loom = {}
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            loom[row["S"]] = row

    from fla.ops.simple_gla import chunk_simple_gla

    decay = torch.from_numpy(np.fromfile(os.path.join(dump, "decay.bin"), dtype=np.float32)).cuda()
    g_gamma = torch.log(decay)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def uniform(shape):
        return (torch.rand(shape, generator=gen, device="cuda") * 2 - 1).to(torch.bfloat16)

    fla = {}
    for s in LENGTHS:
        b = TOKENS // s
        shape = (b, s, HEADS, DIM)
        q, k, v = (uniform(shape).requires_grad_() for _ in range(3))
        do = uniform(shape)
        forward, forward_backward = fla_fns(chunk_simple_gla, q, k, v, g_gamma, do)
        fla[s] = (median_ms(forward, args.steps), median_ms(forward_backward, args.steps))
        print(f"fla S={s}: fwd {fla[s][0]:.3f} ms, fwd+bwd {fla[s][1]:.3f} ms", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()

    print()
    print(f"lightning attention, B·S = {TOKENS}, H = {HEADS}, D = {DIM}, bf16, same run "
          f"({torch.cuda.get_device_name()}); speed-up = fla time / Loom time")
    print(f"{'S':>7} {'Loom fwd':>9} {'fla fwd':>9} {'x':>6} {'Loom f+b':>9} {'fla f+b':>9} {'x':>6} "
          f"{'Loom Mtok/s':>12} {'fla Mtok/s':>11} {'Loom TF/s':>10} {'Loom GB/s':>10}")
    for s in LENGTHS:
        lf, lfb = loom[s]["fwd_ms"], loom[s]["fwdbwd_ms"]
        ff, ffb = fla[s]
        print(f"{s:>7} {lf:>9.3f} {ff:>9.3f} {ff / lf:>6.2f} {lfb:>9.3f} {ffb:>9.3f} {ffb / lfb:>6.2f} "
              f"{TOKENS / lfb / 1e3:>12.2f} {TOKENS / ffb / 1e3:>11.2f} {loom[s]['fwdbwd_tflops']:>10.1f} "
              f"{loom[s]['fwdbwd_gbps']:>10.0f}")
    per_token = [loom[s]["fwdbwd_ms"] for s in LENGTHS]
    print(f"Loom f+b time per token, max/min over S - 1: {max(per_token) / min(per_token) - 1:.1%}")

    # Agreement on the dumped case (B = 2, S = 4096).
    shape = (2, 4096, HEADS, DIM)
    q, k, v, do = (load_bf16(os.path.join(dump, f"{n}.bin"), shape).cuda() for n in ("q", "k", "v", "do"))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, _ = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)
    o.backward(do)
    ok = True
    for name, ref in (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        mine = load_bf16(os.path.join(dump, f"{name}.bin"), shape).cuda()
        err = rel(mine, ref.detach())
        ok &= err <= AGREE_TOL
        print(f"agreement {name}: ‖loom − fla‖/‖fla‖ = {err:.2e} (tol {AGREE_TOL:.0e}) {'ok' if err <= AGREE_TOL else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
