"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to ``min_lr``.

The schedule is a pure function of the number of *applied* optimizer updates (:func:`lr_at`), wrapped
in a small scheduler object (:class:`WarmupDecayLR`) that DeepSpeed steps after every update and
saves/loads with its checkpoints (``state_dict`` / ``load_state_dict``).

    lr_at(0)                  = lr / warmup_steps          (never 0: the first update moves weights)
    lr_at(warmup_steps - 1)   = lr
    lr_at(decay_iters)        = min_lr                      (cosine, linear); lr for constant
    lr_at(n > decay_iters)    = min_lr                      (cosine, linear)

``decay_iters`` is ``training.lr_decay_iters`` or, when that is 0, ``training.train_iterations``.
A step skipped because of a non-finite loss does not advance the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def decay_iters(training_cfg: Any) -> int:
    """Updates over which the LR decays: ``lr_decay_iters`` or (0) ``train_iterations``."""
    return int(training_cfg.lr_decay_iters or training_cfg.train_iterations)


def lr_at(step: int, training_cfg: Any) -> float:
    """Learning rate of update number ``step`` (0-based count of updates already applied)."""
    t = training_cfg
    lr, min_lr, warmup = float(t.lr), float(t.min_lr), int(t.warmup_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if t.lr_decay_style == "constant":
        return lr
    total = decay_iters(t)
    if step >= total:
        return min_lr
    span = total - warmup
    ratio = (step - warmup) / span if span > 0 else 1.0
    if t.lr_decay_style == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    elif t.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        raise ValueError(f"training.lr_decay_style: unknown style {t.lr_decay_style!r}")
    return min_lr + (lr - min_lr) * coeff


class WarmupDecayLR:
    """Sets ``lr_at(n)`` on every param group of ``optimizer``; ``step()`` after each applied update.

    When the optimizer carries ``skip_next = True`` (the trainer vetoed an update because of a
    non-finite loss) ``step()`` leaves the schedule where it is. Param groups may carry an
    ``lr_mult`` (default 1) that scales the scheduled value.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, training_cfg: Any, last_step: int = 0) -> None:
        self.optimizer = optimizer
        self.training_cfg = training_cfg
        self.num_updates = int(last_step)
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.num_updates, self.training_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance by one applied update (arguments DeepSpeed may pass are ignored)."""
        if getattr(self.optimizer, "skip_next", False):
            return
        self.num_updates += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self._apply()
