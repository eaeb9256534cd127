#!/usr/bin/env python
"""Parameter inheritance: a smaller model initialised from a larger one: ``python tools/inherit.py --help``.

The same as ``python -m megatron_tfree.inherit`` and the ``megatron-tfree-inherit`` console script.
"""

import sys

from megatron_tfree.inherit.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
