"""Collectives on small host-side values (loss sums, counters, flags).

The training code keeps these in CPU tensors. gloo reduces CPU tensors directly; NCCL (the GPU backend)
only reduces tensors on this rank's GPU, so there the value travels to ``cuda:current_device`` and back.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a tensor must live for a collective over ``group`` (default: the world)."""
    if torch.cuda.is_available() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce the CPU tensor ``t`` in place over ``group`` (a no-op without torch.distributed);
    returns ``t``."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    device = collective_device(group)
    if device.type == "cpu":
        dist.all_reduce(t, op=op, group=group)
        return t
    on_device = t.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    t.copy_(on_device.cpu())
    return t
