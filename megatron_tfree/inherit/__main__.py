"""``python -m megatron_tfree.inherit --from BIG --config small.yaml [section.key=value ...] --out DIR``
(also ``tools/inherit.py`` and ``megatron-tfree-inherit``): a smaller model initialised from a larger
trained one (see :mod:`megatron_tfree.inherit`); train it with ``training.init_from=DIR``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_tfree.cli import add_debug_flag, apply_debug, run_tool


def build_parser() -> argparse.ArgumentParser:
    from .importance import LAYER_METHODS, METHODS

    p = argparse.ArgumentParser(prog="python -m megatron_tfree.inherit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="the larger trained checkpoint (run dir, tag dir; any layout)")
    p.add_argument("--config", help="the small model's config (YAML; default: the source's config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. model.num_layers=2 model.hidden_size=128")
    p.add_argument("--out", required=True, help="the checkpoint to write (for training.init_from)")
    p.add_argument("--width", choices=METHODS, default="l1", help="importance of heads, channels, hidden dims")
    p.add_argument("--layers", choices=LAYER_METHODS, default="even",
                   help="even: first, last and evenly spaced blocks; importance: loss increase when skipped")
    p.add_argument("--calibration", type=int, default=4, help="micro-batches for taylor / importance")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_debug_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    apply_debug(args)

    def run() -> str:
        from megatron_tfree.checkpoint import CheckpointReader
        from megatron_tfree.config import Config, load_config

        from .build import inherit

        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            from megatron_tfree.config import apply_overrides

            base = CheckpointReader(args.src).cfg.to_dict()
            cfg = Config.from_dict(apply_overrides(base, list(args.overrides)), source=f"{args.src} + overrides")
        out, record = inherit(args.src, cfg, args.out, args.width, args.layers, args.calibration,
                              overwrite=args.force, progress=True)
        r = record["inherit"]
        return (f"wrote {out}: {len(r['layers'])} blocks {r['layers']} of the source, hidden {r['hidden']}, "
                f"{args.width} width importance; train it with training.init_from={out}")

    return run_tool("inherit", run)


if __name__ == "__main__":
    sys.exit(main())
