"""The tests' N-process fixture: :func:`megatron_tfree.parallel.spawn.run_ranks` with one torch
thread per rank and a test-sized timeout.

    from distributed import run_distributed          # tests/ is on sys.path under pytest

    def body(rank, world, x):                         # module-level (it is pickled into the workers)
        ...
    results = run_distributed(body, world=2, args=(3,))   # [result of rank 0, result of rank 1]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from megatron_tfree.parallel.spawn import run_ranks


def run_distributed(fn: Callable, world: int, args: Sequence[Any] = (), timeout: float = 300.0) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process; a
    failing worker fails the call (AssertionError) with its traceback."""
    try:
        return run_ranks(fn, world, args, timeout=timeout, threads=1, what="distributed worker")
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


def train_rank(rank: int, world: int, cfg: Any) -> bool:
    """A rank body that trains ``cfg`` (module-level here, so spawned workers can import it)."""
    from megatron_tfree.training.loop import train

    train(cfg)
    return True
