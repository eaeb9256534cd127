"""Everything measured about one trained arm, gathered for the report (and cached beside the run).

``measure_arm`` returns the arm's entry of ``report.json``: its parameters (:mod:`.params`), the bytes
and units it trained on and its throughput (:mod:`.trained`), its measured peak memory
(:mod:`.runner`), the held-out figures and generations (:mod:`.heldout`), lm-eval (:mod:`.lm_eval_run`),
its held-out curve (the trainer's ``metrics.jsonl`` evaluations against bytes trained) and its
tokenizer's statistics (:mod:`.tokstats`). The slow parts (held-out evaluation, lm-eval, replaying the
training batches) are cached in ``RUN_DIR/compare_eval.json``, keyed on the arm's config, its checkpoint
step and the evaluation settings, so a rerun of a finished comparison only rewrites the report.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from . import heldout, lm_eval_run, params, runner, tokstats, trained
from .arms import Arm, fingerprint
from .settings import EvalSettings

CACHE_FILE = "compare_eval.json"


def _cached(run_dir: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = run_dir / CACHE_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data["result"]
    result = compute()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1))
    os.replace(tmp, path)
    return result


def _curve(run_dir: Path, cumulative_bytes: list[int]) -> list[list[float]]:
    """``[bytes trained, held-out bits per byte]`` at every evaluation of the trainer (the untrained one at 0)."""
    from megatron_tfree.training.metrics import eval_curve

    return [[cumulative_bytes[min(step, len(cumulative_bytes) - 1)], bpb] for step, bpb in eval_curve([run_dir])]


def measure_arm(arm: Arm, texts: list[str], ev: EvalSettings, words: int, stats: dict[str, Any],
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The report entry of ``arm`` (see the module docstring); ``words``: its generation length in units."""
    run_dir = arm.run_dir
    step = runner.trained_step(run_dir)
    state = runner.read_state(run_dir) or {}
    include = ev.lm_eval_include
    why_not = lm_eval_run.available(include) if ev.lm_eval_tasks else "no tasks configured"
    key = hashlib.sha256(json.dumps([fingerprint(arm.cfg), step, texts, ev.prompts, words, ev.lm_eval_tasks,
                                     str(Path(include).resolve()), ev.lm_eval_limit, why_not]).encode()).hexdigest()

    def compute() -> dict[str, Any]:
        from megatron_tfree.checkpoint import CheckpointReader

        log(f"  {arm.name}: held-out passages (bits per byte, next-word accuracy), generations")
        result: dict[str, Any] = {"heldout": heldout.evaluate(run_dir, texts, ev.prompts, words)}
        log(f"  {arm.name}: replaying the {step} training steps' batches (bytes trained)")
        result["consumed"] = trained.consumed(arm.cfg, CheckpointReader(run_dir).tokenizer, step)
        if why_not is None:
            log(f"  {arm.name}: lm-eval {', '.join(ev.lm_eval_tasks)}")
            result["lm_eval"] = lm_eval_run.run(run_dir, arm.kind, ev.lm_eval_tasks, include, ev.lm_eval_limit)
        else:
            result["lm_eval"] = {"skipped": why_not}
        return result

    cached = _cached(run_dir, key, compute)
    consumed = cached["consumed"]
    train_row = tokstats.row(stats, arm.name, stats["train"])
    bytes_per_word = train_row["bytes_per_token"] * train_row["fertility"]  # corpus bytes per whitespace word
    units = consumed["units"][-1]
    bytes_per_unit = consumed["bytes"][-1] / units if units else train_row["bytes_per_token"]
    tok_stats = {"train": train_row, "probe": {c: tokstats.row(stats, arm.name, c) for c in stats["probe"]},
                 "near_duplicate_share": train_row["near_duplicate_share"], "name": stats["names"][arm.name]}
    return {
        "name": arm.name, "kind": arm.kind, "role": arm.role, "nominal_vocab": arm.nominal_vocab,
        "seq_len": arm.cfg.data.seq_len, "steps": step, "train_iterations": arm.cfg.training.train_iterations,
        "micro_batch_size": arm.cfg.training.micro_batch_size, "run_dir": str(run_dir),
        "tokenizer_file": arm.cfg.tokenizer.tokenizer_file if arm.kind == "classic" else "",
        "params": params.trained_params(run_dir),
        "trained": {"bytes": consumed["bytes"][-1], "units": units, "bytes_per_unit": bytes_per_unit},
        "throughput": trained.throughput(run_dir, bytes_per_unit, bytes_per_word),
        "memory": runner.peak_memory(state),
        "heldout": cached["heldout"], "lm_eval": cached["lm_eval"],
        "curve": _curve(run_dir, consumed["bytes"]),
        "tokenizer": tok_stats,
    }
