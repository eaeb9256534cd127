"""GPTModel behaviour on tiny shapes: both tokenizer kinds, block-causal packing, GQA, init, seeding,
KV-cache decoding, parameter groups, gradient flow and a short overfit."""

import math
import random

import pytest
import torch

from megatron_tfree import ops
from megatron_tfree.config import ModelConfig
from megatron_tfree.data.batch import Batch
from megatron_tfree.model import GPTModel, make_input_batch, mlp_inner_size, param_groups
from megatron_tfree.model import transformer as tr

V = 64


def cfg(**kw):
    base = dict(hidden_size=32, num_layers=2, num_attention_heads=4, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def positions_from_docs(document_ids):
    """Positions restart at 0 where the document id changes (and at the start of every row)."""
    pos = torch.zeros_like(document_ids)
    for b in range(document_ids.shape[0]):
        for s in range(1, document_ids.shape[1]):
            pos[b, s] = 0 if document_ids[b, s] != document_ids[b, s - 1] else pos[b, s - 1] + 1
    return pos


def csr(rows):
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in rows], dtype=torch.long), 0)
    return offsets, torch.tensor([i for r in rows for i in r], dtype=torch.long)


def batch_from_rows(inputs, targets, document_ids=None, weights=None):
    """inputs/targets: [B][S] lists of id lists."""
    B, S = len(inputs), len(inputs[0])
    in_off, in_ids = csr([r for row in inputs for r in row])
    tg_off, tg_ids = csr([r for row in targets for r in row])
    docs = torch.zeros(B, S, dtype=torch.long) if document_ids is None else torch.as_tensor(document_ids)
    return Batch(in_off, in_ids, tg_off, tg_ids, positions_from_docs(docs), docs,
                 torch.ones(B, S) if weights is None else torch.as_tensor(weights, dtype=torch.float32))


def random_rows(B, S, kind, rng):
    n = (lambda: 1) if kind == "classic" else (lambda: rng.randint(1, 4))
    return [[[rng.randrange(V) for _ in range(n())] for _ in range(S)] for _ in range(B)]


def random_batch(B, S, kind, seed=0, document_ids=None):
    rng = random.Random(seed)
    return batch_from_rows(random_rows(B, S, kind, rng), random_rows(B, S, kind, rng), document_ids)


@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_shapes_and_finite_loss(kind):
    model = GPTModel(cfg(), kind, V, seed=0)
    batch = random_batch(2, 5, kind)
    logits = model(batch)
    assert logits.shape == (2, 5, V)
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, model.loss_from_logits(logits, batch))
    assert len(model.layers()) == 2 + 2 and model.layers()[1] is model.blocks[0]


