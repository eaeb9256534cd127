"""Run safety: one owner per save dir (a second run refuses, the first's metrics stay intact; stale locks are
taken over), a new run keeps old metrics aside, resume compares configs (one error lists every key; allowed
changes are reported), an unreadable checkpoint falls back to the previous one or is named, a stopped rank
under a short collective timeout ends every process, old checkpoints are pruned, expected errors are one
line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tfree.checkpoint import lock as lock_module
from megatron_tfree.checkpoint.lock import LOCK_FILE, TAKEOVER_FILE, SaveDirBusy, SaveDirLock
from megatron_tfree.config import ConfigError
from megatron_tfree.training.checkpoint import CheckpointError
from megatron_tfree.training.engine import free_port
from megatron_tfree.training.loop import train
from megatron_tfree.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cli(cfg, tmp_path, name="cfg.yaml", extra=()):
    path = tmp_path / name
    cfg.save(path)
    return [sys.executable, "-m", "megatron_tfree.train", "--config", str(path), *extra]


def _wait_for_steps(metrics: Path, n: int, proc: subprocess.Popen, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{metrics}: fewer than {n} steps after {limit} s")


@pytest.mark.slow
def test_second_run_on_a_busy_save_dir_refuses(tiny_cfg, tmp_path):
    cfg = tiny_cfg("busy", training={"train_iterations": 100000, "save_interval": 100000, "eval_iterations": 0})
    first = subprocess.Popen(_cli(cfg, tmp_path), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        metrics = Path(cfg.training.save_dir) / "metrics.jsonl"
        _wait_for_steps(metrics, 3, first)
        second = subprocess.run(_cli(cfg, tmp_path, "cfg2.yaml"), cwd=REPO, env=ENV, capture_output=True, text=True,
                                timeout=120)
        lines_after = len(metrics.read_text().splitlines())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (PID {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        time.sleep(1.0)
        records = read_metrics(metrics)  # the first run's lines are all there and it goes on
        assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= lines_after
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / LOCK_FILE
    mine = SaveDirLock(tmp_path)
    owner = {**mine.me.__dict__, "pid": dead.pid, "pid_start": "1", "run_id": "gone"}
    path.write_text(json.dumps(owner))
    assert "is gone" in SaveDirLock(tmp_path).acquire()

    live = SaveDirLock(tmp_path)  # the lock above is held by this process now: a live owner
    path.write_text(json.dumps({**live.me.__dict__, "run_id": "other", "slurm_job_id": ""}))
    with pytest.raises(SaveDirBusy, match=f"PID {os.getpid()} on {socket.gethostname()}"):
        SaveDirLock(tmp_path).acquire()

    path.write_text(json.dumps({**live.me.__dict__, "run_id": "other", "host": "node-b", "heartbeat": time.time()}))
    with pytest.raises(SaveDirBusy, match="node-b"):
        SaveDirLock(tmp_path).acquire()
    path.write_text(json.dumps({**live.me.__dict__, "run_id": "other", "host": "node-b",
                                "heartbeat": time.time() - 3600}))
    assert "has not refreshed it for" in SaveDirLock(tmp_path, stale_after=600).acquire()

    os.environ["SLURM_JOB_ID"] = "4242"
    os.environ["SLURM_RESTART_COUNT"] = "1"
    try:
        other = {**live.me.__dict__, "run_id": "other", "host": "node-b", "pid": 1, "slurm_job_id": "4242",
                 "heartbeat": time.time()}
        path.write_text(json.dumps({**other, "slurm_restart": 1}))  # a second srun in the same allocation
        with pytest.raises(SaveDirBusy, match="SLURM job 4242"):
            SaveDirLock(tmp_path).acquire()
        path.write_text(json.dumps({**other, "slurm_restart": 0}))  # the instance before the requeue
        assert "requeued" in SaveDirLock(tmp_path).acquire()
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]
    # a dead PID in another PID namespace (another container on this host) says nothing: the heartbeat decides
    path.write_text(json.dumps({**live.me.__dict__, "run_id": "other", "pid": dead.pid, "pid_ns": "pid:[1]",
                                "heartbeat": time.time()}))
    with pytest.raises(SaveDirBusy, match="in use by another run"):
        SaveDirLock(tmp_path).acquire()
    lock = SaveDirLock(tmp_path)
    path.unlink()
    lock.acquire()
    lock.release()
    assert not path.exists()


def test_lock_being_written_or_taken_over_is_busy(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text("")  # another run between its O_EXCL create and writing the owner
    with pytest.raises(SaveDirBusy, match="writing its lock right now"):
        SaveDirLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    takeover = tmp_path / TAKEOVER_FILE
    takeover.write_text("someone")  # another run is taking the stale lock over right now
    with pytest.raises(SaveDirBusy, match="taking over its stale lock right now"):
        SaveDirLock(tmp_path).acquire()
    os.utime(takeover, (old, old))  # ... or crashed doing so, long ago
    lock = SaveDirLock(tmp_path)
    assert "unreadable lock file" in lock.acquire()
    assert json.loads(path.read_text())["run_id"] == lock.me.run_id and not takeover.exists()
    lock.release()


def test_heartbeat_thread_refreshes_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    lock = SaveDirLock(tmp_path)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    first = json.loads(path.read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads(path.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads(path.read_text())["heartbeat"] > first  # refreshed without any training step
    lock.heartbeat()  # still ours
    path.write_text(json.dumps({**lock.me.__dict__, "run_id": "thief", "host": "node-c"}))
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(SaveDirBusy, match="taken over by another run .*node-c"):
        lock.heartbeat()
    lock.release()
    assert path.exists()  # the thief's lock is not removed


def test_new_run_keeps_old_metrics_aside(tiny_cfg):
    cfg = tiny_cfg("aside", training={"train_iterations": 2, "eval_iterations": 0})
    save_dir = Path(cfg.training.save_dir)
    save_dir.mkdir(parents=True)
    (save_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    train(cfg)
    assert [r["step"] for r in read_metrics(save_dir / "metrics.jsonl")] == [1, 2]
    assert read_metrics(save_dir / "metrics.jsonl")[0]["loss"] != 9.0
    (old,) = save_dir.glob("metrics.jsonl.*.old")
    assert read_metrics(old)[0]["loss"] == 9.0
    assert not (save_dir / LOCK_FILE).exists()  # released at the end


@pytest.fixture(scope="module")
def saved(cfg_factory, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("safety")
    cfg = cfg_factory(out, "run", training={"train_iterations": 4, "save_interval": 2, "eval_iterations": 0})
    train(cfg)
    return out, cfg


def test_resume_refuses_changed_model_tokenizer_and_data_keys(saved, cfg_factory):
    out, _ = saved
    bad = cfg_factory(out, "run", model={"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                                         "init": "normal"},
                      tokenizer={"kind": "tfree", "vocab_size": 1024, "vocab_population": 4},
                      data={"seq_len": 8}, training={"train_iterations": 6, "eval_iterations": 0})
    with pytest.raises(ConfigError) as e:
        train(bad)
    msg = str(e.value)
    for line in ("model.num_attention_heads: 2 in the checkpoint, 4 now", "tokenizer.vocab_size: 512 in the checkpoint, "
                 "1024 now", "data.seq_len: 16 in the checkpoint, 8 now"):
        assert line in msg
    wider = cfg_factory(out, "run", model={"hidden_size": 64, "num_layers": 3, "num_attention_heads": 2,
                                           "init": "normal"}, training={"train_iterations": 6, "eval_iterations": 0})
    with pytest.raises(ConfigError, match=r"model.hidden_size: 32 in the checkpoint, 64 now(.|\n)*model.num_layers: 2"):
        train(wider)
    zero = cfg_factory(out, "run", training={"train_iterations": 6, "eval_iterations": 0}, parallel={"zero_stage": 1})
    with pytest.raises(ConfigError, match="parallel.zero_stage: 0 in the checkpoint, 1 now(.|\n)*convert_checkpoint"):
        train(zero)


def test_allowed_changes_are_reported_and_unreadable_checkpoints_fall_back(saved, cfg_factory, tmp_path, capsys):
    import shutil

    out, cfg = saved
    run = tmp_path / "copy"
    shutil.copytree(cfg.training.save_dir, run)
    weights = run / "step_4" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    more = cfg_factory(tmp_path, "copy", training={"train_iterations": 5, "eval_iterations": 0, "lr": 1e-3})
    result = train(more)
    err = capsys.readouterr()
    assert f"WARNING: checkpoint {run / 'step_4'} cannot be read ({weights}" in err.err
    assert "resuming" in err.out and "step 2" in err.out
    assert "training.train_iterations: 4 -> 5" in err.out and "training.lr: 0.003 -> 0.001" in err.out
    assert sorted(result.losses) == [3, 4, 5]
    explicit = cfg_factory(tmp_path, "other", training={"load_dir": str(run / "step_2"), "eval_iterations": 0})
    (run / "step_2" / "rng_state_rank0.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="rng_state_rank0.json"):
        train(explicit)


def test_old_checkpoints_are_pruned(tiny_cfg):
    cfg = tiny_cfg("prune", training={"train_iterations": 6, "save_interval": 1, "eval_iterations": 0,
                                      "keep_checkpoints": 2, "keep_every": 4})
    train(cfg)
    assert sorted(p.name for p in Path(cfg.training.save_dir).glob("step_*")) == ["step_4", "step_5", "step_6"]


@pytest.mark.slow
@pytest.mark.distributed
def test_stopped_rank_times_out_every_process(tiny_cfg, tmp_path):
    import psutil

    timeout = 8
    cfg = tiny_cfg("hung", training={"train_iterations": 100000, "save_interval": 100000, "eval_iterations": 0,
                                     "collective_timeout": timeout})
    torchrun = Path(sys.executable).with_name("torchrun")
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    proc = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(free_port()), "-m", "megatron_tfree.train", "--config", str(path)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(Path(cfg.training.save_dir) / "metrics.jsonl", 2, proc)
        workers = psutil.Process(proc.pid).children(recursive=True)
        rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
        stopped = time.monotonic()
        os.kill(rank1.pid, signal.SIGSTOP)
        _, err = proc.communicate(timeout=timeout + 90)
        elapsed = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and elapsed < timeout + 90
    assert f"waited longer than training.collective_timeout={timeout} s for another rank" in err
    assert all(not psutil.pid_exists(w.pid) or psutil.Process(w.pid).status() == psutil.STATUS_ZOMBIE for w in workers)


def test_expected_errors_are_one_line(tiny_cfg, tmp_path):
    cfg = tiny_cfg("missing-data", data={"prefix_paths": [str(tmp_path / "nowhere")], "valid_prefix_paths": []})
    proc = subprocess.run(_cli(cfg, tmp_path), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-tfree-train: error: data.prefix_paths[0] = ") and str(tmp_path / "nowhere") in last
    debug = subprocess.run(_cli(cfg, tmp_path, extra=["--debug"]), cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    gen = subprocess.run([sys.executable, "-m", "megatron_tfree.generate", "--checkpoint", str(tmp_path / "none"),
                          "--prompt", "x"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 2 and gen.stderr.strip() == (f"megatron-tfree-generate: error: checkpoint directory "
                                                          f"{tmp_path / 'none'} does not exist")


def test_log_lines_show_bits_per_byte_only_when_evaluated():
    from megatron_tfree.training.metrics import format_line

    plain = format_line({"step": 3, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "words_per_s": 10.0}, 10)
    evaluated = format_line({"step": 4, "loss": 1.0, "eval_loss": 0.9, "bits_per_byte": 2.25, "lr": 1e-3,
                             "grad_norm": 0.5, "words_per_s": 10.0}, 10)
    assert "bits/byte" not in plain and "bits/byte 2.2500" in evaluated and "eval_loss 0.9000" in evaluated


def test_retention_counts_down_from_latest_after_a_rollback(tmp_path):
    from megatron_tfree.checkpoint.files import STATE_FILE, write_latest
    from megatron_tfree.training.checkpoint import prune_checkpoints

    for step in (100, 200, 300, 400, 500, 150):  # 300-500 diverged; the run rolled back to 100 and saved 150
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / STATE_FILE).write_text("{}")
    write_latest(tmp_path, "step_150")
    assert prune_checkpoints(tmp_path, keep=2, every=0) == []  # 150 and 100 are the two newest up to latest
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_{s}" for s in (100, 150, 200, 300, 400, 500)]
    assert prune_checkpoints(tmp_path, keep=1, every=0) == ["step_100"]  # newer than latest: not counted, kept
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_{s}" for s in (150, 200, 300, 400, 500)]
