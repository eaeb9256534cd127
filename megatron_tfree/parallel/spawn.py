"""Distributed process lifecycle on one machine: a free port, a clean teardown, and running a
function in N fresh gloo processes (tests, checkpoint conversion, CPU tools).

    results = run_ranks(fn, world=4, args=(cfg,))     # [fn(0, 4, cfg), ..., fn(3, 4, cfg)]

``fn`` must be importable by module name (it is pickled into spawned processes). Each worker sets the
rendezvous environment (127.0.0.1, a free port, RANK/WORLD_SIZE/LOCAL_RANK), hides GPUs, uses
``threads`` torch threads (default: the cores divided among the ranks), initialises gloo, runs
``fn(rank, world, *args)`` and tears down as the CPU stack needs (:func:`teardown`). A failing rank
fails the call with its traceback; no rank is left hanging.
"""

from __future__ import annotations

import gc
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown(barrier: bool = True) -> None:
    """End a distributed run cleanly: barrier, forget the parallel groups, gc (the caller has dropped
    its engine/optimizer references), destroy the process group. Without this torch's gloo can abort
    the process at interpreter exit (SIGABRT) after the run. ``barrier=False`` after an error (a
    peer may be gone)."""
    from . import state

    if barrier and dist.is_available() and dist.is_initialized():
        dist.barrier()
    state.destroy()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, threads: int, fn: Callable, args: Sequence[Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(threads)
    ok = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, True, fn(rank, world, *args)))
        ok = True
    except BaseException:  # report, never hang the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            teardown(barrier=ok)
        except Exception:
            pass


def run_ranks(fn: Callable, world: int, args: Sequence[Any] = (), timeout: float = 3600.0,
              threads: Optional[int] = None, what: str = "distributed run") -> list[Any]:
    """``[fn(r, world, *args) for r in range(world)]``, each rank in its own spawned gloo process.
    Raises RuntimeError naming ``what`` and carrying the failing rank's traceback."""
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, threads, fn, tuple(args), queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, ok, value = queue.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:  # a rank may have posted its result and exited since the get: read the queue once more
                    try:
                        rank, ok, value = queue.get(timeout=1.0)
                    except queue_module.Empty:
                        pass
                    else:
                        if not ok:
                            raise RuntimeError(f"{what}: rank {rank} of {world} failed:\n{value}") from None
                        results[rank] = value
                        continue
                if dead:  # died without reporting (killed, or could not even start): do not wait for the timeout
                    raise RuntimeError(f"{what}: rank {dead[0]} of {world} exited with code {procs[dead[0]].exitcode} "
                                       f"without a result (see its output above)") from None
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{what}: no result from ranks {sorted(set(range(world)) - set(results))} "
                                       f"within {timeout:.0f} s") from None
                continue
            if not ok:
                raise RuntimeError(f"{what}: rank {rank} of {world} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30 if len(results) == world else 5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
