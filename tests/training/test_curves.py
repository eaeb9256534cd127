"""Held-out curves of runs: chained rounds count their steps on; the plot tool's table and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tfree.training.metrics import eval_curve, plot_curves

REPO = Path(__file__).resolve().parents[2]


def _run(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chained_rounds_count_steps_on(tmp_path):
    one = _run(tmp_path / "r1", [{"step": 1, "loss": 3.0, "initial_bits_per_byte": 3.5},
                                 {"step": 2, "loss": 2.0, "bits_per_byte": 2.5}, {"step": 4, "loss": 1.9, "bits_per_byte": 2.2}])
    two = _run(tmp_path / "r2", [{"step": 1, "loss": 1.8, "initial_bits_per_byte": 2.2},
                                 {"step": 3, "loss": 1.7, "bits_per_byte": 2.0}])
    assert eval_curve([one]) == [(0, 3.5), (2, 2.5), (4, 2.2)]
    assert eval_curve([one, two]) == [(0, 3.5), (2, 2.5), (4, 2.2), (7, 2.0)]  # round 2's untrained eval dropped
    assert eval_curve([one], key="eval_loss") == []
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        eval_curve([tmp_path / "nothing"])
    out = plot_curves({"a": eval_curve([one]), "b": eval_curve([one, two])}, tmp_path / "c.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_the_plot_tool(tmp_path):
    _run(tmp_path / "r1", [{"step": 2, "bits_per_byte": 2.5, "initial_bits_per_byte": 3.0}])
    proc = subprocess.run([sys.executable, "tools/plot_runs.py", "--run", f"first={tmp_path / 'r1'}",
                           "--out", str(tmp_path / "p.png")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| first | 3.0000 | 2.5000 |" in proc.stdout and (tmp_path / "p.png").is_file()
    bad = subprocess.run([sys.executable, "tools/plot_runs.py", "--run", "x", "--out", str(tmp_path / "q.png")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=DIR" in bad.stderr
