#!/usr/bin/env python
"""Multiple-round training (score an epoch, sample the next round): ``python tools/multiround.py --help``.

Thin wrapper: the same as ``python -m megatron_tfree.multiround`` (see that package's docstring).
"""

import sys

from megatron_tfree.multiround.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
