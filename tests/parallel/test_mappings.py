"""Autograd collectives over the TP group: forward and backward against hand-computed expectations."""

import pytest
import torch
from torch.testing import assert_close

from distributed import run_distributed
from megatron_tfree.parallel import mappings as m
from megatron_tfree.parallel import state


def _data(world, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(world)]


def _check_all(rank, world):
    state.initialize(tp=world, pp=1)
    xs, cs = _data(world, (2, 4, 6), 1), _data(world, (2, 4, 6), 2)

    # copy_to_tp: identity forward, all-reduce backward
    x = xs[rank].clone().requires_grad_()
    y = m.copy_to_tp(x)
    assert_close(y, xs[rank])
    (y * cs[rank]).sum().backward()
    assert_close(x.grad, sum(cs))

    # reduce_from_tp: all-reduce forward, identity backward
    x = xs[rank].clone().requires_grad_()
    y = m.reduce_from_tp(x)
    assert_close(y, sum(xs))
    (y * cs[rank]).sum().backward()
    assert_close(x.grad, cs[rank])

    # scatter / gather along the last dim (same full x on every rank)
    full = xs[0].clone().requires_grad_()
    part = m.scatter_to_tp(full)
    assert_close(part, xs[0].chunk(world, -1)[rank])
    (part * cs[rank].chunk(world, -1)[rank]).sum().backward()
    assert_close(full.grad, torch.cat([c.chunk(world, -1)[r] for r, c in enumerate(cs)], -1))  # all-gather
    x = xs[rank].clone().requires_grad_()
    y = m.gather_from_tp(x)
    assert_close(y, torch.cat(xs, -1))
    (y * torch.cat(cs, -1)).sum().backward()
    assert_close(x.grad, cs[rank])

    # sequence parallel: the sequence is dim 1 of [B, S, h]
    x = xs[rank].clone().requires_grad_()
    y = m.gather_from_sp(x)
    assert_close(y, torch.cat(xs, 1))
    up = _data(world, (2, 4 * world, 6), 3)  # a different upstream gradient per rank
    (y * up[rank]).sum().backward()
    assert_close(x.grad, sum(up).chunk(world, 1)[rank])  # reduce-scatter

    x = xs[rank].clone().requires_grad_()
    y = m.reduce_scatter_to_sp(x)
    assert_close(y, sum(xs).chunk(world, 1)[rank])
    small = _data(world, (2, 4 // world, 6), 4)
    (y * small[rank]).sum().backward()
    assert_close(x.grad, torch.cat(small, 1))  # all-gather

    full = xs[0].clone().requires_grad_()
    y = m.scatter_to_sp(full)
    assert_close(y, xs[0].chunk(world, 1)[rank])
    (y * small[rank]).sum().backward()
    assert_close(full.grad, torch.cat(small, 1))

    with pytest.raises(ValueError, match="not divisible by parallel.tensor"):
        m.split_along(torch.zeros(3, 5), 1)
    return True


@pytest.mark.distributed
def test_collectives_forward_and_backward():
    assert run_distributed(_check_all, 2) == [True, True]


def test_noops_without_tensor_parallelism():
    assert state.get().tp == 1
    x = torch.randn(2, 4, 6, requires_grad=True)
    for fn in (m.copy_to_tp, m.reduce_from_tp, m.scatter_to_tp, m.gather_from_tp,
               m.scatter_to_sp, m.gather_from_sp, m.reduce_scatter_to_sp):
        assert fn(x) is x
