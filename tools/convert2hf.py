#!/usr/bin/env python
"""Export a megatron_tfree checkpoint as a Hugging Face model folder: ``python tools/convert2hf.py --help``.

The same as ``python -m megatron_tfree.convert2hf`` and the ``megatron-tfree-convert2hf`` console script.
"""

import sys

from megatron_tfree.convert2hf import main

if __name__ == "__main__":
    sys.exit(main())
