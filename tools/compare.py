#!/usr/bin/env python
"""T-Free against BPE on the same corpus, the paper's claims at small scale: ``python tools/compare.py --help``.

Thin wrapper: the same as ``python -m megatron_tfree.compare`` (see that package's docstring).
"""

import sys

from megatron_tfree.compare.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
