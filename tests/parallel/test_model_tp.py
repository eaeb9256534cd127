"""The full GPTModel at TP=2 against TP=1: same full weights, logits, loss, gradients, KV-cache decode."""

import pytest
import torch
from torch.testing import assert_close

from distributed import run_distributed
from megatron_tfree.config import ModelConfig
from megatron_tfree.data.batch import Batch
from megatron_tfree.model import GPTModel
from megatron_tfree.model.gpt import make_input_batch
from megatron_tfree.parallel import state
from megatron_tfree.parallel.init import LayoutError, full_weight, local_shard

V, B, S = 32, 2, 6


def _cfg(**kw):
    base = dict(hidden_size=16, num_layers=2, num_attention_heads=4, num_kv_heads=2, mlp_factor=2.66796875,
                loss_pos_weight=5.0, loss_scale=3.0, attention="sdpa")
    return ModelConfig(**{**base, **kw})


def _csr(rows):
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return offsets, torch.tensor([i for r in rows for i in r], dtype=torch.long)


def _batch(kind):
    g = torch.Generator().manual_seed(5)
    n = B * S
    if kind == "tfree":
        rows_in = [torch.randint(0, V, (int(torch.randint(1, 5, (), generator=g)),), generator=g).tolist() for _ in range(n)]
        rows_tg = [torch.randint(0, V, (int(torch.randint(1, 5, (), generator=g)),), generator=g).tolist() for _ in range(n)]
    else:
        rows_in = [[int(torch.randint(0, V, (), generator=g))] for _ in range(n)]
        rows_tg = [[int(torch.randint(0, V, (), generator=g))] for _ in range(n)]
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    weights = torch.ones(B, S)
    weights[1, -1] = 0.0
    return Batch(*_csr(rows_in), *_csr(rows_tg), pos, docs, weights)


def _decode(model, batch):
    """Logits of the last position decoded incrementally (prompt of S-1 positions, then one step)."""
    cache = model.new_kv_cache()
    ids_per_row = batch.input_offsets
    prompt_rows = [r for b in range(B) for r in range(b * S, b * S + S - 1)]
    step_rows = [b * S + S - 1 for b in range(B)]

    def sub(rows, lo, hi):
        parts = [batch.input_ids[ids_per_row[r]:ids_per_row[r + 1]] for r in rows]
        return make_input_batch(_csr([p.tolist() for p in parts])[0], torch.cat(parts),
                                batch.position_ids[:, lo:hi], batch.document_ids[:, lo:hi])

    model(sub(prompt_rows, 0, S - 1), kv_cache=cache)
    return model(sub(step_rows, S - 1, S), kv_cache=cache)


def _run(model, batch):
    model.zero_grad()
    logits = model(batch)
    loss = model.loss_from_logits(logits, batch)
    loss.backward()
    with torch.no_grad():
        decoded = _decode(model, batch)
    return logits.detach(), loss.detach(), decoded


def _check(rank, world, kind):
    # T-Free: SwiGLU inner size int(2.7 * 16) = 43, split unevenly (22 + 21); classic: 42 (21 + 21)
    cfg, batch = _cfg(mlp_factor=2.7 if kind == "tfree" else 2.66796875), _batch(kind)
    twin = GPTModel(cfg, kind, V, seed=11)
    t_logits, t_loss, t_dec = _run(twin, batch)
    twin_params = dict(twin.named_parameters())

    s = state.initialize(tp=world, pp=1)
    model = GPTModel(cfg, kind, V, seed=11)
    logits, loss, dec = _run(model, batch)
    assert logits.shape == (B, S, V // world)
    assert_close(logits, local_shard(t_logits, 2, s.tp, s.tp_rank))
    assert_close(model.gather_logits(logits), t_logits)
    assert_close(loss, t_loss)
    assert_close(model.gather_logits(dec), t_dec[:, -1:], atol=1e-5, rtol=1e-4)
    assert_close(t_dec[:, -1], t_logits[:, -1], atol=1e-5, rtol=1e-4)  # KV cache agrees with the full forward
    for name, p in model.named_parameters():
        tp_param = getattr(p, "tensor_model_parallel", False)
        assert tp_param == (p.ndim == 2), name  # every matrix is sharded, norm weights are replicated
        if tp_param:
            assert p.partition_full_size == twin_params[name].shape[p.partition_dim], name
            assert p.shape[p.partition_dim] < p.partition_full_size, name
        assert torch.equal(full_weight(p), twin_params[name].detach()), name  # layout-independent init
        assert_close(full_weight(p, p.grad), twin_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)

    assert model.blocks[0].mlp.down.in_per_rank == (22 - rank if kind == "tfree" else 21)
    with pytest.raises(LayoutError, match=r"model.num_attention_heads \(3\) is not divisible by parallel.tensor"):
        GPTModel(_cfg(num_attention_heads=3, num_kv_heads=0, hidden_size=24), kind, V, seed=0)
    key = "tokenizer.vocab_size" if kind == "tfree" else "tokenizer.classic_vocab_size"
    with pytest.raises(LayoutError, match=rf"{key} \(33\) is not divisible by parallel.tensor \(2\)"):
        GPTModel(cfg, kind, 33, seed=0)
    return True


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_tp2_equals_tp1(kind):
    assert run_distributed(_check, 2, args=(kind,)) == [True, True]


def _fill_biases(model, tp, tp_rank):
    """Give every bias a non-zero full value (seeded by its name); TP shards keep their part."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(".bias"):
                continue
            size = p.partition_full_size if getattr(p, "tensor_model_parallel", False) else p.shape[0]
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            full = torch.randn(size, generator=g) * 0.1
            if getattr(p, "tensor_model_parallel", False):
                full = local_shard(full, 0, tp, tp_rank, p.partition_stride)
            p.copy_(full)


def _check_bias(rank, world):
    cfg, batch = _cfg(mlp_factor=2.7, bias=True), _batch("tfree")
    twin = GPTModel(cfg, "tfree", V, seed=11)
    _fill_biases(twin, 1, 0)
    t_logits, t_loss, t_dec = _run(twin, batch)
    twin_params = dict(twin.named_parameters())
    assert sorted(n for n in twin_params if n.endswith(".bias")) == sorted(
        f"blocks.{i}.{m}.bias" for i in range(2) for m in ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.down"))

    s = state.initialize(tp=world, pp=1)
    model = GPTModel(cfg, "tfree", V, seed=11)
    _fill_biases(model, s.tp, s.tp_rank)
    logits, loss, dec = _run(model, batch)
    assert_close(model.gather_logits(logits), t_logits)
    assert_close(loss, t_loss)
    assert_close(model.gather_logits(dec), t_dec[:, -1:], atol=1e-5, rtol=1e-4)
    for name, p in model.named_parameters():
        assert torch.equal(full_weight(p), twin_params[name].detach()), name
        assert_close(full_weight(p, p.grad), twin_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert model.blocks[0].mlp.gate_up.bias.shape == (2 * (22 - rank),)  # split like the gate|up rows
    assert model.blocks[0].attention.dense.bias.shape == (16,)  # replicated, added once after the reduction
    return True


@pytest.mark.distributed
def test_tp2_with_biases_equals_tp1():
    assert run_distributed(_check_bias, 2) == [True, True]
