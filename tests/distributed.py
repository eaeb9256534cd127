"""Run a function in N gloo processes on 127.0.0.1 and collect what each returns.

    from distributed import run_distributed          # tests/ is on sys.path under pytest

    def body(rank, world, x):                         # module-level (it is pickled into the workers)
        ...
        return something_picklable

    results = run_distributed(body, world=2, args=(3,))   # [result of rank 0, result of rank 1]

Each worker initialises ``torch.distributed`` (gloo, a free port), runs ``fn(rank, world, *args)``
with one torch thread, and tears down the way the CPU stack needs (barrier, forget the parallel
groups, gc, destroy the process group) so gloo does not abort at exit. An exception in any worker
fails the call with that worker's traceback.
"""

from __future__ import annotations

import gc
import os
import socket
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: Sequence[Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, True, result))
    except BaseException:  # report, never hang the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.barrier()
                from megatron_tfree.parallel import state

                state.destroy()
                gc.collect()
                dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn: Callable, world: int, args: Sequence[Any] = (), timeout: float = 300.0) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, tuple(args), queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
