"""The sparse ops of T-Free behind one stable Python API, with a choice of backend.

Call sites use only these functions; which implementation runs is decided here:

* ``reference`` (:mod:`megatron_tfree.ops.reference`): pure PyTorch, runs everywhere, defines the
  semantics (and the loss normalisation, see that module's docstring).
* ``cpp`` (:mod:`megatron_tfree.ops.extension`): the native kernels. CPU tensors run the C++/OpenMP
  kernels of ``csrc/tfree_ops.cpp`` (fused head + loss, deterministic embedding-bag backward, decode
  scoring), CUDA tensors the CUDA kernels of ``csrc/*_kernels.cu`` when those are built
  (:mod:`megatron_tfree.ops.cuda`), anything else the reference. Available to ``auto`` only once the
  C++ module is built (``pip install -e .`` or a cached JIT build); naming it explicitly builds it
  (~25 s once), see ``csrc/README.md``.

The backend is taken from ``$MEGATRON_TFREE_OPS_BACKEND`` (default ``auto`` = the most preferred
registered backend that is available) or set with :func:`set_backend`. The first call of an op logs
once which backend is active. ``tfree_head_loss`` and ``decode_scores`` are optional for a backend:
without them the reference head loss / the dictionary's torch scoring is used.

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
    "tfree_head_loss",
    "cross_entropy_loss",
    "native_decode_scores",
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
# name -> called when the backend is selected by name while unavailable (e.g. builds an extension)
_PREPARE: dict[str, Callable[[], None]] = {}
_active: str | None = None
_logged = False


def register_backend(name: str, impl: ModuleType, available: Callable[[], bool] = lambda: True,
                     prepare: Callable[[], None] | None = None) -> None:
    """Make ``impl`` (which must define every op) selectable as ``name``; later ones are preferred by ``auto``.

    ``prepare`` (optional) runs when ``name`` is selected explicitly while ``available()`` is False; it
    may make it available (build an extension) or raise an error that says how to fix it.
    """
    missing = [op for op in _OP_NAMES if not callable(getattr(impl, op, None))]
    if missing:
        raise ValueError(f"backend {name!r} lacks ops: {', '.join(missing)}")
    _BACKENDS[name] = (impl, available)
    if prepare is not None:
        _PREPARE[name] = prepare


def available_backends() -> list[str]:
    return [name for name, (_, ok) in _BACKENDS.items() if ok()]


def set_backend(name: str) -> None:
    """Select a backend by name (``auto`` picks the most preferred available one)."""
    global _active, _logged
    if name == "auto":
        name = available_backends()[-1]
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; known: {', '.join(_BACKENDS)}")
    if not _BACKENDS[name][1]() and name in _PREPARE:
        _PREPARE[name]()
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
        describe = getattr(_BACKENDS[name][0], "describe", None)
        logger.info("megatron_tfree ops backend: %s%s", name, f" ({describe()})" if callable(describe) else "")
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


def tfree_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_offsets: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    pos_weight: float,
    loss_scale: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    chunk_size: int = reference.DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Scalar T-Free loss of the head ``hidden @ weight.T`` (fused where the backend has it); see
    :func:`reference.tfree_head_loss`."""
    fn = getattr(_impl(), "tfree_head_loss", reference.tfree_head_loss)
    return fn(hidden, weight, target_offsets, target_ids, weights, pos_weight, loss_scale, vocab_start, vocab_size,
              chunk_size)


def native_decode_scores(device: torch.device | str = "cpu") -> Callable[..., torch.Tensor] | None:
    """The active backend's ``decode_scores`` kernel for logits on ``device`` (see
    :func:`extension.decode_scores`), or None when it has none (then
    :class:`~megatron_tfree.tokenizer.dictionary.DecodeDictionary` scores in torch)."""
    kernel_for = getattr(_impl(), "decode_kernel", None)
    return kernel_for(device) if callable(kernel_for) else None


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar weighted-mean CE loss ``sum(w * ce) / sum(w)``; see :func:`reference.cross_entropy_loss`."""
    return _impl().cross_entropy_loss(logits, targets, weights)


def _register_cpp() -> None:
    from . import extension

    register_backend("cpp", extension, available=extension.is_available, prepare=extension.prepare)


_register_cpp()
