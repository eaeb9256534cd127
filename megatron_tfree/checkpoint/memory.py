"""Keeping a streaming conversion's memory near one tensor (Linux; elsewhere these do nothing).

* :func:`release_file_pages`: checkpoint files are memory-mapped (``torch.load(mmap=True)``); every page
  of a tensor that was read stays resident (and counts in the process's RSS) until the whole file is
  unmapped. Once a tensor has been copied or written, its pages are reclaimed with
  ``madvise(MADV_PAGEOUT)`` (Linux 5.4+; older kernels keep them): clean pages are dropped and read
  again from the file if touched later; pages a consumer wrote to (private copies) are never discarded.
  The range is first checked against ``/proc/self/maps``: only file mappings are advised.
* :func:`return_freed_memory`: glibc serves blocks below its (adaptive, up to 32 MB) mmap threshold
  from heaps that are seldom given back; converting tensor after tensor then grows the heap. A fixed
  1 MB threshold returns every large buffer to the OS when it is freed. Set by the conversion tools.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from functools import lru_cache
from typing import Optional

import torch

MADV_PAGEOUT = 21
M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _file_mapping_covers(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies in one private, file-backed mapping of this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, _, hi = fields[0].partition("-")
            if int(lo, 16) <= start and end <= int(hi, 16):
                perms, inode = fields[1], fields[4]
                return inode != "0" and perms[3] == "p" and len(fields) > 5
    return False


def release_file_pages(t: torch.Tensor) -> bool:
    """Drop the resident pages of ``t``'s bytes if they belong to a memory-mapped file (see the module
    docstring); returns whether it did. The tensor stays valid, in-place changes included (clean pages
    are re-read on access)."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return False
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = (start + page - 1) // page * page, end // page * page
    if hi <= lo or not _file_mapping_covers(start, end):
        return False
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_PAGEOUT) == 0


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Fix glibc's mmap threshold (see the module docstring) for this process."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
