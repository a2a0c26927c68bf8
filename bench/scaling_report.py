"""Weak-scaling report for launch/scale.sh: model TFLOP/s per GPU of each run
against the one-GPU run of its group, and memory per GPU.

Reads runs.jsonl (one line per loom-train run: {"name", "group", "gpus",
"label", "run_dir"}) and each run's metrics.jsonl; writes, per group, a
Markdown table and (with matplotlib) a PNG of efficiency by GPU count.
    python3 bench/scaling_report.py runs.jsonl docs/scaling 2gpu
With --longest, reads longest.jsonl instead (one line per try of launch/
scale.sh's longest search: {"label", "gpus", "seq", "rc", "plan",
"run_dir"}) and writes longest_<suffix>.md: each scheme's longest sequence
that trained a step, its memory per GPU, and why the next length failed.
TFLOP/s per GPU is loom-train's tflops_per_rank (DESIGN.md's model FLOPs,
causal attention counted; docs/metrics.md), the median over the steps after
the first (warm-up); memory is the largest tensor_peak_mb (CUDA pool peak).
"""
import json
import os
import statistics
import sys


def run_stats(run_dir):
    steps = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    for line in open(path):
        r = json.loads(line)
        if "tflops_per_rank" in r:
            steps.append(r)
    if len(steps) < 2:
        return None
    timed = steps[1:]
    return {"tflops": statistics.median(s["tflops_per_rank"] for s in timed),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
            "mem_gib": max(s["tensor_peak_mb"] for s in steps) / 1024.0}


def machine(jsonl_path):
    """scale.sh's machine.txt beside the runs: date, GPUs, Loom's commit."""
    path = os.path.join(os.path.dirname(jsonl_path), "machine.txt")
    return " | ".join(l.strip() for l in open(path) if l.strip()) if os.path.exists(path) else "machine not recorded"


def commands(rows):
    """The command of each run (its `cmd` file), under a heading."""
    out = ["", "## Commands", "", "Each run, as `launch/scale.sh` started it (plus `--set train.run_dir=...`):", ""]
    for r in rows:
        path = os.path.join(r["run_dir"], "cmd")
        cmd = open(path).read().strip() if os.path.exists(path) else "(not recorded)"
        what = f"{r['label']}, {r['gpus']} GPU(s)" + (f", seq {r['seq']:,}" if "seq" in r else "")
        out += [f"- {what}: `{cmd}`"]
    return out


def failure(run_dir):
    """The line of a failed run's log that says why (the out-of-memory line if any)."""
    path = os.path.join(run_dir, "log")
    lines = [l.strip() for l in open(path)] if os.path.exists(path) else []
    lines = [l for l in lines if l]
    said = [l for l in lines if "out of gpu memory" in l.lower() or "out of memory" in l.lower()] + \
        [l for l in lines if l.startswith(("loom-train:", "loom:", "[cuda]", "[loom]"))]
    why = said[0] if said else lines[-1] if lines else "no log"
    return why.replace("|", "\\|")[:160]


def longest_report(tries_path, out_dir, suffix):
    tries = [json.loads(l) for l in open(tries_path) if l.strip()]
    lines = [f"# Longest sequence a step trains ({suffix})", "", machine(tries_path), "",
             "One step (`train.steps=1`, micro-batch 1) at cp = all GPUs; lengths double from the weak-scaling "
             "length until one fails, then bisect. Memory: the CUDA pool's peak a GPU, and `loom-train --dry-run`'s "
             "plan (which leaves out context-parallel buffers and kernel scratch).", "",
             "| scheme | GPUs | longest trained | step time (s) | tokens/s | pool peak (GiB) | plan (GiB) | "
             "next length | why it failed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label in dict.fromkeys(t["label"] for t in tries):
        mine = sorted((t for t in tries if t["label"] == label), key=lambda t: t["seq"])
        good = [t for t in mine if t["rc"] == 0]
        best = good[-1] if good else None
        over = [t for t in mine if t["rc"] != 0 and (best is None or t["seq"] > best["seq"])]
        nxt = over[0] if over else None
        row = [label, str(mine[0]["gpus"])]
        if best:
            steps = [json.loads(l) for l in open(os.path.join(best["run_dir"], "metrics.jsonl"))
                     if '"tokens_per_s"' in l]
            s = steps[-1]
            row += [f"{best['seq']:,}", f"{s['elapsed_s']:.1f}", f"{s['tokens_per_s']:.0f}",
                    f"{s['tensor_peak_mb'] / 1024.0:.2f}", best["plan"] or "?"]
        else:
            row += [f"none (from {mine[0]['seq']:,})", "", "", "", ""]
        row += [f"{nxt['seq']:,}", failure(nxt["run_dir"])] if nxt else \
            ["", f"not reached: every length tried up to {mine[-1]['seq']:,} trained"]
        lines.append("| " + " | ".join(row) + " |")
    lines += commands(tries)
    path = os.path.join(out_dir, f"longest_{suffix}.md")
    open(path, "w").write("\n".join(lines) + "\n")
    print(path)


def main():
    if sys.argv[1] == "--longest":
        longest_report(*sys.argv[2:5])
        return
    runs_path, out_dir, suffix = sys.argv[1], sys.argv[2], sys.argv[3]
    runs = [json.loads(l) for l in open(runs_path) if l.strip()]
    groups = {}
    for r in runs:
        r["stats"] = run_stats(r["run_dir"])
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        lines = [f"# {group} ({suffix})", "", machine(runs_path), "",
                 "| scheme | GPUs | tokens/s | TFLOP/s per GPU | efficiency | memory per GPU (GiB) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        curves = {}
        for label in dict.fromkeys(r["label"] for r in rows):
            mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["gpus"])
            base = next((r["stats"] for r in mine if r["gpus"] == 1 and r["stats"]), None)
            for r in mine:
                s = r["stats"]
                if s is None:
                    lines.append(f"| {label} | {r['gpus']} | failed (see {r['run_dir']}/log) | | | |")
                    continue
                eff = s["tflops"] / base["tflops"] if base else float("nan")
                curves.setdefault(label, []).append((r["gpus"], eff))
                lines.append(f"| {label} | {r['gpus']} | {s['tokens_per_s']:.0f} | {s['tflops']:.1f} | "
                             f"{eff:.3f} | {s['mem_gib']:.2f} |")
        lines += commands(rows)
        prefix = os.path.join(out_dir, f"{group}_{suffix}")
        open(prefix + ".md", "w").write("\n".join(lines) + "\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"{prefix}.md (no matplotlib: no PNG)")
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("efficiency (TFLOP/s per GPU / one GPU)")
        ax.set_title(f"{group} weak scaling ({suffix})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(prefix + ".png", dpi=120)
        print(f"{prefix}.md, {prefix}.png")


if __name__ == "__main__":
    main()
