"""Training the arms one after another, resumably, each measured (:mod:`.worker`).

Per arm, ``RUN_DIR/compare_arm.json`` records the arm's resolved config (and its fingerprint) before
training starts, then one *segment* per training process (steps trained, measured memory, wall time):

* the config is the recorded one and the ``latest`` checkpoint has reached ``training.train_iterations``:
  the arm is finished and skipped (nothing is started);
* the config is the recorded one and the arm stopped earlier (killed, interrupted): it is trained again
  and the trainer resumes from ``latest``;
* the config differs from the recorded one while checkpoints exist: an error listing the differing keys
  (a finished comparison is never silently extended or mixed; use another ``--runs-dir``).

``isolate`` (default): each arm trains in a process of its own (``python -m
megatron_tfree.compare.worker``), its output shown as it runs; otherwise in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_tfree.checkpoint.files import read_latest, step_of
from megatron_tfree.errors import UserError

from .arms import Arm, config_differences, fingerprint

STATE_FILE = "compare_arm.json"
CONFIG_FILE = "compare_arm.yaml"
RESULT_FILE = "compare_worker_result.json"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ArmError(RuntimeError, UserError):
    """An arm could not be trained (its config conflicts with the recorded run, or training failed)."""


def read_state(run_dir: str | Path) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, run_dir / STATE_FILE)


def trained_step(run_dir: str | Path) -> int:
    """The step of the arm's ``latest`` checkpoint (0: none)."""
    tag = read_latest(run_dir)
    return (step_of(tag) or 0) if tag else 0


def is_finished(arm: Arm) -> bool:
    state = read_state(arm.run_dir)
    return (state is not None and state.get("fingerprint") == fingerprint(arm.cfg)
            and trained_step(arm.run_dir) >= arm.cfg.training.train_iterations)


def _in_subprocess(arm: Arm, threads: int) -> dict[str, Any]:
    arm.cfg.save(arm.run_dir / CONFIG_FILE)
    result = arm.run_dir / RESULT_FILE
    result.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # a run of its own, never this process's group
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "megatron_tfree.compare.worker", str(arm.run_dir / CONFIG_FILE), str(result),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result.is_file():
        raise ArmError(f"arm {arm.name}: training failed (exit code {proc.returncode}; its output is above); "
                       f"a rerun resumes it from {arm.run_dir}/latest")
    return json.loads(result.read_text())


def _in_process(arm: Arm, threads: int) -> dict[str, Any]:
    from .worker import train_and_measure

    return train_and_measure(arm.cfg, isolated=False, threads=threads)


def _print(message: str) -> None:
    print(message, flush=True)


def train_arm(arm: Arm, threads: int = 0, isolate: bool = True, log: Callable[[str], None] = _print,
              position: str = "") -> dict[str, Any]:
    """Train ``arm`` unless finished (see the module docstring); returns its state (with ``skipped``)."""
    fp, run_dir = fingerprint(arm.cfg), arm.run_dir
    state = read_state(run_dir)
    step = trained_step(run_dir)
    total = arm.cfg.training.train_iterations
    if state is None and step:
        raise ArmError(f"arm {arm.name}: {run_dir} holds checkpoints not made by this comparison; use another "
                       f"--runs-dir or remove {run_dir}")
    if state is not None and state.get("fingerprint") != fp:
        if step:
            diff = config_differences(state.get("config", {}), arm.cfg.to_dict())
            raise ArmError(f"arm {arm.name}: {run_dir} was trained with another configuration (recorded in "
                           f"{STATE_FILE}); it differs in:\n  " + "\n  ".join(diff or ["(unknown)"]) +
                           "\nuse another --runs-dir for another comparison, or remove the arm's directory")
        state = None  # never trained: start afresh under the new config
    if state is not None and step >= total:
        log(f"[{position}] {arm.name}: finished earlier ({step}/{total} steps), skipped")
        return {**state, "skipped": True}
    if state is None:
        state = {"name": arm.name, "fingerprint": fp, "config": arm.cfg.to_dict(), "segments": []}
        _write_state(run_dir, state)
    how = "resuming at step " + str(step) if step else "training"
    log(f"[{position}] {arm.name}: {how} ({arm.kind}, vocabulary {arm.nominal_vocab:,}, seq_len "
        f"{arm.cfg.data.seq_len}, {total} steps) in {run_dir}" + ("" if isolate else " (in this process)"))
    measured = (_in_subprocess if isolate else _in_process)(arm, threads)
    measured.update(from_step=step, to_step=trained_step(run_dir), isolated=isolate)
    state["segments"].append(measured)
    _write_state(run_dir, state)
    return {**state, "skipped": False}


def peak_memory(state: dict[str, Any]) -> dict[str, Any]:
    """The arm's measured peaks over the processes that trained at least one step (RSS, CUDA)."""
    segs = [s for s in state.get("segments", []) if s.get("to_step", 0) > s.get("from_step", 0)]
    if not segs:
        return {"peak_rss_bytes": None, "rss_before_bytes": None, "cuda_peak_bytes": None, "device": None,
                "processes": 0, "wall_s": 0.0}
    cuda = [s["cuda_peak_bytes"] for s in segs if s.get("cuda_peak_bytes") is not None]
    top = max(segs, key=lambda s: s["peak_rss_bytes"])
    return {"peak_rss_bytes": top["peak_rss_bytes"], "rss_before_bytes": top["rss_before_bytes"],
            "peak_rss_scope": top.get("peak_rss_scope"), "cuda_peak_bytes": max(cuda) if cuda else None,
            "device": top.get("device"), "threads": top.get("threads"), "processes": len(segs),
            "wall_s": sum(s.get("wall_s", 0.0) for s in segs)}
