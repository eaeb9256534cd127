"""Vocab-parallel embedding-bag, T-Free BCE, cross-entropy and logit gathering at TP=2 vs one process."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from distributed import run_distributed
from megatron_tfree import ops
from megatron_tfree.parallel import state, vocab
from megatron_tfree.parallel.init import LayoutError, local_shard, vocab_range

V, H, N = 8, 4, 6


def _inputs():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g)
    offsets = torch.tensor([0, 3, 3, 5, 9, 10, 12])  # an empty row; repeated ids (row 3: 1, 1)
    ids = torch.tensor([0, 5, 7, 2, 3, 1, 1, 6, 4, 7, 0, 3])
    up = torch.randn(N, H, generator=g)
    logits = torch.randn(N, V, generator=g)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 2.0])
    classes = torch.tensor([3, 99, 7, 0, 4, 6])  # 99 at a weight-0 position: ignored
    return weight, offsets, ids, up, logits, weights, classes


def _value_and_grads(fn, *leaves):
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum() if out.dim() else out, leaves)
    return out.detach(), grads


def _check(rank, world):
    weight, offsets, ids, up, logits, weights, classes = _inputs()
    emb_bag = lambda w: (ops.embedding_bag(w, offsets, ids) * up)  # noqa: E731
    emb_cls = lambda w: (F.embedding(classes.clamp_max(V - 1), w) * up)  # noqa: E731
    bce = lambda z: ops.tfree_bce_loss(z, offsets, ids, weights, 3.0, 2.0)  # noqa: E731
    ce = lambda z: ops.cross_entropy_loss(z, classes, weights)  # noqa: E731
    twins = {name: _value_and_grads(fn, t) for name, fn, t in
             (("bag", emb_bag, weight), ("cls", emb_cls, weight), ("bce", bce, logits), ("ce", ce, logits))}
    # the CE twin agrees with torch's own weighted cross-entropy
    keep = weights > 0
    ref = (F.cross_entropy(logits[keep], classes[keep], reduction="none") * weights[keep]).sum() / weights.sum()
    assert_close(twins["ce"][0], ref)

    s = state.initialize(tp=world, pp=1)
    start, end = vocab_range(V)
    assert (start, end) == (rank * V // world, (rank + 1) * V // world)
    shard = lambda t, dim: local_shard(t, dim, s.tp, s.tp_rank)  # noqa: E731

    y, (gw,) = _value_and_grads(lambda w: vocab.embedding_bag(w, offsets, ids, start) * up, shard(weight, 0))
    assert_close(y, twins["bag"][0])
    assert_close(gw, shard(twins["bag"][1][0], 0))
    y, (gw,) = _value_and_grads(lambda w: vocab.embedding(w, classes.clamp_max(V - 1), start) * up, shard(weight, 0))
    assert_close(y, twins["cls"][0])
    assert_close(gw, shard(twins["cls"][1][0], 0))

    loss, (gz,) = _value_and_grads(lambda z: vocab.tfree_bce_loss(z, offsets, ids, weights, 3.0, 2.0, start, V),
                                   shard(logits, 1))
    assert_close(loss, twins["bce"][0])
    assert_close(gz, shard(twins["bce"][1][0], 1))

    # the fused head + loss: hidden replicated, head rows sharded; chunk 3 < v/tp splits each shard
    hidden = up.clone()
    twin, (gh1, gw1) = _value_and_grads(lambda x, w: bce(x @ w.t()), hidden, weight)
    loss, (gh, gw) = _value_and_grads(
        lambda x, w: vocab.tfree_head_loss(x, w, offsets, ids, weights, 3.0, 2.0, start, V, chunk_size=3),
        hidden, shard(weight, 0))
    assert_close(loss, twin)
    assert_close(gh, gh1)  # the replicated input's gradient is the sum over the shards
    assert_close(gw, shard(gw1, 0))

    loss, (gz,) = _value_and_grads(lambda z: vocab.cross_entropy(z, classes, weights, start), shard(logits, 1))
    assert_close(loss, twins["ce"][0])
    assert_close(gz, shard(twins["ce"][1][0], 1))
    # large logits stay finite (max subtraction is global)
    loss = vocab.cross_entropy(shard(logits, 1) * 1e3, classes, weights, start)
    assert torch.isfinite(loss)

    full, (gz,) = _value_and_grads(lambda z: vocab.gather_logits(z) * torch.arange(V), shard(logits, 1))
    assert_close(full, logits * torch.arange(V))
    assert_close(gz, shard(torch.arange(V, dtype=torch.float32).expand(N, V), 1))

    with pytest.raises(LayoutError, match=r"tokenizer.vocab_size \(9\) is not divisible by parallel.tensor \(2\)"):
        vocab_range(9)
    return True


@pytest.mark.distributed
def test_vocab_parallel_ops_match_single_process():
    assert run_distributed(_check, 2) == [True, True]


def test_local_targets_restrict_and_shift():
    offsets, ids = torch.tensor([0, 3, 3, 5]), torch.tensor([0, 5, 7, 2, 4])
    lo, li = vocab.local_targets(offsets, ids, vocab_start=4, v_local=4)
    assert lo.tolist() == [0, 2, 2, 3] and li.tolist() == [1, 3, 0]


def test_trivial_layout_is_the_plain_op():
    weight, offsets, ids, up, logits, weights, classes = _inputs()
    assert torch.equal(vocab.embedding_bag(weight, offsets, ids), ops.embedding_bag(weight, offsets, ids))
    assert torch.equal(vocab.tfree_bce_loss(logits, offsets, ids, weights, 3.0, 2.0),
                       ops.tfree_bce_loss(logits, offsets, ids, weights, 3.0, 2.0))
    assert torch.equal(vocab.cross_entropy(logits, classes, weights), ops.cross_entropy_loss(logits, classes, weights))
    assert vocab.gather_logits(logits) is logits
