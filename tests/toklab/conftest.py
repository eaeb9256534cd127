"""Fixtures of the tokenizer-lab tests: a BPE trained on the bundled probe and a tiny checkpoint of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from toklab_helpers import make_checkpoint


@pytest.fixture(scope="session")
def probe_bpe(tmp_path_factory) -> Path:
    """A 600-token gpt4-preset BPE trained on the bundled multilingual probe (its tokenizer.json)."""
    from megatron_tfree.toklab.sources import parse_corpus
    from megatron_tfree.toklab.train import train_bpe

    path = tmp_path_factory.mktemp("toklab") / "probe-600.json"
    train_bpe(parse_corpus("multilingual"), 600, preset="gpt4").save(str(path))
    return path


@pytest.fixture(scope="session")
def probe_checkpoint(probe_bpe, tmp_path_factory) -> Path:
    """A tiny classic checkpoint of ``probe_bpe``."""
    from megatron_tfree.tokenizer.classic import ClassicTokenizer

    return make_checkpoint(tmp_path_factory.mktemp("toklab_ckpt") / "classic", ClassicTokenizer.from_file(probe_bpe))

