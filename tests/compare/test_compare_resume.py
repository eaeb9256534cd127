"""Training the arms: an interrupted arm resumes, a finished one is skipped (nothing trained), another
config is refused, and the memory figures are those the measurement functions return (in this process
and in an arm's own process)."""

from __future__ import annotations

import os

import pytest


def _arm(cfg_factory, tmp_path, **training):
    from megatron_tfree.compare.arms import Arm

    cfg = cfg_factory(tmp_path, "arm", training={"train_iterations": 4, "eval_iterations": 0, **training})
    return Arm("arm", cfg, "reference")


def test_interrupted_arm_resumes_and_finished_arm_is_skipped(cfg_factory, tmp_path, monkeypatch):
    import megatron_tfree.training.loop as loop
    from megatron_tfree.compare import runner

    arm, real, calls, logs = _arm(cfg_factory, tmp_path), loop.train, [], []
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: calls.append("killed at 2") or real(cfg, stop_after=2))
    runner.train_arm(arm, isolate=False, log=logs.append)
    assert runner.trained_step(arm.run_dir) == 2 and not runner.is_finished(arm)
    first = (arm.run_dir / "metrics.jsonl").read_text().splitlines()

    monkeypatch.setattr(loop, "train", lambda cfg, **kw: calls.append("train") or real(cfg, **kw))
    state = runner.train_arm(arm, isolate=False, log=logs.append)
    lines = (arm.run_dir / "metrics.jsonl").read_text().splitlines()
    assert "resuming at step 2" in logs[-1] and len(lines) == 4 and lines[:2] == first
    assert [(s["from_step"], s["to_step"]) for s in state["segments"]] == [(0, 2), (2, 4)] and runner.is_finished(arm)

    state = runner.train_arm(arm, isolate=False, log=logs.append)
    assert state["skipped"] and "finished earlier (4/4 steps), skipped" in logs[-1]
    assert calls == ["killed at 2", "train"]  # the third call trained nothing
    assert (arm.run_dir / "metrics.jsonl").read_text().splitlines() == lines


def test_another_config_is_refused(cfg_factory, tmp_path):
    from megatron_tfree.compare import runner

    runner.train_arm(_arm(cfg_factory, tmp_path, train_iterations=1), isolate=False, log=lambda m: None)
    with pytest.raises(runner.ArmError, match=r"training\.lr: 0\.003 -> 0\.001"):
        runner.train_arm(_arm(cfg_factory, tmp_path, train_iterations=1, lr=1e-3), isolate=False, log=lambda m: None)


def test_memory_is_what_the_measurement_returns(cfg_factory, tmp_path, monkeypatch):
    from megatron_tfree.compare import memory, runner

    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: 123_456_789)
    monkeypatch.setattr(memory, "current_rss_bytes", lambda: 12_345)
    state = runner.train_arm(_arm(cfg_factory, tmp_path, train_iterations=1), isolate=False, log=lambda m: None)
    (segment,) = state["segments"]
    assert (segment["peak_rss_bytes"], segment["rss_before_bytes"]) == (123_456_789, 12_345)
    assert runner.peak_memory(state)["peak_rss_bytes"] == 123_456_789
    assert memory.cuda_peak_bytes() is None or segment["cuda_peak_bytes"] is not None


def test_an_arm_in_its_own_process(cfg_factory, tmp_path):
    """The default: the worker process trains and measures itself (the real peak of that process)."""
    from megatron_tfree.compare import memory, runner

    arm = _arm(cfg_factory, tmp_path, train_iterations=2)
    state = runner.train_arm(arm, threads=1, isolate=True, log=lambda m: None)
    (segment,) = state["segments"]
    assert segment["pid"] != os.getpid() and segment["peak_rss_scope"] == "process" and segment["threads"] == 1
    assert segment["peak_rss_bytes"] >= segment["rss_before_bytes"] > 50 << 20  # torch is loaded
    assert segment["to_step"] == 2 and runner.is_finished(arm)
    assert segment["peak_rss_bytes"] < memory.peak_rss_bytes() * 100  # a figure of a process, not a sum
