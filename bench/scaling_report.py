"""Weak-scaling report for launch/scale.sh: model TFLOP/s per GPU of each run
against the one-GPU run of its group, and memory per GPU.

Reads runs.jsonl (one line per loom-train run: {"name", "group", "gpus",
"label", "run_dir"}) and each run's metrics.jsonl; writes, per group, a
Markdown table and (with matplotlib) a PNG of efficiency by GPU count.
    python3 bench/scaling_report.py runs.jsonl docs/scaling 2gpu
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


def main():
    runs_path, out_dir, suffix = sys.argv[1], sys.argv[2], sys.argv[3]
    runs = [json.loads(l) for l in open(runs_path) if l.strip()]
    groups = {}
    for r in runs:
        r["stats"] = run_stats(r["run_dir"])
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        lines = [f"# {group} ({suffix})", "",
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
