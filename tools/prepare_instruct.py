#!/usr/bin/env python
"""Convert instruction JSONL (lists of has_loss/type/content pieces) into a MemoryMap.

Thin wrapper: the options and the work live in megatron_tfree.data.convert
(also available as `megatron-tfree-prepare-data instruct ...`). Run `python tools/prepare_instruct.py --help`.
"""

import sys

from megatron_tfree.data import convert

if __name__ == "__main__":
    sys.exit(convert.run("instruct", prog="prepare_instruct.py"))
