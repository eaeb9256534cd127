"""The byte counter of benchmarks/scaling.py (benchmarks/comm_counter.py) counts exactly what it says:
payload bytes per call, by op kind and group kind, only while started, once per call; DeepSpeed's comm
layer goes through it. Behaviour only (no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from distributed import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _collectives(rank, world):
    import torch
    import torch.distributed as dist

    from comm_counter import CommCounter

    counter = CommCounter().install()
    try:
        x = torch.arange(10, dtype=torch.float32)
        dist.all_reduce(x)  # not started: not counted
        counter.start()
        dist.all_reduce(torch.ones(7, 3, dtype=torch.float32))  # 84 bytes
        dist.all_reduce(torch.ones(5, dtype=torch.float64))  # 40 bytes
        parts = [torch.empty(4, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(parts, torch.full((4,), rank, dtype=torch.int64))  # 32 bytes (own input)
        out = torch.empty(world * 6, dtype=torch.bfloat16)
        dist.all_gather_into_tensor(out, torch.ones(6, dtype=torch.bfloat16))  # 12 bytes
        dist.broadcast(torch.zeros(3, dtype=torch.float32), src=0)  # 12 bytes on both ranks
        if rank == 0:
            dist.send(torch.ones(9, dtype=torch.float32), dst=1)  # 36 bytes sent
        else:
            buf = torch.empty(9, dtype=torch.float32)
            dist.recv(buf, src=0)  # 36 bytes received
        pair = dist.new_group([0, 1])
        dist.all_reduce(torch.ones(2, dtype=torch.float32), group=pair)  # 8 bytes: all ranks, so "world"
        dist.barrier()
        # through DeepSpeed's comm layer (initialised after install: its captured all-gather is wrapped)
        counter.stop()  # (its initialisation makes calls of its own)
        import deepspeed.comm as ds_comm
        import deepspeed

        sys_mod = sys.modules["deepspeed.comm.torch"]
        sys_mod.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        counter.start()
        ds_comm.all_reduce(torch.ones(11, dtype=torch.float32))  # 44 bytes
        ds_comm.all_gather_into_tensor(torch.empty(world * 2), torch.ones(2))  # 8 bytes
        counter.stop()
        dist.all_reduce(torch.ones(100))  # stopped: not counted
        return counter.totals(), parts[1 - rank].tolist()
    finally:
        counter.uninstall()


@pytest.mark.distributed
def test_counts_exact_payload_bytes_per_op_and_group():
    results = run_distributed(_collectives, world=2)
    for rank, (totals, other) in enumerate(results):
        assert other == [1 - rank] * 4  # the wrapped collectives still work
        assert totals[("all_reduce", "world")] == {"calls": 4, "bytes": 84 + 40 + 8 + 44}
        assert totals[("all_gather", "world")] == {"calls": 1, "bytes": 32}
        assert totals[("all_gather_into_tensor", "world")] == {"calls": 2, "bytes": 12 + 8}
        assert totals[("broadcast", "world")] == {"calls": 1, "bytes": 12}
        assert totals[("barrier", "world")]["bytes"] == 0
        p2p = "send" if rank == 0 else "recv"
        assert totals[(p2p, "world")] == {"calls": 1, "bytes": 36}
        assert not any(op == ("recv" if rank == 0 else "send") for op, _ in totals)


def _layout_groups(rank, world):
    import torch
    import torch.distributed as dist

    from comm_counter import CommCounter
    from megatron_tfree.parallel import state
    from megatron_tfree.parallel.mappings import all_gather_along, all_reduce_along

    counter = CommCounter().install()
    try:
        s = state.initialize(tp=2, pp=2)  # world 4: tp 2, pp 2, dp 1
        counter.start()
        all_reduce_along(torch.ones(3, 4))  # 48 bytes over TP
        all_gather_along(torch.ones(2, 5), dim=1)  # 40 bytes over TP
        dist.all_reduce(torch.ones(6), group=s.pp_group)  # 24 bytes over PP
        dist.all_reduce(torch.ones(6), group=s.dp_group)  # dp = 1: a one-rank group, "solo"
        peer = s.pp_ranks[1 - s.pp_rank]
        t = torch.ones(16, dtype=torch.float16)
        if s.pp_rank == 0:
            dist.send(t, dst=peer)
        else:
            dist.recv(t, src=peer)
        counter.stop()
        return counter.totals(), counter.total_bytes(), s.pp_rank
    finally:
        counter.uninstall()


@pytest.mark.distributed
def test_group_kinds_follow_the_parallel_layout():
    for totals, total, pp_rank in run_distributed(_layout_groups, world=4):
        assert totals[("all_reduce", "TP")] == {"calls": 1, "bytes": 48}
        assert totals[("all_gather", "TP")] == {"calls": 1, "bytes": 40}
        assert totals[("all_reduce", "PP")] == {"calls": 1, "bytes": 24}
        assert totals[("all_reduce", "solo")] == {"calls": 1, "bytes": 24}
        assert totals[("send" if pp_rank == 0 else "recv", "PP")] == {"calls": 1, "bytes": 32}
        assert total == 48 + 40 + 24 + 32  # solo calls move nothing


def test_payload_bytes_of_a_batch_of_p2p_ops_and_nested_lists():
    import inspect

    import torch
    import torch.distributed as dist

    from comm_counter import payload_bytes, tensor_bytes

    assert tensor_bytes([torch.ones(3), [torch.ones(2, dtype=torch.int8)]]) == 14
    assert tensor_bytes(None) == 0

    class Op:  # the fields batch_isend_irecv reads from a P2POp
        def __init__(self, n):
            self.tensor, self.peer, self.group = torch.ones(n), 1, None

    bound = inspect.signature(dist.batch_isend_irecv).bind([Op(3), Op(5)])
    assert payload_bytes("batch_isend_irecv", bound) == 32
