"""Measured memory of a training process: peak resident set size (CPU) and peak CUDA allocation (GPU).

* :func:`peak_rss_bytes`: the process's high-water mark of resident memory, ``VmHWM`` of
  ``/proc/self/status`` (Linux), else ``getrusage(RUSAGE_SELF).ru_maxrss``. Run in a process of its
  own (:mod:`.worker`), it is the peak of that arm's training alone.
* :func:`reset_peak_rss`: restart the high-water mark at the current RSS (Linux: ``5`` written to
  ``/proc/self/clear_refs``), for arms trained inside one process; False where the kernel refuses.
* :func:`cuda_peak_bytes`: ``torch.cuda.max_memory_allocated()`` since :func:`reset_cuda_peak`, None
  without CUDA.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

STATUS = "/proc/self/status"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (> 0)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int:
    """Resident memory of this process now, in bytes (the peak where the current value is not available)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS; whether the kernel allowed it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_bytes() -> Optional[int]:
    """``torch.cuda.max_memory_allocated()`` (bytes) since the last reset; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())
