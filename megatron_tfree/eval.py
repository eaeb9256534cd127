"""``python -m megatron_tfree.eval``: lm-evaluation-harness with this project's ``tfree`` model registered.

    python -m megatron_tfree.eval --model tfree --model_args pretrained=runs/tiny --tasks lambada_openai
    python -m megatron_tfree.eval --model tfree --model_args pretrained=hf/tiny --tasks my_task --include_path tasks/
    python -m megatron_tfree.eval --model hf --model_args pretrained=hf/bpe --tasks my_task   # classic exports

The arguments are lm-eval's (``run`` is implied). ``pretrained`` is a T-Free checkpoint of any layout
or its Hugging Face export; see :mod:`megatron_tfree.hf.lm_eval_model` for what the numbers mean.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    import lm_eval.models  # noqa: F401  (lm-eval's own models: hf, ...)
    from lm_eval.__main__ import cli_evaluate

    import megatron_tfree.hf.lm_eval_model  # noqa: F401  (registers the "tfree" model)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "python -m megatron_tfree.eval"
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
