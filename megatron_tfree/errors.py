"""Expected conditions a user can fix. Entry points print them as one line and exit non-zero, without a
traceback (``--debug`` or ``MEGATRON_TFREE_DEBUG=1`` shows it).

    try:
        ...
    except EXPECTED_ERRORS as e:
        return report(prog, e)          # "prog: error: <message>" on stderr, returns 2
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Base of the expected errors (a bad config, a busy save dir, corrupt data, a hung peer, ...)."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError)


def debug() -> bool:
    return os.environ.get("MEGATRON_TFREE_DEBUG", "") not in ("", "0")


def report(prog: str, error: BaseException) -> int:
    """Print ``prog: error: <error>`` on stderr (the traceback too in debug mode); returns the exit code 2."""
    if debug():
        import traceback

        traceback.print_exception(error)
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
