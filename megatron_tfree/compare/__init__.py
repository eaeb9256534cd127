"""T-Free against classic BPE on the same corpus, the paper's claims tested at small scale.

    python -m megatron_tfree.compare --config configs/compare_tiny.yaml [--corpus DIR] [--out DIR]
        [--runs-dir DIR] [section.key=value ...]

The arms (a T-Free model and BPE models of several vocabulary sizes, listed in the YAML's ``compare:``
section, :mod:`.settings`) share the corpus, the non-embedding architecture, the optimizer and the number
of optimizer steps; their sequence lengths hold about the same text bytes (:mod:`.arms`). Each arm is
trained in its own process with its peak memory measured (:mod:`.runner`, :mod:`.worker`), resumably: a
rerun skips finished arms and resumes interrupted ones. Every arm is then evaluated on the same held-out
passages (bits per byte, next-word accuracy, generations: :mod:`.heldout`, :mod:`.next_word`), with
lm-eval on local tasks (:mod:`.lm_eval_run`), its tokenizer measured by the tokenizer lab on the
multilingual probe (:mod:`.tokstats`), and the planner predicts the 1B memory at both vocabularies
(:mod:`.planner`). :mod:`.claims` turns the figures into one verdict per claim (confirmed, refuted,
not measurable here) and :mod:`.report` writes ``report.md``, ``report.json`` and the plots.
:mod:`.pipeline` runs the steps in order.
"""

from .claims import Verdict, verdicts
from .pipeline import run_compare

__all__ = ["Verdict", "run_compare", "verdicts"]
