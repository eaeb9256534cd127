"""parallel.spawn.run_ranks: results by rank; a failing rank's traceback; a rank that dies without a result
(killed, or unable to start) fails the call at once instead of after the timeout."""

import os
import time

import pytest

from megatron_tfree.parallel.spawn import run_ranks


def _echo(rank, world, x):
    return rank * x


def _fails(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def _dies(rank, world):
    if rank == 1:
        os._exit(3)
    time.sleep(120)  # would keep the parent waiting without the liveness check


@pytest.mark.distributed
def test_results_errors_and_dead_ranks():
    assert run_ranks(_echo, 2, (5,), threads=1) == [0, 5]
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:(.|\n)*rank one is broken"):
        run_ranks(_fails, 2, threads=1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 2 exited with code 3 without a result"):
        run_ranks(_dies, 2, timeout=100, threads=1)
    assert time.monotonic() - start < 30
