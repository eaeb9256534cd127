"""The planner's predicted memory per GPU for a large config (default ``configs/1b.yaml``) at both
vocabularies: :func:`megatron_tfree.plan.make_plan` (weights, gradients, optimizer state for the
configured ZeRO stage, activations of the worst pipeline stage) on ``nodes x gpus_per_node`` GPUs.

Rows: the config's T-Free tokenizer; a BPE of ``bpe_vocab_size`` at the same ``data.seq_len`` (the same
positions per sample); and, when the comparison measured it, the BPE at the sequence length that holds
the same bytes (``seq_len x`` the measured bytes-per-unit ratio of the reference and baseline arms).
A prediction, not a measurement: it has no CUDA context, buffers or fragmentation.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_tfree.config import load_config
from megatron_tfree.plan import GIB, make_plan

from .settings import PlannerSettings


def _row(label: str, settings: PlannerSettings, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(settings.config, overrides)
    plan = make_plan(cfg, settings.nodes, settings.gpus_per_node, settings.gpu_memory_gib)
    p = plan["params"]
    return {"label": label, "kind": cfg.tokenizer.kind, "vocab_size": p["embedding"] // cfg.model.hidden_size,
            "seq_len": cfg.data.seq_len, "params_total": p["total"],
            "params_embedding_head": p["embedding"] + p["output"] - cfg.model.hidden_size,
            "gib_per_gpu": plan["total_bytes"] / GIB, "fits": plan["fits"], "zero_stage": plan["zero_stage"],
            "precision": plan["precision"], "micro_batch_size": plan["layout"]["micro_batch_size"]}


def predicted_memory(settings: PlannerSettings, bytes_ratio: Optional[float] = None) -> list[dict[str, Any]]:
    """Planner rows (see the module docstring); ``bytes_ratio`` = BPE tokens per T-Free unit for equal bytes."""
    tfree = _row("T-Free", settings, ["tokenizer.kind=tfree"])
    classic = ["tokenizer.kind=classic", f"tokenizer.classic_vocab_size={settings.bpe_vocab_size}"]
    rows = [tfree, _row(f"BPE {settings.bpe_vocab_size:,}, same positions", settings, classic)]
    if bytes_ratio:
        seq = max(1, round(tfree["seq_len"] * bytes_ratio))
        rows.append(_row(f"BPE {settings.bpe_vocab_size:,}, same bytes", settings, classic + [f"data.seq_len={seq}"]))
    return rows
