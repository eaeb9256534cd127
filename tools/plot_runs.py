#!/usr/bin/env python
"""Held-out curves of several runs on one figure, and their table:

    python tools/plot_runs.py --run random=runs/small-random --run inherited=runs/small-inherited \\
        --run "inherited + multi-round=runs/small-inherited,runs/small-round2" --out curves.png

A run is ``NAME=DIR[,DIR...]`` (several dirs: chained rounds, steps counted on). Prints a Markdown table
(untrained, every evaluation, final) of ``--metric`` (default bits_per_byte).
"""

import argparse
import sys

from megatron_tfree.cli import run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR[,DIR...]")
    p.add_argument("--metric", default="bits_per_byte")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)

    def run() -> str:
        from megatron_tfree.training.metrics import eval_curve, plot_curves

        curves = {}
        for spec in args.run:
            name, sep, dirs = spec.partition("=")
            if not sep or not dirs:
                raise ValueError(f"--run {spec!r}: expected NAME=DIR[,DIR...]")
            curves[name] = eval_curve(dirs.split(","), args.metric)
            if not curves[name]:
                raise ValueError(f"--run {spec!r}: no {args.metric} in its metrics.jsonl")
        plot_curves(curves, args.out, ylabel=args.metric.replace("_", " "))
        steps = sorted({s for pts in curves.values() for s, _ in pts})
        lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
        for name, pts in curves.items():
            at = dict(pts)
            lines.append(f"| {name} | " + " | ".join(f"{at[s]:.4f}" if s in at else "" for s in steps) + " |")
        return "\n".join(lines) + f"\nwrote {args.out}"

    return run_tool("plot_runs", run)


if __name__ == "__main__":
    sys.exit(main())
