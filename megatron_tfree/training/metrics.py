"""Run metrics: ``metrics.jsonl`` (one JSON object per step), TensorBoard scalars, console lines, a plot.

Only rank 0 writes. ``metrics.jsonl`` is the source of truth: the plot (``loss.png``) is drawn from it
at the end of a run, and a checkpoint stores the file's byte length (its *position*) so a resumed run
first truncates lines written after that checkpoint and never duplicates a step.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
EVAL_KEYS = ("eval_loss", "bits_per_byte")


def _json_safe(value: Any) -> Any:
    """Non-finite floats become ``null`` (JSON has no NaN/inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends step records to ``{save_dir}/metrics.jsonl`` and mirrors numbers to TensorBoard.

    Args:
        save_dir: the run directory (``training.save_dir``).
        enabled: False on every rank but 0 (all methods become no-ops).
        tensorboard: also write TensorBoard scalars under ``{save_dir}/tensorboard``.
        truncate_to: byte length to cut ``metrics.jsonl`` back to (the position stored in the
            checkpoint being resumed); None keeps the file as it is.
        fresh: a new run: an existing non-empty ``metrics.jsonl`` is renamed to
            ``metrics.jsonl.<time>.old`` (:attr:`set_aside`) instead of being appended to.
    """

    def __init__(self, save_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 truncate_to: Optional[int] = None, fresh: bool = False) -> None:
        self.path = Path(save_dir) / METRICS_FILE
        self.enabled = enabled
        self.set_aside: Optional[Path] = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.is_file() and self.path.stat().st_size:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
            self.set_aside = self.path.with_name(f"{METRICS_FILE}.{stamp}.old")
            os.replace(self.path, self.set_aside)
        if truncate_to is not None and self.path.exists() and self.path.stat().st_size > truncate_to:
            with open(self.path, "r+b") as f:
                f.truncate(truncate_to)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(save_dir) / TENSORBOARD_DIR))

    def position(self) -> int:
        """Current byte length of ``metrics.jsonl`` (stored in checkpoints)."""
        if not self.enabled:
            return 0
        self._file.flush()
        return self.path.stat().st_size

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``) as one JSON line; numeric fields go to TensorBoard."""
        if not self.enabled:
            return
        clean = {k: _json_safe(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    section = "eval" if key in EVAL_KEYS else "train"
                    self._tb.add_scalar(f"{section}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """The console line of one step: step, loss, eval loss and bits/byte (on the steps that evaluated),
    words/s, lr, grad norm."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    parts = [f"step {record['step']}/{total_steps}", f"loss {num(record.get('loss'), '.4f')}"]
    if record.get("eval_loss") is not None:
        parts.append(f"eval_loss {num(record['eval_loss'], '.4f')}")
    if record.get("bits_per_byte") is not None:
        parts.append(f"bits/byte {num(record['bits_per_byte'], '.4f')}")
    parts += [f"words/s {num(record.get('words_per_s'), '.0f')}", f"lr {num(record.get('lr'), '.3e')}",
              f"grad_norm {num(record.get('grad_norm'), '.3f')}"]
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite loss)")
    return " | ".join(parts)


def plot_loss(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Draw training loss (and eval loss where present) over steps from ``metrics.jsonl`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    def series(key: str) -> list[tuple[int, float]]:  # the untrained evaluation is logged with step 1
        out = [(0, r[f"initial_{key}"]) for r in records[:1] if r.get(f"initial_{key}") is not None]
        return out + [(r["step"], r[key]) for r in records if r.get(key) is not None]

    evals, bpb = series("eval_loss"), series("bits_per_byte")
    fig, axes = plt.subplots(1, 2 if bpb else 1, figsize=(11 if bpb else 7, 4), squeeze=False)
    ax = axes[0][0]
    if bpb:
        bx = axes[0][1]
        bx.plot(*zip(*bpb), "o-", color="tab:green", label="held-out bits per byte")
        bx.set_xlabel("step")
        bx.set_ylabel("bits per byte")
        bx.grid(alpha=0.3)
        bx.legend()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out_path, dpi=100)


def eval_curve(run_dirs: list[str | os.PathLike], key: str = "bits_per_byte") -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` at every evaluation of a run, the untrained one at step 0; several
    runs are chained (each continuing the previous, e.g. a second training round started from the first
    with ``training.init_from``): a later run's steps are counted on from the previous run's last step,
    and its untrained evaluation is left out (it repeats the previous run's last weights)."""
    curve: list[tuple[int, float]] = []
    offset = 0
    for i, run in enumerate(run_dirs):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (not a run directory?)")
        records = read_metrics(path)
        if i == 0 and records and records[0].get(f"initial_{key}") is not None:
            curve.append((0, float(records[0][f"initial_{key}"])))
        curve += [(offset + r["step"], float(r[key])) for r in records if r.get(key) is not None]
        offset += max((r["step"] for r in records if "step" in r), default=0)
    return curve


def plot_curves(curves: dict[str, list[tuple[int, float]]], out_path: str | os.PathLike,
                ylabel: str = "held-out bits per byte", xlabel: str = "step") -> Path:
    """One line per named curve into a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), "o-", label=name, markersize=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out_path, dpi=110)


def _save(fig, out_path: str | os.PathLike, dpi: int) -> Path:
    """Write ``fig`` to ``out_path`` atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out)
    return out
