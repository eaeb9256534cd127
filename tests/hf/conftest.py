"""Checkpoints for the Hugging Face tests: tiny T-Free and classic runs saved at (TP, PP) = (1, 1) and (2, 2)
by the real trainer (2 steps each), made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed import run_distributed, train_rank

MODEL = {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "mlp_factor": 2.7,
         "attention": "sdpa"}


@pytest.fixture(scope="session")
def hf_checkpoints(cfg_factory, tmp_path_factory):
    """``get(kind, tp, pp)`` -> the run dir of a 2-step run (trained on first use)."""
    out = tmp_path_factory.mktemp("hf_runs")
    made: dict = {}

    def get(kind: str, tp: int = 1, pp: int = 1) -> Path:
        key = (kind, tp, pp)
        if key not in made:
            tokenizer = {"kind": kind}
            if kind == "classic":
                tokenizer.update(tokenizer_file=str(out / "bpe.json"), classic_vocab_size=400)
            cfg = cfg_factory(out, f"{kind}_tp{tp}pp{pp}", model=MODEL, tokenizer=tokenizer,
                              training={"train_iterations": 2, "micro_batch_size": 1, "global_batch_size": 2,
                                        "eval_iterations": 0},
                              parallel={"tensor": tp, "pipe": pp})
            if tp * pp == 1:
                train_rank(0, 1, cfg)
            else:  # a conftest function could not be pickled into the workers: conftest names collide
                run_distributed(train_rank, world=tp * pp, args=(cfg,), timeout=240)
            made[key] = Path(cfg.training.save_dir)
        return made[key]

    return get
