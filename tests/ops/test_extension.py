"""The C++ CPU kernels (``cpp`` backend, csrc/tfree_ops.cpp) against the PyTorch reference.

The extension is built once per session into the pytest cache (``.pytest_cache/d/torch_extensions``):
~25 s cold, ~0.1 s when cached.
"""

import logging
import math

import pytest
import torch

from megatron_tfree import ops
from megatron_tfree.ops import cuda, extension, reference
from megatron_tfree.tokenizer.dictionary import DecodeDictionary


@pytest.fixture(scope="module")
def ext(extensions_dir):
    previous = ops.backend_name()
    try:
        mod = extension.load(build_root=extensions_dir)
    except extension.ExtensionBuildError as e:
        pytest.fail(str(e))
    ops.set_backend("cpp")
    yield mod
    ops.set_backend(previous)


def random_csr(n, lo, hi, v_global, gen, long_rows=0):
    """CSR rows of lo..hi ids in [0, v_global) (empty rows when lo == 0, repeats likely), plus
    ``long_rows`` rows of 300 ids."""
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    if long_rows:
        lengths[torch.randperm(n, generator=gen)[:long_rows]] = 300
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = torch.randint(0, v_global, (int(offsets[-1]),), generator=gen)
    return offsets, ids


def assert_grad_close(a, b, rel=2e-6):
    """fp32 gradients: equal up to rounding relative to the largest entry (sigmoid(x) - 1 cancels)."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=rel * float(b.abs().max()))


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=0.1, rtol=0.02), torch.float16: dict(atol=0.02, rtol=0.01)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab_start,v_local,v_global", [(0, 97, 97), (40, 30, 97)])  # whole vocab; a TP shard
@pytest.mark.parametrize("h", [24, 2 * 128 + 8 + 3])  # below the kernel's 128-column block; blocks + remainder
def test_embedding_bag_matches_reference(ext, dtype, vocab_start, v_local, v_global, h):
    gen = torch.Generator().manual_seed(1)
    offsets, ids = random_csr(37, 0, 12, v_global, gen, long_rows=2)
    ids[:5] = ids[0]  # an id repeated inside a row
    w = torch.randn(v_local, h, generator=gen).to(dtype)
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = ops.embedding_bag(w1, offsets, ids, vocab_start)
    ref = reference.embedding_bag(w2, offsets, ids, vocab_start)
    assert out.dtype == dtype and out.shape == (37, h)
    # the reference sums in the weight dtype; compare both to an fp64 sum where they are low precision
    exact = reference.embedding_bag(w.double(), offsets, ids, vocab_start)
    torch.testing.assert_close(out.double(), exact, **TOL[dtype])
    torch.testing.assert_close(out, ref, **TOL[dtype])
    empty = (offsets[1:] == offsets[:-1])
    assert empty.any() and torch.all(out[empty] == 0)
    g = torch.randn(37, h, generator=gen).to(dtype)
    out.backward(g)
    ref.backward(g)
    if dtype in (torch.float32, torch.float64):  # in bf16/fp16 the reference's gradient sums in that dtype:
        torch.testing.assert_close(w1.grad, w2.grad, **TOL[dtype])  # less exact than ours (fp32), see below
    w64 = w.double().requires_grad_(True)
    reference.embedding_bag(w64, offsets, ids, vocab_start).backward(g.double())
    torch.testing.assert_close(w1.grad.double(), w64.grad, **TOL[dtype])


def test_embedding_bag_backward_is_deterministic_and_skips_foreign_ids(ext):
    gen = torch.Generator().manual_seed(2)
    offsets, ids = random_csr(200, 5, 40, 1000, gen)
    w = torch.randn(300, 16, requires_grad=True)
    grads = []
    for _ in range(2):
        w.grad = None
        ops.embedding_bag(w, offsets, ids, vocab_start=500).square().sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])
    untouched = torch.ones(300, dtype=torch.bool)
    local = ids - 500
    untouched[local[(local >= 0) & (local < 300)]] = False
    assert torch.all(grads[0][untouched] == 0) and torch.any(grads[0][~untouched] != 0)


def test_gradcheck_fp64(ext):
    gen = torch.Generator().manual_seed(3)
    offsets, ids = random_csr(6, 0, 5, 9, gen)
    w = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_: extension.embedding_bag(w_, offsets, ids, 1), (w,))
    h = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    wh = torch.randn(11, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t_off, t_ids = random_csr(5, 0, 4, 14, gen)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    fn = lambda h_, w_: extension._head_loss_exact(h_, w_, t_off, t_ids, weights, 3.0, 10.0, vocab_start=2,  # noqa: E731
                                                  vocab_size=14, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (h, wh))
    logits = torch.randn(5, 14, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: extension._bce_loss_exact(x, t_off, t_ids, weights, 3.0, 10.0), (logits,))


def bce_inputs(n, v_global, gen):
    t_off, t_ids = random_csr(n, 0, 30, v_global, gen)
    weights = (torch.rand(n, generator=gen) > 0.2).float() * torch.rand(n, generator=gen) * 2
    return t_off, t_ids, weights


def test_bce_loss_matches_reference(ext):
    gen = torch.Generator().manual_seed(4)
    t_off, t_ids, weights = bce_inputs(50, 333, gen)
    x = (torch.randn(50, 333, generator=gen) * 4).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    loss = ops.tfree_bce_loss(x, t_off, t_ids, weights, 300.0, 100.0)
    ref = reference.tfree_bce_loss(x2, t_off, t_ids, weights, 300.0, 100.0)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=0)
    loss.backward()
    ref.backward()
    assert_grad_close(x.grad, x2.grad)
    with pytest.raises(RuntimeError, match="outside"):
        ops.tfree_bce_loss(x.detach(), t_off, t_ids + 333, weights, 300.0, 100.0)


@pytest.mark.parametrize("vocab_start,v_local,v_global,chunk", [(0, 257, 257, 64), (0, 257, 257, 100),
                                                               (100, 130, 400, 37), (0, 50, 50, 4096)])
def test_head_loss_matches_reference_fp32(ext, vocab_start, v_local, v_global, chunk):
    gen = torch.Generator().manual_seed(5)
    n, h = 41, 32
    t_off, t_ids, weights = bce_inputs(n, v_global, gen)
    hid = torch.randn(n, h, generator=gen, requires_grad=True)
    w = (torch.randn(v_local, h, generator=gen) * 0.3).requires_grad_(True)
    hid2, w2 = hid.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    loss = ops.tfree_head_loss(hid, w, t_off, t_ids, weights, 300.0, 100.0, vocab_start, v_global, chunk)
    ref = reference.tfree_head_loss(hid2, w2, t_off, t_ids, weights, 300.0, 100.0, vocab_start, v_global, chunk)
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=0)
    (loss * 3).backward()
    (ref * 3).backward()
    assert_grad_close(hid.grad, hid2.grad)
    assert_grad_close(w.grad, w2.grad)
    with torch.no_grad():  # loss only (no gradients computed)
        torch.testing.assert_close(ops.tfree_head_loss(hid, w, t_off, t_ids, weights, 300.0, 100.0, vocab_start,
                                                       v_global, chunk), ref.detach(), rtol=2e-6, atol=0)


def test_head_loss_shards_sum_to_full_loss(ext):
    gen = torch.Generator().manual_seed(6)
    t_off, t_ids, weights = bce_inputs(9, 60, gen)
    hid, w = torch.randn(9, 8, generator=gen), torch.randn(60, 8, generator=gen)
    full = ops.tfree_head_loss(hid, w, t_off, t_ids, weights, 5.0, 2.0, chunk_size=7)
    parts = sum(ops.tfree_head_loss(hid, w[s:s + 20], t_off, t_ids, weights, 5.0, 2.0, vocab_start=s,
                                    vocab_size=60, chunk_size=7) for s in (0, 20, 40))
    torch.testing.assert_close(parts, full, rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_loss_low_precision(ext, dtype):
    gen = torch.Generator().manual_seed(7)
    t_off, t_ids, weights = bce_inputs(16, 300, gen)
    hid = torch.randn(16, 32, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(300, 32, generator=gen) * 0.2).to(dtype).requires_grad_(True)
    loss = ops.tfree_head_loss(hid, w, t_off, t_ids, weights, 300.0, 100.0, chunk_size=128)
    loss.backward()
    assert hid.grad.dtype == dtype and w.grad.dtype == dtype
    h64, w64 = hid.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = extension._head_loss_exact(h64, w64, t_off, t_ids, weights.double(), 300.0, 100.0)  # fp64 ground truth
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)  # fp32 compute of exact inputs
    torch.testing.assert_close(hid.grad.double(), h64.grad, **TOL[dtype])
    torch.testing.assert_close(w.grad.double(), w64.grad, **TOL[dtype])
    plain = reference.tfree_head_loss(hid.detach(), w.detach(), t_off, t_ids, weights, 300.0, 100.0)
    torch.testing.assert_close(loss, plain, rtol=0.02, atol=0)  # reference rounds logits to dtype


def random_dictionary(n_words, v, m, gen):
    entries = []
    for i in range(n_words):
        ids = torch.randperm(v, generator=gen)[: int(torch.randint(1, 40, (1,), generator=gen))].tolist()
        k = int(torch.randint(0, len(ids) + 1, (1,), generator=gen))
        entries.append((f"w{i}", ids[k:], ids[:k], max(1, len(ids) // m), 0))
    return DecodeDictionary.from_patterns(entries, v, m)


@pytest.mark.parametrize("edge_weight,batch", [(1.0, 3), (0.4, 3), (0.4, 1)])  # batch 1: the greedy fast path
def test_decode_scores_match_torch_path(ext, edge_weight, batch):
    gen = torch.Generator().manual_seed(8)
    d1, d2 = random_dictionary(300, 500, 4, gen), random_dictionary(50, 500, 4, gen)
    d = DecodeDictionary([*d1._blocks, *d2._blocks], 500, 4, {})  # two blocks, as after add_words
    logits = torch.randn(batch, 500, generator=gen).bfloat16()
    ops.set_backend("reference")
    try:
        ref = d.score(logits, edge_weight)
    finally:
        ops.set_backend("cpp")
    out = d.score(logits, edge_weight)
    assert out.shape == (batch, 350) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.log_probs(logits, edge_weight), torch.log_softmax(ref, 1), rtol=1e-5, atol=1e-5)
    offsets, ids, edge, c = d1._blocks[0].native()
    bad = ids.clone()
    bad[0] = 500
    with pytest.raises(RuntimeError, match="outside"):
        extension.decode_scores(logits, offsets, bad, edge, c, 4)


def test_backend_registry_and_log(ext, caplog):
    assert "cpp" in ops.available_backends() and ops.backend_name() == "cpp"
    assert extension.is_available()
    ops.set_backend("reference")
    ops.set_backend("cpp")
    with caplog.at_level(logging.INFO, logger="megatron_tfree"):
        ops.embedding_bag(torch.ones(3, 2), torch.tensor([0, 1]), torch.tensor([1]))
    # the log names where the kernels came from: the .so setup.py built, or the cached JIT build
    assert "ops backend: cpp" in caplog.text
    assert "prebuilt" in caplog.text or "torch_extensions" in caplog.text
    assert ops.native_decode_scores() is extension.decode_scores


def test_missing_compiler_error_says_how_to_fix(ext, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(extension.ExtensionBuildError, match=r"apt-get install g\+\+.*MEGATRON_TFREE_OPS_BACKEND=reference"):
        extension._jit_build(tmp_path, verbose=False)


def test_tensors_without_a_kernel_for_their_device_take_the_reference(ext):
    meta = torch.empty(10, 4, device="meta", requires_grad=True)
    out = ops.embedding_bag(meta, torch.tensor([0, 2, 3], device="meta"), torch.zeros(3, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)  # the reference ran (shape inference on meta)
    assert extension._module_for(torch.ones(1)) is ext
    assert extension._module_for(torch.ones(1), torch.ones(1, device="meta")) is None  # mixed devices
    assert extension.decode_kernel("cpu") is extension.decode_scores
    assert extension.decode_kernel("meta") is None and ops.native_decode_scores("meta") is None
    if not torch.cuda.is_available():
        assert cuda.module() is None and extension.decode_kernel("cuda") is None


def test_cuda_embedding_backward_mode(monkeypatch):
    monkeypatch.delenv(cuda.BACKWARD_ENV, raising=False)
    assert cuda.deterministic_backward()
    monkeypatch.setenv(cuda.BACKWARD_ENV, "atomic")
    assert not cuda.deterministic_backward()
    torch.use_deterministic_algorithms(True)
    try:
        assert cuda.deterministic_backward()  # torch's switch wins
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv(cuda.BACKWARD_ENV, "fast")
    with pytest.raises(ValueError, match="MEGATRON_TFREE_EMBEDDING_BACKWARD must be 'deterministic' or 'atomic'"):
        cuda.deterministic_backward()


def test_cuda_jit_build_without_a_toolkit_says_how_to_fix():
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None:
        pytest.skip("a CUDA toolkit is installed")
    with pytest.raises(cuda.CudaBuildError, match=r"no CUDA toolkit.*unset MEGATRON_TFREE_CUDA_JIT"):
        cuda.load(jit=True)
    assert len(cuda.sources_hash()) == 16 and {p.suffix for p in cuda.sources()} == {".cu", ".cpp"}


def test_stale_prebuilt_cuda_module_is_not_used(monkeypatch, caplog):
    import sys
    import types

    for name, value in (("_module", None), ("_origin", ""), ("_looked", False)):
        monkeypatch.setattr(cuda, name, value)
    fake = types.ModuleType(cuda.PREBUILT)
    fake.__file__ = "/somewhere/_tfree_ops_cuda.so"
    monkeypatch.setitem(sys.modules, cuda.PREBUILT, fake)
    fake.source_hash = "0" * 16  # built from other sources
    with caplog.at_level(logging.INFO, logger="megatron_tfree"):
        assert cuda.load(jit=False) is None
    assert "is stale" in caplog.text and "MEGATRON_TFREE_CUDA_JIT=1" in caplog.text
    fake.source_hash = cuda.sources_hash()
    assert cuda.load(jit=False) is fake and cuda.describe() == "prebuilt /somewhere/_tfree_ops_cuda.so"


def test_bce_over_the_whole_logit_range_and_non_finite_logits(ext):
    """The vectorised softplus/sigmoid (AVX2 path) hold over [-100, 100] and a width that leaves a tail;
    NaN / inf logits give a NaN / inf loss (what the trainer's non-finite skip relies on)."""
    gen = torch.Generator().manual_seed(9)
    n, v = 24, 8 * 37 + 5
    logits = torch.linspace(-100.0, 100.0, n * v)[torch.randperm(n * v, generator=gen)].view(n, v)
    logits[:4] = torch.randn(4, v, generator=gen) * 3  # typical values too
    t_off, t_ids = random_csr(n, 0, 6, v, gen)
    weights = torch.rand(n, generator=gen)
    x = logits.clone().requires_grad_(True)
    loss = ops.tfree_bce_loss(x, t_off, t_ids, weights, 30.0, 10.0)
    loss.backward()
    x64 = logits.double().requires_grad_(True)  # the loss formula in float64 (the reference computes in fp32)
    y = reference.multi_hot(t_off, t_ids, v, torch.float64)
    F = torch.nn.functional
    ref = (weights.double()[:, None] * (30.0 * y * F.softplus(-x64) + (1 - y) * F.softplus(x64))).mean() * 10.0
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    assert_grad_close(x.grad.double(), x64.grad)
    for bad, expect in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        poisoned = logits.clone()
        poisoned[5, 3] = bad
        assert expect(float(ops.tfree_bce_loss(poisoned, t_off, t_ids, weights, 30.0, 10.0)))
