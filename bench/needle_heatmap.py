#!/usr/bin/env python3
"""Needle-in-a-haystack heatmap from loom-eval's eval.json.

usage: needle_heatmap.py EVAL_JSON OUT_PNG

Rows are context lengths, columns needle depths (0: the first token of the
haystack, 1: just before the question), colour the answer accuracy in
percent, with each cell's value written in it. Called by loom-eval when
python3 can import matplotlib.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        result = json.load(f)
    grid = result["needle"]
    acc = [[100 * a for a in row] for row in grid["accuracy"]]
    lengths, depths = grid["lengths"], grid["depths"]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(lengths) + 1.8))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth (fraction of the context)")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="answer accuracy (%)")
    ax.set_title(f"needle in a haystack, step {result['step']}, {grid['samples']} samples a cell\n"
                 f"chance {100 * grid['chance']:.1f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)


if __name__ == "__main__":
    main()
