"""Collective bandwidth report: Loom's communicator beside torch.distributed.

Reads the JSON lines of `loom-bench --what=comm --json` and of
bench/torch_comm_baseline.py (same machine, same call) and writes a Markdown
table and, when matplotlib is importable, a PNG plot of bus bandwidth by size.
    python3 bench/comm_report.py loom.jsonl torch.jsonl docs/scaling/collectives
"""
import json
import sys


def load(path):
    rows = {}
    for line in open(path):
        if line.startswith("{"):
            r = json.loads(line)
            rows.setdefault((r["op"], r["bytes"]), r)  # the first measurement of a size
    return rows


def main():
    loom, torch, prefix = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
    keys = sorted(k for k in loom if k in torch)
    ranks = loom[keys[0]]["ranks"] if keys else 0
    lines = [f"| op | size | Loom µs | Loom busbw GB/s | torch µs | torch busbw GB/s | Loom / torch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for op, size in keys:
        a, b = loom[(op, size)], torch[(op, size)]
        lines.append(f"| {op} | {size // (1 << 20)} MiB | {a['time_us']:.1f} | {a['busbw_gbps']:.1f} | "
                     f"{b['time_us']:.1f} | {b['busbw_gbps']:.1f} | {a['busbw_gbps'] / b['busbw_gbps']:.3f} |")
    open(prefix + ".md", "w").write(f"{ranks} ranks, NCCL\n\n" + "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    ops = sorted({op for op, _ in keys})
    fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.2), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sizes = [s for o, s in keys if o == op]
        ax.plot(sizes, [loom[(op, s)]["busbw_gbps"] for s in sizes], "o-", label="Loom")
        ax.plot(sizes, [torch[(op, s)]["busbw_gbps"] for s in sizes], "s--", label="torch.distributed")
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel("bytes")
        ax.set_ylabel("busbw GB/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)


if __name__ == "__main__":
    main()
