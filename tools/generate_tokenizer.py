#!/usr/bin/env python
"""Precompute the T-Free decode dictionary of a checkpoint once and store it beside the weights.

Writes ``DIR/<tag>/decode_dictionary.safetensors`` + ``decode_dictionary.json`` from the checkpoint's
``word_counts.json`` (plus ``--word-counts``); ``InferencePipe.from_checkpoint`` then loads it without
recomputing the patterns. Thin wrapper over ``megatron_tfree.inference.loading.precompute_dictionary``.

    python tools/generate_tokenizer.py --checkpoint runs/tiny [--reduce-to 100000]
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="generate_tokenizer.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="save dir (with 'latest') or checkpoint tag dir")
    p.add_argument("--word-counts", default=None, help="extra word counts (JSON or TSV) added to the checkpoint's")
    p.add_argument("--reduce-to", type=int, default=None, help="keep the special words plus the N most frequent")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickled --word-counts file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from megatron_tfree.inference.loading import precompute_dictionary

    path = precompute_dictionary(args.checkpoint, args.word_counts, args.reduce_to, args.allow_pickle)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
