"""The one way ``.pt`` files are read: ``torch.load(weights_only=True)``.

DeepSpeed pickles a few of its own classes into its checkpoints (loss scalers, the ZeRO stage enum,
fragment addresses); exactly those are allowed (:func:`deepspeed_safe_globals`), nothing else, so a
crafted checkpoint cannot run code. ``mmap=True`` maps the file instead of reading it: tensors are
views of the file, pages are read when touched, so a reader that takes one tensor at a time holds
little memory.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoint files pickle (empty without DeepSpeed installed)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # no guessing warning
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's checkpoint classes allowed; a file that
    cannot be read that way raises a ValueError naming it."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except OSError as e:  # permissions, a directory, an I/O error: not a format problem
        raise OSError(f"{path}: cannot be read: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError (a disallowed global), a truncated zip, ...
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
