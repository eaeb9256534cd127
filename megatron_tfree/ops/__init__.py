"""The sparse ops of T-Free behind one stable Python API, with a choice of backend.

Call sites use only these functions; which implementation runs is decided here:

* ``reference`` (:mod:`megatron_tfree.ops.reference`): pure PyTorch, runs everywhere, defines the
  semantics (and the loss normalisation, see that module's docstring).
* compiled C++/CUDA kernels register themselves later under another name with the same functions.

The backend is taken from ``$MEGATRON_TFREE_OPS_BACKEND`` (default ``auto`` = the fastest registered
backend that is available, today always ``reference``) or set with :func:`set_backend`. The first
call of an op logs once which backend is active.

    from megatron_tfree import ops
    x = ops.embedding_bag(weight, offsets, ids)              # [N, h]
    loss = ops.tfree_bce_loss(logits, t_off, t_ids, w, pos_weight=300.0, loss_scale=100.0)
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Callable

import torch

from . import reference

__all__ = [
    "embedding_bag",
    "tfree_bce_loss",
    "cross_entropy_loss",
    "available_backends",
    "backend_name",
    "register_backend",
    "set_backend",
]

logger = logging.getLogger("megatron_tfree")

ENV_VAR = "MEGATRON_TFREE_OPS_BACKEND"
_OP_NAMES = ("embedding_bag", "tfree_bce_loss", "cross_entropy_loss")

# name -> (module or object with the op functions, availability check); insertion order = preference
# from least to most preferred, so ``auto`` takes the last available one.
_BACKENDS: dict[str, tuple[ModuleType, Callable[[], bool]]] = {"reference": (reference, lambda: True)}
_active: str | None = None
_logged = False


def register_backend(name: str, impl: ModuleType, available: Callable[[], bool] = lambda: True) -> None:
    """Make ``impl`` (which must define every op) selectable as ``name``; later ones are preferred by ``auto``."""
    missing = [op for op in _OP_NAMES if not callable(getattr(impl, op, None))]
    if missing:
        raise ValueError(f"backend {name!r} lacks ops: {', '.join(missing)}")
    _BACKENDS[name] = (impl, available)


def available_backends() -> list[str]:
    return [name for name, (_, ok) in _BACKENDS.items() if ok()]


def set_backend(name: str) -> None:
    """Select a backend by name (``auto`` picks the most preferred available one)."""
    global _active, _logged
    if name == "auto":
        name = available_backends()[-1]
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; known: {', '.join(_BACKENDS)}")
    if not _BACKENDS[name][1]():
        raise ValueError(f"ops backend {name!r} is not available on this machine")
    if name != _active:
        _active, _logged = name, False


def backend_name() -> str:
    """The active backend's name (resolving ``$MEGATRON_TFREE_OPS_BACKEND`` on first use)."""
    if _active is None:
        set_backend(os.environ.get(ENV_VAR, "auto"))
    assert _active is not None
    return _active


def _impl() -> ModuleType:
    global _logged
    name = backend_name()
    if not _logged:
        logger.info("megatron_tfree ops backend: %s", name)
        _logged = True
    return _BACKENDS[name][0]


def embedding_bag(weight: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """``[N, h]`` sum of ``weight`` rows per CSR row; see :func:`reference.embedding_bag`."""
    return _impl().embedding_bag(weight, offsets, ids, vocab_start)


def tfree_bce_loss(
    logits: torch.Tensor,
    target_offsets: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    pos_weight: float,
    loss_scale: float,
) -> torch.Tensor:
    """Scalar T-Free BCE loss (mean over ``N * v``); see :func:`reference.tfree_bce_loss`."""
    return _impl().tfree_bce_loss(logits, target_offsets, target_ids, weights, pos_weight, loss_scale)


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar weighted-mean CE loss ``sum(w * ce) / sum(w)``; see :func:`reference.cross_entropy_loss`."""
    return _impl().cross_entropy_loss(logits, targets, weights)
