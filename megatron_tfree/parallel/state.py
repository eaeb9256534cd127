"""Process groups of a (TP, PP, DP) layout and the ``mpu`` interface DeepSpeed expects.

Rank order (the same as DeepSpeed's ``PipeModelDataParallelTopology`` with axes pipe, data, model
and as Megatron): tensor-parallel rank varies fastest, then data-parallel, then pipeline::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the TP peers of a rank are neighbours (one node, fast links) and a pipeline stage is a block of
``dp * tp`` consecutive ranks. ``initialize(tp, pp)`` builds every group once (all ranks must call
it, in the same order, after ``torch.distributed`` is initialised); ``get()`` returns the state.
Without ``initialize`` (single process, tests of single layers) :func:`get` gives the trivial
layout (1, 1, 1) with no groups, and every collective in :mod:`megatron_tfree.parallel` is a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch.distributed as dist


class LayoutError(ValueError):
    """The world size or the model does not fit the requested (TP, PP) layout."""


@dataclass(frozen=True)
class ParallelState:
    tp: int
    pp: int
    dp: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any = None  # ranks sharing one stage's tensor-parallel shards
    pp_group: Any = None  # ranks of one pipeline (one per stage), same tp/dp rank
    dp_group: Any = None  # ranks holding the same shard of the same stage
    mp_group: Any = None  # tp x pp: one model replica
    tp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # ---------------------------------------------------------------- the mpu interface (DeepSpeed)
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self) -> Any:
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self) -> Any:
        return self.pp_group

    # DeepSpeed's "model parallel" is tensor parallel; Megatron spells the pipeline "pipeline_model"
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group


_TRIVIAL = ParallelState(tp=1, pp=1, dp=1, rank=0, tp_rank=0, pp_rank=0, dp_rank=0)
_STATE: Optional[ParallelState] = None


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def coords_of(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """``(tp_rank, dp_rank, pp_rank)`` of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def initialize(tp: int = 1, pp: int = 1, timeout: Optional[float] = None) -> ParallelState:
    """Create the TP/PP/DP/MP groups of the current world (every rank must call this); ``timeout``
    (seconds) bounds how long their collectives wait for a peer (default: torch's)."""
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before parallel.state.initialize")
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise LayoutError(f"world size {world} is not divisible by parallel.tensor ({tp}) x parallel.pipe ({pp})")
    dp = world // (tp * pp)
    tp_rank, dp_rank, pp_rank = coords_of(rank, tp, dp)
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    mine: dict[str, Any] = {}
    ranks_of: dict[str, tuple[int, ...]] = {}
    # dist.new_group is collective: every rank creates every group, in the same order. A group of
    # axis X holds the ranks that differ only in their X coordinate; "mp" (one model replica) the
    # ranks that share a dp coordinate.
    for axis in ("tp", "dp", "pp", "mp"):
        varying = ("tp", "pp") if axis == "mp" else (axis,)
        fixed = [a for a in ("tp", "dp", "pp") if a not in varying]
        for fixed_coords in itertools.product(*(range(sizes[a]) for a in fixed)):
            ranks = []
            for var_coords in itertools.product(*(range(sizes[a]) for a in varying)):
                c = {**dict(zip(fixed, fixed_coords)), **dict(zip(varying, var_coords))}
                ranks.append(rank_of(c["tp"], c["dp"], c["pp"], tp, dp))
            ranks = sorted(ranks)
            g = dist.new_group(ranks, timeout=timedelta(seconds=timeout) if timeout else None)
            if rank in ranks:
                mine[axis], ranks_of[axis] = g, tuple(ranks)
    _STATE = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
                           tp_group=mine["tp"], pp_group=mine["pp"], dp_group=mine["dp"], mp_group=mine["mp"],
                           tp_ranks=ranks_of["tp"], pp_ranks=ranks_of["pp"], dp_ranks=ranks_of["dp"])
    return _STATE


def get() -> ParallelState:
    """The current layout; (1, 1, 1) when :func:`initialize` was not called."""
    return _STATE if _STATE is not None else _TRIVIAL


def is_initialized() -> bool:
    return _STATE is not None


@contextlib.contextmanager
def single_process() -> Iterator[ParallelState]:
    """Within the block :func:`get` is the trivial layout, whatever this process's groups are: layers
    built there are whole (not TP shards), e.g. a full model read from a checkpoint on one rank."""
    global _STATE
    saved = _STATE
    _STATE = None
    try:
        yield _TRIVIAL
    finally:
        _STATE = saved


def destroy() -> None:
    """Forget the groups (call before ``dist.destroy_process_group``)."""
    global _STATE
    _STATE = None
