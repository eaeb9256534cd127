"""The CUDA kernels (csrc/*_kernels.cu through csrc/tfree_ops_cuda.cpp) against the PyTorch reference.

GPU only: every test is marked ``cuda`` (tests/conftest.py skips them without a CUDA device). The module is
the prebuilt ``megatron_tfree._tfree_ops_cuda`` (``pip install --no-build-isolation -e .`` on a CUDA
machine) or, if that is missing or ``MEGATRON_TFREE_CUDA_JIT=1``, a JIT build of the same sources into
the pytest cache (~1-2 min once). References run in float64 on the CPU; inputs are fresh random data
(never zeros), outputs are checked for NaN and for rows never written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_tfree.ops import cuda, reference

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative tolerance of a result rounded to the dtype (accumulation is float32 in the kernels)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def load_cuda_ops(build_root: Path):
    """The compiled CUDA module: prebuilt if importable (and no JIT forced), else a JIT build of csrc/ into
    the pytest cache (:func:`megatron_tfree.ops.cuda.load`, the loader the ops use)."""
    if os.environ.get(cuda.JIT_ENV) != "1":
        mod = cuda.load(jit=False)
        if mod is not None:
            return mod
    return cuda.load(jit=True, build_root=build_root)


@pytest.fixture(scope="module")
def cu(extensions_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return load_cuda_ops(Path(extensions_dir))


DEV = "cuda"


def random_csr(n, lo, hi, v_global, gen, long_rows=0):
    """CSR rows of lo..hi ids in [0, v_global) (empty rows when lo == 0, repeats likely) + ``long_rows`` of 300."""
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    if long_rows:
        lengths[torch.randperm(n, generator=gen)[:long_rows]] = 300
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = torch.randint(0, v_global, (int(offsets[-1]),), generator=gen)
    return offsets, ids


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------- embedding bag
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [24, 37, 2048])  # 16-byte vectors; odd width (scalar path); model width
@pytest.mark.parametrize("vocab_start,v_local,v_global", [(0, 97, 97), (40, 30, 97)])  # whole vocab; a TP shard
def test_embedding_bag_forward_backward(cu, dtype, h, vocab_start, v_local, v_global):
    gen = torch.Generator().manual_seed(h + vocab_start)
    offsets, ids = random_csr(53, 0, 12, v_global, gen, long_rows=2)
    ids[:5] = ids[0]  # an id repeated inside a row
    w = torch.randn(v_local, h, generator=gen).to(dtype)
    w64 = w.double().requires_grad_(True)
    ref = reference.embedding_bag(w64, offsets, ids, vocab_start)
    out = cu.embedding_bag_forward(w.to(DEV), offsets.to(DEV), ids.to(DEV), vocab_start)
    assert out.dtype == dtype and out.shape == (53, h)
    torch.testing.assert_close(out.cpu().double(), ref.detach(), **TOL[dtype])
    empty = (offsets[1:] == offsets[:-1]).nonzero().flatten()
    assert (out.cpu()[empty] == 0).all()  # empty bags are written as zeros (output starts uninitialised)

    g = torch.randn(53, h, generator=gen).to(dtype)
    ref.backward(g.double())
    for deterministic in (True, False):
        gw = cu.embedding_bag_backward(g.to(DEV), offsets.to(DEV), ids.to(DEV), vocab_start, v_local, deterministic)
        assert gw.dtype == dtype and gw.shape == (v_local, h)
        torch.testing.assert_close(gw.cpu().double(), w64.grad, **TOL[dtype])


def test_embedding_bag_deterministic_backward_is_bitwise_repeatable(cu):
    gen = torch.Generator().manual_seed(5)
    offsets, ids = random_csr(4096, 5, 40, 500, gen)  # many rows per id: long segments
    g = torch.randn(4096, 256, generator=gen).to(DEV)
    o, i = offsets.to(DEV), ids.to(DEV)
    first = cu.embedding_bag_backward(g, o, i, 0, 500, True)
    for _ in range(3):
        assert torch.equal(cu.embedding_bag_backward(g, o, i, 0, 500, True), first)
    # in-order float32 sums per id: within float32 rounding of the float64 reference
    w = torch.zeros(500, 256, dtype=torch.float64, requires_grad=True)
    reference.embedding_bag(w, offsets, ids).backward(g.double().cpu())
    assert rel_err(first, w.grad) < 1e-6


def test_embedding_bag_edge_cases(cu):
    w = torch.randn(10, 16, device=DEV)
    # no rows at all; rows but no ids; only out-of-shard ids
    assert cu.embedding_bag_forward(w, torch.zeros(1, dtype=torch.long, device=DEV),
                                    torch.zeros(0, dtype=torch.long, device=DEV), 0).shape == (0, 16)
    off = torch.tensor([0, 0, 0], device=DEV)
    assert (cu.embedding_bag_forward(w, off, torch.zeros(0, dtype=torch.long, device=DEV), 0) == 0).all()
    off, ids = torch.tensor([0, 2, 3], device=DEV), torch.tensor([-1, 10, 25], device=DEV)
    assert (cu.embedding_bag_forward(w, off, ids, 0) == 0).all()
    g = torch.randn(2, 16, device=DEV)
    for det in (True, False):
        assert (cu.embedding_bag_backward(g, off, ids, 0, 10, det) == 0).all()
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cu.embedding_bag_forward(w.double(), off, ids, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        cu.embedding_bag_forward(w, off.cpu(), ids, 0)


# ------------------------------------------------------------------------------------------ BCE
def reference_head(hidden, weight, t_off, t_ids, weights, pw, ls, vocab_start, vocab_size):
    """float64 CPU reference loss and gradients of hidden and weight."""
    h64 = hidden.detach().double().cpu().requires_grad_(True)
    w64 = weight.detach().double().cpu().requires_grad_(True)
    loss = reference.tfree_head_loss(h64, w64, t_off.cpu(), t_ids.cpu(), weights.double().cpu(), pw, ls,
                                     vocab_start, vocab_size)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bce_loss_matches_reference(cu, dtype):
    gen = torch.Generator().manual_seed(11)
    n, v = 45, 300
    offsets, ids = random_csr(n, 0, 25, v, gen)
    ids[:4] = ids[0]  # repeated target: clamps to 1
    logits = (3 * torch.randn(n, v, generator=gen)).to(dtype)
    weights = (torch.rand(n, generator=gen) > 0.2).float()
    x64 = logits.double().requires_grad_(True)
    ref = reference.tfree_bce_loss(x64, offsets, ids, weights.double(), 300.0, 100.0)
    ref.backward()
    out = cu.bce_loss(logits.to(DEV), offsets.to(DEV), ids.to(DEV), weights.to(DEV), 300.0, 100.0, 0, v, True, True)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert rel_err(out[0], ref) < (1e-6 if dtype == torch.float32 else 1e-3)  # logits rounded alike: only sums differ
    assert out[1].dtype == dtype
    assert rel_err(out[1], x64.grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (out[1].cpu()[weights == 0] == 0).all()
    no_grad = cu.bce_loss(logits.to(DEV), offsets.to(DEV), ids.to(DEV), weights.to(DEV), 300.0, 100.0, 0, v, True, False)
    assert len(no_grad) == 1 and torch.equal(no_grad[0], out[0])
    bad = ids.clone()
    bad[0] = v
    with pytest.raises(RuntimeError, match="outside"):
        cu.bce_loss(logits.to(DEV), offsets.to(DEV), bad.to(DEV), weights.to(DEV), 300.0, 100.0, 0, v, True, False)


def test_bce_loss_wider_than_one_kernel_chunk(cu):
    """More columns than TFREE_BCE_MAX_CHUNK: the glue splits the row into several kernel calls."""
    gen = torch.Generator().manual_seed(2)
    n, v = 3, cu.bce_max_chunk + 4465
    offsets = torch.tensor([0, 3, 3, 6])
    ids = torch.tensor([5, cu.bce_max_chunk - 1, cu.bce_max_chunk, 0, v - 1, v - 1])
    logits = torch.randn(n, v, generator=gen)
    weights = torch.ones(n)
    x64 = logits.double().requires_grad_(True)
    ref = reference.tfree_bce_loss(x64, offsets, ids, weights.double(), 30.0, 1.0)
    ref.backward()
    out = cu.bce_loss(logits.to(DEV), offsets.to(DEV), ids.to(DEV), weights.to(DEV), 30.0, 1.0, 0, v, True, True)
    assert rel_err(out[0], ref) < 1e-6
    assert rel_err(out[1], x64.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
@pytest.mark.parametrize("vocab_start,v_local,v_global", [(0, 200, 200), (120, 80, 200)])
def test_head_loss_matches_reference(cu, dtype, chunk, vocab_start, v_local, v_global):
    gen = torch.Generator().manual_seed(chunk + vocab_start)
    n, h = 37, 64
    offsets, ids = random_csr(n, 0, 30, v_global, gen)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (0.3 * torch.randn(v_local, h, generator=gen)).to(dtype)
    weights = (torch.rand(n, generator=gen) > 0.1).float()
    # float16 gradients of size coef ~ loss_scale / (N v) underflow (as in the unfused model): larger scale there
    pw, ls = 300.0, (100.0 if dtype != torch.float16 else 1e5)
    ref_loss, ref_gh, ref_gw = reference_head(hidden, weight, offsets, ids, weights, pw, ls, vocab_start, v_global)
    out = cu.head_loss(hidden.to(DEV), weight.to(DEV), offsets.to(DEV), ids.to(DEV), weights.to(DEV), pw, ls,
                       vocab_start, v_global, chunk, True)
    loss, gh, gw = out
    assert gh.dtype == dtype and gw.dtype == dtype and gh.shape == (n, h) and gw.shape == (v_local, h)
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 2e-2)}[dtype]
    assert rel_err(loss, ref_loss) < tol[0]
    assert rel_err(gh, ref_gh) < tol[1]
    assert rel_err(gw, ref_gw) < tol[1]
    no_grad = cu.head_loss(hidden.to(DEV), weight.to(DEV), offsets.to(DEV), ids.to(DEV), weights.to(DEV), pw, ls,
                           vocab_start, v_global, chunk, False)
    assert len(no_grad) == 1 and torch.equal(no_grad[0], loss)


def test_head_loss_chunking_does_not_change_the_result(cu):
    gen = torch.Generator().manual_seed(9)
    n, h, v = 64, 128, 1000
    offsets, ids = random_csr(n, 1, 40, v, gen)
    hidden, weight = torch.randn(n, h, generator=gen).to(DEV), torch.randn(v, h, generator=gen).to(DEV)
    weights = torch.ones(n, device=DEV)
    args = (offsets.to(DEV), ids.to(DEV), weights, 300.0, 100.0, 0, v)
    a = cu.head_loss(hidden, weight, *args, 1000, True)
    b = cu.head_loss(hidden, weight, *args, 96, True)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5 * float(a[1].abs().max()))
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5 * float(a[2].abs().max()))
    again = cu.head_loss(hidden, weight, *args, 96, True)
    assert all(torch.equal(x, y) for x, y in zip(b, again))  # deterministic


# ------------------------------------------------------------------------------------------ decoding
def random_patterns(n_words, v, gen):
    lengths = torch.randint(1, 40, (n_words,), generator=gen)
    offsets = torch.zeros(n_words + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = torch.cat([torch.randperm(v, generator=gen)[: int(k)] for k in lengths]).int()  # distinct per word
    edge = (torch.rand(len(ids), generator=gen) < 0.3).to(torch.uint8)
    c = torch.randint(1, 12, (n_words,), generator=gen).int()
    return offsets, ids, edge, c


def reference_scores(logits, offsets, ids, edge, c, m, e):
    p = torch.sigmoid(logits.double().cpu())
    v, total = p.shape[1], p.sum(1, keepdim=True)
    rows = torch.repeat_interleave(torch.arange(len(c)), offsets[1:] - offsets[:-1])
    vals = torch.where(edge.bool(), torch.tensor(e, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    mat = torch.zeros(len(c), v, dtype=torch.float64)
    mat.index_put_((rows, ids.long()), vals, accumulate=True)
    s = p @ mat.t()
    mc = c.double() * m
    return s / mc + (s - total) / torch.clamp(v - mc, min=1.0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("edge_weight", [1.0, 0.5])
def test_decode_scores_match_reference(cu, batch, edge_weight):
    gen = torch.Generator().manual_seed(batch)
    v, m, n_words = 4000, 10, 3001
    offsets, ids, edge, c = random_patterns(n_words, v, gen)
    logits = 4 * torch.randn(batch, v, generator=gen)
    out = cu.decode_scores(logits.to(DEV), offsets.to(DEV), ids.to(DEV), edge.to(DEV), c.to(DEV), m, edge_weight)
    assert out.shape == (batch, n_words) and out.dtype == torch.float32
    ref = reference_scores(logits, offsets, ids, edge, c, m, edge_weight)
    assert rel_err(out, ref) < 1e-5
    # ranking agrees with the reference (what greedy decoding uses)
    assert torch.equal(out.cpu().argmax(1), ref.argmax(1))


def test_decode_scores_match_dictionary(cu):
    """Same numbers as DecodeDictionary.score (the torch sparse path) on a real tokenizer's patterns."""
    from megatron_tfree.tokenizer.dictionary import DecodeDictionary
    from megatron_tfree.tokenizer.trigram import TrigramTokenizer

    tok = TrigramTokenizer(vocab_size=2048, vocab_population=4)
    d = DecodeDictionary.build(tok, {"hello": 5, "world": 3, "the": 9, "tokenizer": 1, "free": 2})
    logits = torch.randn(2, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    ref = d.score(logits)  # CPU torch path (or the cpp kernel: same formula)
    parts = []
    for b in d._blocks:
        if len(b):
            off, ids, edge, c = (t.to(DEV) for t in b.native())
            parts.append(cu.decode_scores(logits.to(DEV), off, ids, edge, c, tok.vocab_population, 1.0))
    torch.testing.assert_close(torch.cat(parts, 1).cpu(), ref, rtol=1e-5, atol=1e-6)


def test_decode_scores_reject_bad_ids(cu):
    off = torch.tensor([0, 2], device=DEV)
    ids = torch.tensor([1, 50], dtype=torch.int32, device=DEV)
    edge = torch.zeros(2, dtype=torch.uint8, device=DEV)
    c = torch.ones(1, dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="outside"):
        cu.decode_scores(torch.randn(1, 50, device=DEV), off, ids, edge, c, 4, 1.0)


# ------------------------------------------------------------------- wired into megatron_tfree.ops
@pytest.fixture
def cpp_backend(cu, request, monkeypatch):
    """The ``cpp`` ops backend with this module as its CUDA kernels; counts the kernel calls."""
    from megatron_tfree import ops

    calls = {}
    for name in ("embedding_bag_forward", "embedding_bag_backward", "bce_loss", "head_loss", "decode_scores"):
        real = getattr(cu, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cu, name, counted)
    monkeypatch.setattr(cuda, "module", lambda: cu)
    previous = ops.backend_name()
    ops.set_backend("cpp")
    request.addfinalizer(lambda: ops.set_backend(previous))
    return calls


def test_ops_send_cuda_tensors_to_the_cuda_kernels(cpp_backend):
    from megatron_tfree import ops

    gen = torch.Generator().manual_seed(11)
    offsets, ids = random_csr(40, 0, 12, 97, gen, long_rows=1)
    w = torch.randn(97, 64, generator=gen)
    g = torch.randn(40, 64, generator=gen)
    wc = w.to(DEV).requires_grad_(True)
    out = ops.embedding_bag(wc, offsets.to(DEV), ids.to(DEV))
    out.backward(g.to(DEV))
    wr = w.detach().double().requires_grad_(True)
    ref = reference.embedding_bag(wr, offsets, ids)
    ref.backward(g.double())
    assert rel_err(out, ref) < 1e-6 and rel_err(wc.grad, wr.grad) < 1e-6
    assert cpp_backend["embedding_bag_forward"] == cpp_backend["embedding_bag_backward"] == 1

    t_off, t_ids = random_csr(40, 1, 8, 97, gen)
    weights = torch.rand(40, generator=gen)
    hidden = torch.randn(40, 64, generator=gen)
    head = torch.randn(97, 64, generator=gen) * 0.1
    hc, wc = hidden.to(DEV).requires_grad_(True), head.to(DEV).requires_grad_(True)
    loss = ops.tfree_head_loss(hc, wc, t_off.to(DEV), t_ids.to(DEV), weights.to(DEV), 30.0, 10.0, chunk_size=32)
    loss.backward()
    hr, wr = hidden.detach().double().requires_grad_(True), head.detach().double().requires_grad_(True)
    lref = reference.tfree_bce_loss(hr @ wr.t(), t_off, t_ids, weights.double(), 30.0, 10.0)
    lref.backward()
    assert loss.device.type == "cuda" and loss.dtype == torch.float32
    assert rel_err(loss, lref) < 1e-5 and rel_err(hc.grad, hr.grad) < 1e-5 and rel_err(wc.grad, wr.grad) < 1e-5
    assert cpp_backend["head_loss"] == 1


def test_fused_model_loss_on_cuda_equals_cpu(cpp_backend):
    from megatron_tfree.config import ModelConfig
    from megatron_tfree.data.batch import Batch
    from megatron_tfree.model import GPTModel

    gen = torch.Generator().manual_seed(12)
    B, S, V = 2, 16, 256
    in_off, in_ids = random_csr(B * S, 1, 20, V, gen)
    t_off, t_ids = random_csr(B * S, 1, 20, V, gen)
    pos = torch.arange(S).repeat(B, 1)
    batch = Batch(in_off, in_ids, t_off, t_ids, pos, torch.zeros_like(pos), torch.ones(B, S))
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, head_chunk_size=100, loss_pos_weight=30.0,
                      loss_scale=10.0, attention="sdpa")
    losses, grads = {}, {}
    for dev in ("cpu", DEV):
        model = GPTModel(cfg, "tfree", V, seed=0).to(dev)
        b = batch.to(dev)
        loss = model(b, return_loss=True)
        loss.backward()
        losses[dev] = loss.detach().cpu()
        grads[dev] = {k: p.grad.detach().cpu() for k, p in model.named_parameters()}
    assert cpp_backend["head_loss"] == 1 and cpp_backend["embedding_bag_forward"] == 1
    torch.testing.assert_close(losses[DEV], losses["cpu"], rtol=1e-4, atol=1e-6)
    for k, g in grads["cpu"].items():
        assert rel_err(grads[DEV][k], g) < 1e-3, k


def test_dictionary_scores_cuda_logits_with_the_kernel(cpp_backend):
    import numpy as np

    from megatron_tfree.tokenizer.dictionary import DecodeDictionary, _Block

    rng = np.random.default_rng(13)
    n, v, m = 500, 1024, 4
    trigrams = rng.integers(1, 6, n)
    lengths = trigrams * m
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(0, v, int(offsets[-1]), dtype=np.int32)
    edge = rng.random(int(offsets[-1])) < 0.3
    d = DecodeDictionary([_Block([f"w{i}" for i in range(n)], np.zeros(n, np.int64), offsets, ids, edge,
                                 trigrams.astype(np.int32))], v, m, {})
    logits = torch.randn(3, v)
    on_gpu = d.score(logits.to(DEV), 0.5)
    assert on_gpu.device.type == "cuda" and cpp_backend["decode_scores"] == 1
    torch.testing.assert_close(on_gpu.cpu(), d.score(logits, 0.5), rtol=1e-5, atol=1e-5)
