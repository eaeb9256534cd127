#!/usr/bin/env python
"""Import a Hugging Face Llama folder or a T-Free reference checkpoint: ``python tools/import_checkpoint.py --help``.

The same as ``python -m megatron_tfree.import_checkpoint`` and the ``megatron-tfree-import`` console script.
"""

import sys

from megatron_tfree.import_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
