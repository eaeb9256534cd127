"""Column/row-parallel linears at TP=2 against their single-process twins: weights, outputs, grads."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from distributed import run_distributed
from megatron_tfree.parallel import state
from megatron_tfree.parallel.init import LayoutError, full_weight, local_shard
from megatron_tfree.parallel.layers import ColumnParallelLinear, RowParallelLinear


def _init(w):
    torch.nn.init.normal_(w, std=0.5)


def _build(cls, *args, **kw):
    torch.manual_seed(7)
    return cls(*args, _init, **kw)


def _swiglu(gate_up, down, x):
    gate, up = gate_up(x).chunk(2, -1)
    return down(F.silu(gate) * up)


def _run(layer_fn, x, up):
    """Output, input grad and weight grad(s) of ``layer_fn(x)`` under the upstream gradient ``up``."""
    x = x.clone().requires_grad_()
    y = layer_fn(x)
    (y * up).sum().backward()
    return y.detach(), x.grad


def _check(rank, world):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)
    up12 = torch.randn(2, 3, 12, generator=g)
    up8 = torch.randn(2, 3, 8, generator=g)
    # single-process twins (built before the TP groups exist: plain layers)
    twins = {}
    for name, cls, args, kw, up in (
        ("col", ColumnParallelLinear, (8, 12), {}, up12),
        ("col_gather", ColumnParallelLinear, (8, 12), {"gather_output": True}, up12),
        ("col_stride", ColumnParallelLinear, (8, 12), {"gather_output": True, "stride": 2}, up12),
        ("row_split", RowParallelLinear, (12, 8), {"input_is_parallel": False}, up8),
    ):
        layer = _build(cls, *args, **kw)
        inp = x if cls is ColumnParallelLinear else torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(1))
        y, gx = _run(layer, inp, up)
        twins[name] = (layer.weight.detach().clone(), layer.weight.grad.clone(), y, gx, inp)
    # twins of a SwiGLU MLP: gate|up (stride 2) then down; inner size 6 (even split) and 5 (uneven: 3 + 2)
    mlp_twins = {}
    for ffn in (6, 5):
        torch.manual_seed(3)
        gu, down = ColumnParallelLinear(8, 2 * ffn, _init, stride=2), RowParallelLinear(ffn, 8, _init)
        y_mlp, gx_mlp = _run(lambda t: _swiglu(gu, down, t), x, up8)
        mlp_twins[ffn] = (gu.weight.detach().clone(), gu.weight.grad.clone(), down.weight.detach().clone(),
                          down.weight.grad.clone(), y_mlp, gx_mlp)

    s = state.initialize(tp=world, pp=1)
    r, tp = s.tp_rank, s.tp
    for name, (w, gw, y, gx, inp) in twins.items():
        if name.startswith("col"):
            stride = 2 if name == "col_stride" else 1
            layer = _build(ColumnParallelLinear, 8, 12, gather_output=name != "col", stride=stride)
            assert layer.weight.shape == (12 // tp, 8)
            assert_close(layer.weight.detach(), local_shard(w, 0, tp, r, stride))  # layout-independent init
            y_p, gx_p = _run(layer, inp, up12 if name != "col" else local_shard(up12, 2, tp, r))
            assert_close(y_p, y if name != "col" else local_shard(y, 2, tp, r))
            assert_close(layer.weight.grad, local_shard(gw, 0, tp, r, stride))
            assert (layer.weight.tensor_model_parallel, layer.weight.model_parallel, layer.weight.partition_dim) == (True, True, 0)
        else:
            layer = _build(RowParallelLinear, 12, 8, input_is_parallel=False)
            assert_close(layer.weight.detach(), local_shard(w, 1, tp, r))
            y_p, gx_p = _run(layer, inp, up8)
            assert_close(y_p, y)
            assert_close(layer.weight.grad, local_shard(gw, 1, tp, r))
            assert layer.weight.partition_dim == 1 and layer.weight.tensor_model_parallel
        assert_close(gx_p, gx)  # replicated input: the full input gradient on every rank

    # SwiGLU: each rank holds its slice of gate AND of up, aligned with its rows of down
    for ffn, (w_gu, g_gu, w_down, g_down, y_mlp, gx_mlp) in mlp_twins.items():
        torch.manual_seed(3)
        gu, down = ColumnParallelLinear(8, 2 * ffn, _init, stride=2), RowParallelLinear(ffn, 8, _init)
        part = slice(0, 3) if (ffn == 5 and r == 0) else slice(3, 5) if ffn == 5 else slice(r * 3, r * 3 + 3)
        assert_close(gu.weight.detach(), torch.cat([w_gu[:ffn][part], w_gu[ffn:][part]]))
        assert_close(down.weight.detach(), w_down[:, part])
        y_p, gx_p = _run(lambda t: _swiglu(gu, down, t), x, up8)
        assert_close(y_p, y_mlp)
        assert_close(gx_p, gx_mlp)
        assert_close(gu.weight.grad, torch.cat([g_gu[:ffn][part], g_gu[ffn:][part]]))
        assert_close(down.weight.grad, g_down[:, part])
        assert torch.equal(full_weight(gu.weight), w_gu) and torch.equal(full_weight(down.weight), w_down)
        assert_close(full_weight(gu.weight, gu.weight.grad), g_gu)

    with pytest.raises(LayoutError, match=r"output features \(10\) is not divisible by parallel.tensor \(2\) \* stride"):
        ColumnParallelLinear(8, 10, _init, stride=2, gather_output=True)
    with pytest.raises(LayoutError, match=r"model.mlp_factor .*\(7\) is not divisible by parallel.tensor \(2\)"):
        RowParallelLinear(7, 8, _init, input_is_parallel=False, name="model.mlp_factor inner size")
    return True


@pytest.mark.distributed
def test_parallel_linears_match_single_process_twins():
    assert run_distributed(_check, 2) == [True, True]


def test_plain_at_tp1_matches_nn_linear():
    torch.manual_seed(5)
    layer = ColumnParallelLinear(4, 6, _init)
    ref = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
    x = torch.randn(3, 4)
    assert torch.equal(layer(x), ref(x)) and list(layer.state_dict()) == ["weight"]
