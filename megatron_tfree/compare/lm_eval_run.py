"""lm-evaluation-harness on local task YAMLs, offline, for one arm.

T-Free arms run through this project's ``tfree`` model on the native checkpoint
(:class:`megatron_tfree.hf.lm_eval_model.TFreeLM`); BPE arms are exported to a plain
``LlamaForCausalLM`` folder (:func:`megatron_tfree.hf.export.export`, beside the run) and run through
lm-eval's own ``hf`` model, as the README's Hugging Face section does. The default tasks are the
held-out Hamlet tasks of ``examples/lm_eval`` (their data paths are relative to the repository root:
run from there). Returned: ``{task: {metric: value}}`` with lm-eval's metric names, ``,none`` dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

EXPORT_DIR = "compare_hf"


def available(include_path: str) -> Optional[str]:
    """Why lm-eval cannot run here (None: it can)."""
    if not Path(include_path).is_dir():
        return f"no task directory {include_path} (run from the repository root, or set compare.eval.lm_eval_include)"
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "lm-eval is not installed (pip install -e .[eval])"
    return None


def run(run_dir: str | Path, kind: str, tasks: list[str], include_path: str, limit: int = 0) -> dict[str, Any]:
    """lm-eval ``tasks`` (from ``include_path``) on the arm in ``run_dir`` (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if kind == "tfree":
        from megatron_tfree.hf.lm_eval_model import TFreeLM

        model: Any = TFreeLM(str(run_dir), device="cpu")
    else:
        from lm_eval.models.huggingface import HFLM

        from megatron_tfree.hf.export import export

        path = export(run_dir, Path(run_dir) / EXPORT_DIR, force=True)
        model = HFLM(pretrained=str(path), device="cpu", batch_size=8)
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, bootstrap_iters=0,
                                      log_samples=False, random_seed=0, limit=limit or None)["results"]
    out = {}
    for task, metrics in results.items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    return out
