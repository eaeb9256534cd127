"""Fixtures of the comparison tests: a toy corpus directory, a toy compare YAML and one whole toy
comparison (three tiny arms, 40 steps, in this process) run through the command line once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from compare_helpers import REPO, toy_config, toy_docs


@pytest.fixture(scope="session")
def toy_corpus_dir(tmp_path_factory) -> Path:
    """40 text files of repeated sentences (every 20th is held out by ``--corpus``)."""
    d = tmp_path_factory.mktemp("compare_corpus")
    for i, doc in enumerate(toy_docs(3, 40, 12)):
        (d / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory, toy_corpus_dir):
    """The toy comparison, run once through ``main`` (in this process, from the repository root: the
    example lm-eval tasks name their data relative to it)."""
    from megatron_tfree.compare.__main__ import main

    root = tmp_path_factory.mktemp("compare_run")
    config = toy_config(root / "toy.yaml")
    runs, out = root / "runs", root / "report"
    argv = ["--config", str(config), "--corpus", str(toy_corpus_dir), "--runs-dir", str(runs), "--out", str(out),
            "--in-process"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return SimpleNamespace(config=config, runs=runs, out=out, argv=argv,
                           report=json.loads((out / "report.json").read_text()))
