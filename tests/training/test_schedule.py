"""LR schedule: linear warm-up, cosine/linear/constant decay to min_lr, decay iters, skip and state."""

import math

import pytest
import torch

from megatron_tfree.config import TrainingConfig
from megatron_tfree.training.engine import GuardedAdamW
from megatron_tfree.training.schedule import WarmupDecayLR, decay_iters, lr_at


def tcfg(**kw):
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=4, train_iterations=20, lr_decay_style="cosine")
    base.update(kw)
    return TrainingConfig(**base)


def test_warmup_is_linear_and_never_zero():
    t = tcfg()
    assert [lr_at(i, t) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, t) == pytest.approx(1.0)  # decay starts at the peak


def test_cosine_reaches_min_lr_at_decay_iters_and_stays():
    t = tcfg()
    assert decay_iters(t) == 20
    mid = 4 + (20 - 4) // 2
    assert lr_at(mid, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, t) == pytest.approx(0.1)
    assert lr_at(100, t) == pytest.approx(0.1)
    values = [lr_at(i, t) for i in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_lr_decay_iters_overrides_train_iterations():
    t = tcfg(lr_decay_iters=10)
    assert decay_iters(t) == 10
    assert lr_at(10, t) == pytest.approx(0.1)
    assert lr_at(9, t) > 0.1


def test_linear_and_constant_styles():
    lin = tcfg(lr_decay_style="linear", warmup_steps=0, train_iterations=10)
    assert [lr_at(i, lin) for i in (0, 5, 10, 11)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    const = tcfg(lr_decay_style="constant")
    assert [lr_at(i, const) for i in (3, 4, 20, 50)] == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_scheduler_sets_groups_skips_vetoed_steps_and_round_trips_state():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = GuardedAdamW([{"params": [p]}], lr=123.0)
    sched = WarmupDecayLR(opt, tcfg())
    assert sched.get_last_lr() == pytest.approx([0.25])
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5])
    opt.skip_next = True  # a vetoed update does not advance the schedule
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5])
    opt.skip_next = False
    sched.step()
    state = sched.state_dict()
    assert state == {"num_updates": 2}
    other = WarmupDecayLR(GuardedAdamW([p], lr=1.0), tcfg())
    other.load_state_dict(state)
    assert other.get_last_lr() == pytest.approx([0.75])


def test_guarded_adamw_step_veto_leaves_params_and_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.ones(3)
    opt.skip_next = True
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
    opt.skip_next = False
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))
