"""Prepare a config's data and print tokenizer statistics.

    python -m megatron_tfree.prepare --config configs/tiny.yaml [section.key=value ...]

Fetches and converts the default corpus when ``data.prefix_paths`` is empty (cached), builds the
aligned indexes, builds the tokenizer (a classic BPE is trained on the train split if missing), and
prints statistics of both splits. Training runs the same preparation on its own; this command is
for looking at data before spending compute on it.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_tfree.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--max-mb", type=float, default=None, help="measure statistics on at most this much text per split")
    p.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .errors import EXPECTED_ERRORS, report

    try:
        return _prepare(args)
    except EXPECTED_ERRORS as e:  # a bad config, a missing data path, corrupt data
        return report("megatron-tfree-prepare", e)


def _prepare(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from .data.dataset import build_dataset
    from .data.sources import iter_documents, split_prefixes, tokenizer_for_config
    from .tokenizer.stats import format_stats, measure

    tokenizer = tokenizer_for_config(cfg)
    max_bytes = int(args.max_mb * 1e6) if args.max_mb else None
    report = {}
    for split in ("train", "valid"):
        prefixes = split_prefixes(cfg, split)
        if not prefixes:
            print(f"[{split}] no data configured")
            continue
        dataset = build_dataset(cfg, tokenizer, split)
        stats = measure(tokenizer, iter_documents(prefixes, max_bytes))
        print(f"[{split}] {', '.join(prefixes)}: {len(dataset):,} samples of {cfg.data.seq_len} units")
        print(format_stats(stats, cfg.model.hidden_size))
        report[split] = {"prefixes": prefixes, "samples": len(dataset), **stats.to_dict()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
