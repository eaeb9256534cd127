#!/usr/bin/env python
"""The tokenizer lab (train, report, count, prune, swap, soft): ``python tools/toklab.py --help``.

The same as ``python -m megatron_tfree.toklab`` and the ``megatron-tfree-toklab`` console script.
"""

import sys

from megatron_tfree.toklab.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
