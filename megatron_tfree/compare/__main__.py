"""``python -m megatron_tfree.compare --config configs/compare_tiny.yaml [--corpus DIR] [--out DIR]
[--runs-dir DIR] [section.key=value ...]`` (also ``tools/compare.py``): train T-Free and BPE arms on the
same corpus and write a report with a verdict per claim of the T-Free paper (see the package docstring).

Overrides ``section.key=value`` apply to every arm (e.g. ``training.train_iterations=4`` for a smoke
run); ``compare.key=value`` changes the comparison's settings (e.g. ``compare.threads=2``). A rerun with
the same settings skips the finished arms and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from megatron_tfree.cli import add_debug_flag, apply_debug, run_tool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tfree.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="compare YAML: a trainer config plus a compare: section with the arms")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="applied to every arm (compare.key=value: the comparison's settings)")
    p.add_argument("--corpus", help="a directory (or file) of text / JSONL / Parquet to train and evaluate on "
                   "(default: data.prefix_paths, else the built-in corpus)")
    p.add_argument("--out", help="where report.md, report.json and the plots go (default: RUNS_DIR/report)")
    p.add_argument("--runs-dir", help="checkpoints, tokenizers and caches (default: compare.runs_dir)")
    p.add_argument("--in-process", action="store_true",
                   help="train the arms in this process (faster start; memory then measured since a reset)")
    add_debug_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    apply_debug(args)
    raw = list(sys.argv[1:] if argv is None else argv)

    def run() -> str:
        from .pipeline import run_compare

        path = run_compare(args.config, args.overrides, corpus=args.corpus, out=args.out, runs_dir=args.runs_dir,
                           isolate=False if args.in_process else None,
                           command="python -m megatron_tfree.compare " + " ".join(shlex.quote(x) for x in raw))
        return f"report: {path}"

    return run_tool("megatron-tfree-compare", run)


if __name__ == "__main__":
    sys.exit(main())
