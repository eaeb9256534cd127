#!/usr/bin/env python
"""Convert a training checkpoint between layouts (thin CLI over megatron_tfree.training.consolidate).

    # any (TP, PP, DP, ZeRO) DeepSpeed checkpoint -> layout-free directory (full fp32 weights + Adam moments)
    python tools/convert_checkpoint.py runs/big runs/big-full            # run dir (latest) or runs/big/step_N
    # resume from it at any layout:  training.load_dir=runs/big-full
    # or write it back as a DeepSpeed checkpoint of a chosen layout (resume + save, no training step):
    python tools/convert_checkpoint.py runs/big-full runs/big-tp1pp2 --to-deepspeed --layout 1,2,1

Both directions start the needed number of CPU processes (gloo) on this machine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_tfree.cli import layout_arg, run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("src", help="DeepSpeed run dir / step_N dir (default direction) or a consolidated dir "
                                    "(with --to-deepspeed)")
    parser.add_argument("out", help="output directory (written atomically; must not exist unless --overwrite)")
    parser.add_argument("--to-deepspeed", action="store_true",
                        help="consolidated -> DeepSpeed run dir (latest + step_N) at --layout")
    parser.add_argument("--layout", type=layout_arg, default=(1, 1, 1), metavar="TP,PP,DP",
                        help="target layout for --to-deepspeed (default 1,1,1)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                        help="ZeRO stage for --to-deepspeed (default: the checkpoint config's parallel.zero_stage)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from megatron_tfree.training import consolidate

    def body() -> str:
        if args.to_deepspeed:
            tp, pp, dp = args.layout
            tag_dir = consolidate.to_deepspeed(args.src, args.out, tensor=tp, pipe=pp, data=dp,
                                               zero_stage=args.zero_stage, overwrite=args.overwrite)
            return f"wrote DeepSpeed checkpoint {tag_dir} (TP={tp}, PP={pp}, DP={dp})"
        return f"wrote consolidated checkpoint {consolidate.to_consolidated(args.src, args.out, overwrite=args.overwrite)}"

    return run_tool("convert_checkpoint.py", body)


if __name__ == "__main__":
    sys.exit(main())
