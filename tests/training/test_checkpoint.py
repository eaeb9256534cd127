"""Checkpoints: exact resume, the atomic ``latest`` pointer under a crash mid-save, RNG and layout."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_tfree.config import load_config
from megatron_tfree.training import checkpoint as ckpt
from megatron_tfree.training.loop import train
from megatron_tfree.training.metrics import read_metrics

STEPS = 6  # 2N with N = 3


def _final_params(store):
    def hook(step, engine, record):
        if step == STEPS:
            store.update({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    return hook


@pytest.fixture(scope="module")
def uninterrupted(cfg_factory, tmp_path_factory):
    """Reference run: 2N steps in one go (fp32, CPU)."""
    out = tmp_path_factory.mktemp("ref")
    params = {}
    result = train(cfg_factory(out, "ref"), on_step=_final_params(params))
    return result, params, out / "ref"


def test_resume_is_exact(uninterrupted, tiny_cfg):
    ref, ref_params, ref_dir = uninterrupted
    cfg = tiny_cfg("resumed")
    first = train(cfg, stop_after=STEPS // 2)  # N steps, checkpoint, "job ends"
    assert first.step == STEPS // 2 and ckpt.read_latest(cfg.training.save_dir) == "step_3"
    params = {}
    second = train(cfg, on_step=_final_params(params))  # resumes from save_dir/latest
    assert min(second.losses) == STEPS // 2 + 1
    losses = {**first.losses, **second.losses}
    assert losses == ref.losses  # bit-identical per-step losses
    assert params.keys() == ref_params.keys()
    assert all(torch.equal(params[k], ref_params[k]) for k in params)
    steps = [r["step"] for r in read_metrics(f"{cfg.training.save_dir}/metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    # word counts continue across the restart
    counts = lambda d: json.loads((Path(d) / "step_6" / ckpt.WORD_COUNTS_FILE).read_text())
    assert counts(ref_dir) == counts(cfg.training.save_dir)
    assert sum(counts(ref_dir).values()) == STEPS * 2 * 16  # every target word of 12 full samples


def test_crash_mid_save_keeps_previous_checkpoint(uninterrupted, tiny_cfg, monkeypatch):
    ref = uninterrupted[0]
    cfg = tiny_cfg("crash", training={"save_interval": 2})
    real = ckpt._write_json

    def failing(path, data):
        if path.parent.name == "step_4" and path.name == ckpt.WORD_COUNTS_FILE:
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_json", failing)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    save_dir = cfg.training.save_dir
    assert ckpt.read_latest(save_dir) == "step_2"  # the half-written step_4 is not pointed at
    assert (Path(save_dir) / "step_4" / "mp_rank_00_model_states.pt").is_file()
    assert not (Path(save_dir) / "step_4" / ckpt.STATE_FILE).exists()
    assert max(r["step"] for r in read_metrics(f"{save_dir}/metrics.jsonl")) == 4

    monkeypatch.setattr(ckpt, "_write_json", real)
    resumed = train(cfg)  # from step_2: metrics after it are cut, steps 3..6 replayed exactly
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert resumed.losses == {k: v for k, v in ref.losses.items() if k > 2}
    assert [r["step"] for r in read_metrics(f"{save_dir}/metrics.jsonl")] == list(range(1, 7))
    assert ckpt.read_latest(save_dir) == "step_6"


def test_checkpoint_layout_is_json_and_reloadable(uninterrupted):
    _, _, run_dir = uninterrupted
    tag_dir = run_dir / "step_6"
    state = json.loads((tag_dir / ckpt.STATE_FILE).read_text())
    assert state["step"] == 6 and state["consumed_samples"] == 12 and state["skipped_steps"] == 0
    assert state["metrics_position"] == (run_dir / "metrics.jsonl").stat().st_size
    cfg = load_config(tag_dir / ckpt.CONFIG_FILE)
    assert cfg.model.hidden_size == 32 and cfg.training.save_dir == str(run_dir)
    from megatron_tfree.tokenizer import load_tokenizer

    assert load_tokenizer(tag_dir / ckpt.TOKENIZER_DIR).vocab_size == 512
    rng = json.loads((tag_dir / "rng_state_rank0.json").read_text())
    assert set(rng) >= {"python", "numpy", "torch"}
    assert (run_dir / ckpt.LATEST_FILE).read_text().strip() == "step_6"


def test_find_resume_sources(uninterrupted, tiny_cfg, tmp_path):
    _, _, run_dir = uninterrupted
    assert ckpt.find_resume(tiny_cfg("fresh")) is None
    by_run = tiny_cfg("other", training={"load_dir": str(run_dir)})
    assert ckpt.find_resume(by_run) == (run_dir, "step_6")
    by_tag = tiny_cfg("other", training={"load_dir": str(run_dir / "step_6")})
    assert ckpt.find_resume(by_tag) == (run_dir, "step_6")
    bad = tiny_cfg("other", training={"load_dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="training.load_dir"):
        ckpt.find_resume(bad)


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(ckpt.capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_pointer_is_replaced_atomically(tmp_path):
    assert ckpt.read_latest(tmp_path) is None
    ckpt.write_latest(tmp_path, "step_1")
    ckpt.write_latest(tmp_path, "step_2")
    assert ckpt.read_latest(tmp_path) == "step_2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp files left


def test_resume_under_zero3_matches_reference(uninterrupted, tiny_cfg):
    ref = uninterrupted[0]
    cfg = tiny_cfg("zero3", parallel={"zero_stage": 3})
    first = train(cfg, stop_after=STEPS // 2)
    second = train(cfg)
    assert sorted(second.losses) == [4, 5, 6]
    losses = {**first.losses, **second.losses}
    assert losses == pytest.approx(ref.losses, rel=1e-6)


def test_deepspeed_files_load_weights_only(uninterrupted, tiny_cfg, monkeypatch):
    """Resuming never unpickles arbitrary objects: every DeepSpeed file goes through weights_only."""
    loaded = []
    real_enter = ckpt._weights_only_loads.__enter__

    def spy(self):
        loaded.append(self)
        return real_enter(self)

    monkeypatch.setattr(ckpt._weights_only_loads, "__enter__", spy)
    cfg = tiny_cfg("zero1", parallel={"zero_stage": 1}, training={"train_iterations": 2})
    train(cfg, stop_after=1)
    train(cfg)
    names = {Path(f).name for f in loaded[0].files}
    assert names == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
