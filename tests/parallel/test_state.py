"""Process groups: rank order (TP fastest, then DP, then PP) checked with real all-reduces."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_tfree.parallel import state


def _groups(rank, world, tp, pp):
    s = state.initialize(tp, pp)
    out = {"coords": (s.tp_rank, s.dp_rank, s.pp_rank), "dp_size": s.dp}
    for name in ("tp", "dp", "pp", "mp"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(s, f"{name}_group"))
        out[name] = float(t)
    out["mpu"] = (s.get_model_parallel_world_size(), s.get_data_parallel_world_size(),
                  s.get_pipe_parallel_world_size(), s.get_data_parallel_rank())
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp, world", [(2, 2, 8), (2, 1, 4), (1, 2, 4)])
def test_group_membership(tp, pp, world):
    dp = world // (tp * pp)
    results = run_distributed(_groups, world, args=(tp, pp))
    for rank, r in enumerate(results):
        t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        assert r["coords"] == (t, d, p) and r["dp_size"] == dp
        assert r["tp"] == sum(state.rank_of(i, d, p, tp, dp) for i in range(tp))
        assert r["dp"] == sum(state.rank_of(t, i, p, tp, dp) for i in range(dp))
        assert r["pp"] == sum(state.rank_of(t, d, i, tp, dp) for i in range(pp))
        assert r["mp"] == sum(state.rank_of(i, d, j, tp, dp) for i in range(tp) for j in range(pp))
        assert r["mpu"] == (tp, dp, pp, d)


def _bad_layout(rank, world):
    with pytest.raises(state.LayoutError, match="not divisible by parallel.tensor"):
        state.initialize(tp=3, pp=1)
    return True


@pytest.mark.distributed
def test_layout_must_divide_world():
    assert run_distributed(_bad_layout, 2) == [True, True]


def test_trivial_layout_without_initialize():
    s = state.get()
    assert (s.tp, s.pp, s.dp, s.world_size) == (1, 1, 1, 1) and s.is_first_stage and s.is_last_stage
    assert state.coords_of(13, tp=2, dp=3) == (1, 0, 2) and state.rank_of(1, 0, 2, tp=2, dp=3) == 13
