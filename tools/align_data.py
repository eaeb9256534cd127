#!/usr/bin/env python
"""Build the aligned index (items of about --max-bytes bytes) of a text MemoryMap.

Thin wrapper: the options and the work live in megatron_tfree.data.convert
(also available as `megatron-tfree-prepare-data align ...`). Run `python tools/align_data.py --help`.
"""

import sys

from megatron_tfree.data import convert

if __name__ == "__main__":
    sys.exit(convert.run("align", prog="align_data.py"))