def test_tfree_embedding_is_sum_of_rows_and_losses_use_config():
    model = GPTModel(cfg(loss_pos_weight=5.0, loss_scale=2.0), "tfree", V, seed=0)
    batch = batch_from_rows([[[1, 2, 2], [3]]], [[[4, 5], [6]]])
    E = model.embedding.weight
    emb = model.embedding(batch)
    torch.testing.assert_close(emb[0, 0], E[1] + 2 * E[2])
    torch.testing.assert_close(emb[0, 1], E[3])
    logits = model(batch)
    ref = ops.tfree_bce_loss(logits.view(2, V), batch.target_offsets, batch.target_ids, torch.ones(2), 5.0, 2.0)
    torch.testing.assert_close(model.loss_from_logits(logits, batch), ref)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_fused_head_loss_equals_the_logits_path(backend, request):
    """model.fused_head_loss (the default) gives the loss and every gradient of the unfused model."""
    if backend not in ops.available_backends():
        pytest.skip("the C++ ops are not built")
    previous = ops.backend_name()
    ops.set_backend(backend)
    request.addfinalizer(lambda: ops.set_backend(previous))
    batch = random_batch(2, 6, "tfree", seed=3, document_ids=[[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    batch.loss_weights[1, 4:] = 0.0  # padding
    results = {}
    for fused in (True, False):
        model = GPTModel(cfg(fused_head_loss=fused, head_chunk_size=7, loss_pos_weight=30.0, loss_scale=10.0), "tfree",
                         V, seed=0)
        assert model.output.fuses_loss is fused
        loss = model(batch, return_loss=True)
        assert loss.dtype == torch.float32 and loss.ndim == 0
        loss.backward()
        results[fused] = (loss.detach(), model.loss_from_logits(model(batch), batch).detach(),
                          {k: p.grad.clone() for k, p in model.named_parameters()})
    (fl, fl_logits, fg), (ul, ul_logits, ug) = results[True], results[False]
    torch.testing.assert_close(fl, ul, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fl_logits, ul_logits, rtol=0, atol=0)  # evaluation still forms the logits
    assert fg.keys() == ug.keys()
    for k in fg:
        torch.testing.assert_close(fg[k], ug[k], rtol=1e-4, atol=1e-5 * float(ug[k].abs().max()))  # rounding
    assert model.loss(batch).item() == pytest.approx(float(ul), rel=1e-6)


def test_classic_requires_one_id_per_position():
    model = GPTModel(cfg(), "classic", V, seed=0)
    with pytest.raises(ValueError, match="one input id per position"):
        model(batch_from_rows([[[1, 2], [3]]], [[[1], [2]]]))
    with pytest.raises(ValueError, match="tokenizer kind"):
        GPTModel(cfg(), "bpe", V)


def test_mlp_inner_size_matches_reference_rounding():
    assert mlp_inner_size(ModelConfig(hidden_size=4096, mlp_factor=2.66796875)) == 10928
    assert mlp_inner_size(ModelConfig(hidden_size=256)) == 683
    # an explicit size (imported models: a ratio does not always truncate back to the size)
    assert int(3589 / 3584 * 3584) == 3588
    assert mlp_inner_size(ModelConfig(hidden_size=3584, num_attention_heads=4, ffn_hidden_size=3589)) == 3589
    model = GPTModel(cfg(ffn_hidden_size=40), "tfree", V, seed=0)
    assert model.blocks[0].mlp.gate_up.weight.shape == (80, model.cfg.hidden_size)


def test_biases_are_optional_zero_initialised_and_not_decayed():
    plain = GPTModel(cfg(), "tfree", V, seed=0)
    biased = GPTModel(cfg(bias=True), "tfree", V, seed=0)
    extra = set(dict(biased.named_parameters())) - set(dict(plain.named_parameters()))
    assert extra == {f"blocks.{i}.{m}.bias" for i in range(len(plain.blocks))
                     for m in ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.down")}
    for name, p in plain.named_parameters():  # the weights do not change (no RNG drawn for biases)
        assert torch.equal(p, biased.get_parameter(name)), name
    assert all(float(biased.get_parameter(n).abs().sum()) == 0 for n in extra)
    no_decay = {id(p) for p in param_groups(biased, 0.1)[1]["params"]}
    assert all(id(biased.get_parameter(n)) in no_decay for n in extra)


@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_block_causal_packing_equals_separate_documents(kind):
    """A row packing two documents gives, per document, the outputs of that document run alone."""
    torch.manual_seed(0)
    model = GPTModel(cfg(num_kv_heads=2), kind, V, seed=1).eval()
    rng = random.Random(3)
    rows = random_rows(1, 7, kind, rng)
    packed = batch_from_rows(rows, rows, document_ids=[[5, 5, 5, 9, 9, 9, 9]])
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    a = batch_from_rows([rows[0][:3]], [rows[0][:3]])
    b = batch_from_rows([rows[0][3:]], [rows[0][3:]])
    with torch.no_grad():
        out = model(packed)
        torch.testing.assert_close(out[:, :3], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 3:], model(b), rtol=1e-5, atol=1e-5)


def test_rotary_is_relative():
    """Shifting every position of a document by a constant leaves the outputs unchanged."""
    model = GPTModel(cfg(), "tfree", V, seed=0).eval()
    batch = random_batch(1, 6, "tfree")
    with torch.no_grad():
        ref = model(batch)
        batch.position_ids = batch.position_ids + 17
        torch.testing.assert_close(model(batch), ref, rtol=1e-4, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    c_gqa = cfg(num_attention_heads=4, num_kv_heads=2)
    gqa = GPTModel(c_gqa, "tfree", V, seed=0).eval()
    d, g = 8, 2
    assert gqa.blocks[0].attention.qkv.weight.shape == ((4 + 2 * 2) * d, 32)
    mha = GPTModel(cfg(num_attention_heads=4), "tfree", V, seed=0).eval()
    assert mha.blocks[0].attention.qkv.weight.shape == (3 * 4 * d, 32)
    sd = gqa.state_dict()
    for i in range(2):
        w = sd[f"blocks.{i}.attention.qkv.weight"].view(2, g + 2, d, 32)  # [kv][q_0, q_1, k, v]
        per_head = [torch.stack([w[h // g, h % g], w[h // g, g], w[h // g, g + 1]]) for h in range(4)]
        sd[f"blocks.{i}.attention.qkv.weight"] = torch.stack(per_head).reshape(-1, 32)
    mha.load_state_dict(sd)
    batch = random_batch(2, 5, "tfree", document_ids=[[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(gqa(batch), mha(batch), rtol=1e-5, atol=1e-5)


def test_pythia_and_normal_init_stds():
    h, L = 64, 4
    model = GPTModel(cfg(hidden_size=h, num_layers=L, num_attention_heads=4), "tfree", 512, seed=0)
    std, out_std = math.sqrt(2 / (5 * h)), 2 / (L * math.sqrt(h))
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name
            continue
        want = out_std if name.endswith(("attention.dense.weight", "mlp.down.weight")) else std
        assert abs(p.std().item() - want) / want < 0.1, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.1 * want, name
    model = GPTModel(cfg(hidden_size=h, init="normal", init_std=0.05), "classic", 512, seed=0)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert abs(p.std().item() - 0.05) / 0.05 < 0.1, name


def test_same_seed_same_weights():
    sd = lambda m: m.state_dict()
    a, b = GPTModel(cfg(), "tfree", V, seed=7), GPTModel(cfg(), "tfree", V, seed=7)
    c = GPTModel(cfg(), "tfree", V, seed=8)
    assert all(torch.equal(sd(a)[k], sd(b)[k]) for k in sd(a))
    assert not torch.equal(sd(a)["blocks.0.attention.qkv.weight"], sd(c)["blocks.0.attention.qkv.weight"])
    torch.manual_seed(3)
    d = GPTModel(cfg(), "tfree", V)
    torch.manual_seed(3)
    e = GPTModel(cfg(), "tfree", V)
    assert all(torch.equal(sd(d)[k], sd(e)[k]) for k in sd(d))
    # a stage's weights do not depend on the other stages (pipeline stages build only their own)
    deeper = GPTModel(cfg(num_layers=3), "tfree", V, seed=7)
    assert torch.equal(deeper.blocks[1].attention.qkv.weight, a.blocks[1].attention.qkv.weight)
    # output projections draw the same numbers, scaled by 2 / (L * sqrt(h)) with the deeper L
    torch.testing.assert_close(deeper.blocks[1].mlp.down.weight * 3 / 2, a.blocks[1].mlp.down.weight)
    assert torch.equal(deeper.embedding.weight, a.embedding.weight)


@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_kv_cache_incremental_equals_full_forward(kind):
    model = GPTModel(cfg(num_kv_heads=2), kind, V, seed=0).eval()
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [3, 3, 3, 3, 3, 3, 3]])
    full_batch = random_batch(2, 7, kind, seed=4, document_ids=docs)
    rows = [[full_batch.input_ids[full_batch.input_offsets[n]:full_batch.input_offsets[n + 1]].tolist()
             for n in range(b * 7, b * 7 + 7)] for b in range(2)]

    def step(lo, hi):
        off, ids = csr([r for row in rows for r in row[lo:hi]])
        return make_input_batch(off, ids, full_batch.position_ids[:, lo:hi], docs[:, lo:hi])

    with torch.no_grad():
        full = model(full_batch)
        cache = model.new_kv_cache()
        outs = [model(step(0, 3), kv_cache=cache)]  # prompt of 3 positions
        for s in range(3, 7):
            outs.append(model(step(s, s + 1), kv_cache=cache))
    assert len(cache) == 7 and cache.keys[1].shape == (2, 7, 2, 8)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_flash_glue_with_a_stand_in_kernel(monkeypatch):
    """The flash path's cu_seqlens and reshapes, run with an sdpa stand-in for flash_attn_varlen_func."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=True):
        calls.append(cu_q.tolist())
        assert max_q == max(b - a for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]))
        out = torch.empty_like(q)
        g = q.shape[1] // k.shape[1]
        for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
        return out

    model = GPTModel(cfg(num_kv_heads=2), "tfree", V, seed=0).eval()
    batch = random_batch(2, 5, "tfree", document_ids=[[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(batch)
        monkeypatch.setattr(tr, "flash_attn_varlen_func", fake_varlen)
        monkeypatch.setattr(tr, "_flash_possible", lambda dtype, device: True)
        out = model(batch)
    assert calls and calls[0] == [0, 2, 5, 10]  # row 2 starts a new sequence although its id repeats
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_param_groups_no_decay_on_norms():
    model = GPTModel(cfg(), "tfree", V, seed=0)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert no_decay == {n for n in names.values() if "norm" in n}
    assert "embedding.weight" in decay and "output.head.linear.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_gradients_reach_every_parameter(kind):
    model = GPTModel(cfg(num_kv_heads=2, dropout=0.1), kind, V, seed=0)
    batch = random_batch(2, 5, kind, document_ids=[[0, 0, 1, 1, 1], [0] * 5])
    model.loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_same_gradients():
    batch = random_batch(2, 4, "tfree")
    grads = []
    for ckpt in (False, True):
        model = GPTModel(cfg(activation_checkpointing=ckpt), "tfree", V, seed=0)
        model.loss(batch).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["tfree", "classic"])
def test_few_steps_overfit_one_batch(kind):
    torch.manual_seed(0)
    c = cfg(loss_pos_weight=10.0, loss_scale=10.0) if kind == "tfree" else cfg()
    model = GPTModel(c, kind, V, seed=0)
    batch = random_batch(2, 6, kind, seed=1, document_ids=[[0, 0, 0, 1, 1, 1], [0] * 6])
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_bf16_forward_keeps_dtype():
    model = GPTModel(cfg(), "tfree", V, seed=0).to(torch.bfloat16)
    batch = random_batch(1, 4, "tfree")
    logits = model(batch)
    assert logits.dtype == torch.bfloat16
    loss = model.loss_from_logits(logits, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
