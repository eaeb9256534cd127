"""``training.init_from``: a new run starts from a checkpoint's weights (any layout) with a fresh optimizer
and schedule; a restart resumes the run's own checkpoint; config and weights that do not fit are errors
naming the key or tensor."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed import run_distributed
from megatron_tfree.config import ConfigError
from megatron_tfree.training.loop import train
from megatron_tfree.training.metrics import read_metrics

SECTIONS = dict(model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2},
                training={"train_iterations": 4, "warmup_steps": 2, "eval_interval": 4})


@pytest.fixture(scope="module")
def source(cfg_factory, tmp_path_factory):
    """A 4-step run at (1, 1, 1); its last evaluation is the one the next run must start from."""
    out = tmp_path_factory.mktemp("init_from")
    cfg = cfg_factory(out, "source", **SECTIONS)
    return out, Path(cfg.training.save_dir), train(cfg).last_eval["eval_loss"]


def _run(rank, world, cfg):
    from megatron_tfree.training.loop import train

    return train(cfg).losses


def _sections(**training):
    return {**SECTIONS, "training": {**SECTIONS["training"], **training}}


@pytest.mark.distributed
def test_new_run_starts_from_the_weights_at_another_layout(source, cfg_factory):
    out, run_dir, final_eval = source
    sections = _sections(init_from=str(run_dir), train_iterations=2)
    cfg = cfg_factory(out, "tp2", **sections, parallel={"tensor": 2})
    losses = run_distributed(_run, world=2, args=(cfg,), timeout=240)[0]
    assert sorted(losses) == [1, 2]  # a new run: steps from 1, not a resume at step 4
    records = read_metrics(Path(cfg.training.save_dir) / "metrics.jsonl")
    assert records[0]["initial_eval_loss"] == pytest.approx(final_eval, rel=1e-5)  # the source's weights
    first = read_metrics(run_dir / "metrics.jsonl")[0]
    assert records[0]["lr"] == first["lr"] < cfg.training.lr  # fresh schedule: warmup starts again
    assert abs(first["initial_eval_loss"] - final_eval) > 1e-3  # (a random start would show)


def test_restart_resumes_its_own_checkpoint(source, cfg_factory, capsys):
    out, run_dir, _ = source
    cfg = cfg_factory(out, "resumable", **_sections(init_from=str(run_dir), train_iterations=2))
    train(cfg)
    assert "initialised from" in capsys.readouterr().out
    more = cfg_factory(out, "resumable", **_sections(init_from=str(run_dir), train_iterations=3))
    assert sorted(train(more).losses) == [3]
    printed = capsys.readouterr().out
    assert "resuming" in printed and "initialised from" not in printed


@pytest.mark.parametrize("sections,match", [
    ({"model": {**SECTIONS["model"], "hidden_size": 64}}, "model.hidden_size is 64 here but 32"),
    ({"model": {**SECTIONS["model"], "num_kv_heads": 4}}, "model.num_kv_heads is 4 here but 2"),
    ({"tokenizer": {"kind": "tfree", "vocab_size": 256, "vocab_population": 4}}, "tokenizer.vocab_size is 256"),
])
def test_mismatch_names_the_key(source, cfg_factory, sections, match):
    out, run_dir, _ = source
    cfg = cfg_factory(out, "bad", **{**_sections(init_from=str(run_dir)), **sections})
    with pytest.raises(ConfigError, match=match):
        train(cfg)


def test_bad_paths_and_exclusive_options(source, cfg_factory, tmp_path):
    out, run_dir, _ = source
    with pytest.raises(ConfigError, match=f"training.init_from={tmp_path / 'nowhere'}: .*does not exist"):
        train(cfg_factory(out, "bad", **_sections(init_from=str(tmp_path / "nowhere"))))
    with pytest.raises(ConfigError, match="exclude each other"):
        cfg_factory(out, "bad", **_sections(init_from=str(run_dir), load_dir=str(run_dir)))
