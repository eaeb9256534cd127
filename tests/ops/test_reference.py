"""The reference sparse ops against dense, obviously-correct formulations."""

import logging

import pytest
import torch
import torch.nn.functional as F

from megatron_tfree import ops
from megatron_tfree.ops import reference


def csr(rows):
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in rows], dtype=torch.long), 0)
    ids = torch.tensor([i for r in rows for i in r], dtype=torch.long)
    return offsets, ids


def dense_counts(rows, v, vocab_start=0):
    """[N, v_local] count matrix: entry (n, j) = occurrences of id vocab_start + j in row n."""
    m = torch.zeros(len(rows), v)
    for n, r in enumerate(rows):
        for i in r:
            if vocab_start <= i < vocab_start + v:
                m[n, i - vocab_start] += 1
    return m


ROWS = [[1, 4, 4, 7], [], [0], [9, 2, 2, 2], [], [5, 3]]  # empty rows, repeated ids


@pytest.mark.parametrize("vocab_start,v_local", [(0, 10), (3, 4)])  # whole vocab; one shard (ids 3..6)
def test_embedding_bag_matches_dense_forward_and_grad(vocab_start, v_local):
    torch.manual_seed(0)
    offsets, ids = csr(ROWS)
    w = torch.randn(v_local, 5, dtype=torch.float64, requires_grad=True)
    w_dense = w.detach().clone().requires_grad_(True)

    out = ops.embedding_bag(w, offsets, ids, vocab_start=vocab_start)
    ref = dense_counts(ROWS, v_local, vocab_start).double() @ w_dense
    torch.testing.assert_close(out, ref)
    assert out.shape == (len(ROWS), 5)
    assert torch.all(out[1] == 0) and torch.all(out[4] == 0)  # empty rows

    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(w.grad, w_dense.grad)


def test_embedding_bag_repeated_id_counts_each_time_and_int32_ids():
    w = torch.randn(4, 3)
    offsets, ids = csr([[2, 2, 2]])
    out = ops.embedding_bag(w, offsets, ids.int())
    torch.testing.assert_close(out[0], 3 * w[2])


def test_embedding_bag_all_ids_out_of_shard_and_empty_input():
    w = torch.randn(4, 3, requires_grad=True)
    offsets, ids = csr([[10, 11], [12]])
    out = ops.embedding_bag(w, offsets, ids, vocab_start=0)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(w.grad == 0)
    offsets, ids = csr([[], []])
    assert torch.all(ops.embedding_bag(w, offsets, ids) == 0)


def test_embedding_bag_bf16():
    w = torch.randn(10, 4)
    offsets, ids = csr(ROWS)
    out = ops.embedding_bag(w.bfloat16(), offsets, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_counts(ROWS, 10) @ w, atol=0.05, rtol=0.02)


def test_multi_hot_clamps_to_one():
    offsets, ids = csr([[1, 1, 3], [], [0]])
    m = reference.multi_hot(offsets, ids, 4)
    assert m.tolist() == [[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_tfree_bce_loss_matches_dense_formula():
    torch.manual_seed(0)
    v = 10
    offsets, ids = csr(ROWS)  # row 0 has a repeated target id -> still 1 in the multi-hot
    n = len(ROWS)
    logits = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    logits_d = logits.detach().clone().requires_grad_(True)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 1.0])

    loss = ops.tfree_bce_loss(logits, offsets, ids, weights, pos_weight=7.0, loss_scale=3.0)
    target = dense_counts(ROWS, v).clamp(max=1).double()
    per = F.binary_cross_entropy_with_logits(logits_d, target, pos_weight=torch.full((v,), 7.0, dtype=torch.float64),
                                             reduction="none")
    ref = 3.0 * (per * weights[:, None].double()).sum() / (n * v)  # spec: mean over N*v
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32

    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, logits_d.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(logits.grad[1] == 0)  # weight 0 row gets no gradient


def test_tfree_bce_loss_padding_counts_in_denominator():
    """Spec: mean over N*v, so appending a zero-weight row scales the loss by N/(N+1)."""
    torch.manual_seed(1)
    offsets, ids = csr([[1, 2], [3]])
    logits = torch.randn(2, 5)
    base = ops.tfree_bce_loss(logits, offsets, ids, torch.ones(2), 2.0, 1.0)
    offsets_p, ids_p = csr([[1, 2], [3], []])
    padded = ops.tfree_bce_loss(torch.cat([logits, torch.randn(1, 5)]), offsets_p, ids_p,
                                torch.tensor([1.0, 1.0, 0.0]), 2.0, 1.0)
    torch.testing.assert_close(padded, base * 2 / 3)


def test_cross_entropy_loss_weighted_mean_and_padding_invariance():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    targets = torch.tensor([1, 5, -100, 2])  # invalid id at a zero-weight position is ignored
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0])
    loss = ops.cross_entropy_loss(logits, targets, weights)
    per = F.cross_entropy(logits[[0, 1, 3]], targets[[0, 1, 3]], reduction="none")
    ref = (per * torch.tensor([1.0, 2.0, 1.0])).sum() / 4.0
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert torch.all(logits.grad[2] == 0)
    # padding does not change the value of real positions
    unpadded = ops.cross_entropy_loss(logits[[0, 1, 3]], targets[[0, 1, 3]], weights[[0, 1, 3]])
    torch.testing.assert_close(loss, unpadded)
    # all-zero weights: a finite zero with a zero gradient
    z = ops.cross_entropy_loss(logits, targets.clamp(min=0), torch.zeros(4))
    assert z.item() == 0.0


def test_backend_selection_and_log_once(caplog, monkeypatch):
    assert "reference" in ops.available_backends()
    ops.set_backend("reference")
    monkeypatch.setattr(ops, "_logged", False)
    with caplog.at_level(logging.INFO, logger="megatron_tfree"):
        offsets, ids = csr([[0]])
        ops.embedding_bag(torch.ones(1, 2), offsets, ids)
        ops.embedding_bag(torch.ones(1, 2), offsets, ids)
    msgs = [r.getMessage() for r in caplog.records if "ops backend" in r.getMessage()]
    assert msgs == ["megatron_tfree ops backend: reference"]
    assert ops.backend_name() == "reference"
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.set_backend("nope")
    with pytest.raises(ValueError, match="lacks ops"):
        ops.register_backend("broken", object())
