#!/usr/bin/env python
"""Convert text/JSONL/JSON/Parquet files or directories into a MemoryMap of UTF-8 documents.

Thin wrapper: the options and the work live in megatron_tfree.data.convert
(also available as `megatron-tfree-prepare-data text ...`). Run `python tools/prepare_data.py --help`.
"""

import sys

from megatron_tfree.data import convert

if __name__ == "__main__":
    sys.exit(convert.run("text", prog="prepare_data.py"))
