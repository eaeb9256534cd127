"""What the conversion entry points share: a layout argument and one-line errors for expected failures.

    p.add_argument("--layout", type=layout_arg, metavar="TP,PP,DP")
    return run_tool("convert2hf", lambda: f"wrote {export(...)}")   # prints the message, or one error line
"""

from __future__ import annotations

import argparse
from typing import Callable


def layout_arg(text: str) -> tuple[int, int, int]:
    """argparse type of ``TP,PP,DP``."""
    try:
        tp, pp, dp = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layout expects TP,PP,DP (three integers), got {text!r}") from None
    if min(tp, pp, dp) < 1:
        raise argparse.ArgumentTypeError(f"--layout sizes must be >= 1, got {text!r}")
    return tp, pp, dp


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the traceback of an expected error instead of one line (see :func:`apply_debug`)."""
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (also MEGATRON_TFREE_DEBUG=1) instead of one line")


def apply_debug(args: argparse.Namespace) -> None:
    """Honour ``--debug`` for the rest of the process (and its children)."""
    if getattr(args, "debug", False):
        import os

        os.environ["MEGATRON_TFREE_DEBUG"] = "1"


def run_tool(prog: str, body: Callable[[], str]) -> int:
    """Run ``body``; print what it returns (exit code 0), or for an expected problem (a missing or existing
    path, a bad value or config, an unsupported case) one line ``prog: error: ...`` on stderr (code 2)."""
    from megatron_tfree.errors import EXPECTED_ERRORS, report

    try:
        message = body()
    except EXPECTED_ERRORS + (ValueError, NotImplementedError) as e:
        return report(prog, e)
    print(message)
    return 0
