"""The ``cpp`` ops backend: the native kernels of ``csrc/`` behind autograd Functions.

The same functions (and signatures) as :mod:`megatron_tfree.ops.reference`, plus the fused
:func:`tfree_head_loss` and :func:`decode_scores`. Each call picks the compiled module by the tensors'
device: CPU tensors the C++ module below, CUDA tensors the CUDA kernels when they are built
(:mod:`megatron_tfree.ops.cuda`; both modules have the same functions), anything else (other devices,
float64 on CUDA, mixed devices) the reference implementation.

Where the CPU module comes from (first match wins, see ``csrc/README.md``; the CUDA one: :mod:`.cuda`):

1. the prebuilt ``megatron_tfree._tfree_ops_cpp`` that ``setup.py`` builds (``pip install -e .``), if
   it was compiled from the current ``csrc/tfree_ops.cpp`` (its ``source_hash`` matches);
2. a JIT build (``torch.utils.cpp_extension.load``) cached in
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/<py>_cpu``) under
   ``megatron_tfree_ops_<hash>``: ~25 s the first time, then the cached ``.so`` is imported directly.

:func:`is_available` never compiles: ``auto`` picks this backend only when (1) or a cached (2)
exists. Selecting ``cpp`` explicitly (``MEGATRON_TFREE_OPS_BACKEND=cpp`` / ``ops.set_backend("cpp")``)
or ``python -m megatron_tfree.ops.extension`` builds it. Build failures raise :class:`ExtensionBuildError`
with the fix (install g++, or use ``MEGATRON_TFREE_OPS_BACKEND=reference``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

from . import cuda, reference

__all__ = ["embedding_bag", "tfree_bce_loss", "cross_entropy_loss", "tfree_head_loss", "decode_scores",
           "decode_kernel", "load", "is_available", "describe", "ExtensionBuildError", "DEFAULT_CHUNK_SIZE"]

logger = logging.getLogger("megatron_tfree")

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "tfree_ops.cpp"
PREBUILT = "megatron_tfree._tfree_ops_cpp"
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
DEFAULT_CHUNK_SIZE = reference.DEFAULT_CHUNK_SIZE

_module: Optional[ModuleType] = None
_origin = ""


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be built or loaded; the message says how to fix or avoid it."""


def source_hash(path: Path = SOURCE) -> Optional[str]:
    """First 16 hex digits of the sha256 of ``csrc/tfree_ops.cpp`` (None without a source tree)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def build_directory(root: Optional[str | os.PathLike] = None) -> Path:
    """Where the JIT build of the current source lives: ``root`` or ``$TORCH_EXTENSIONS_DIR`` or torch's default."""
    if root is None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:  # torch's default root (as torch.utils.cpp_extension, without creating it)
        from torch.utils.cpp_extension import get_default_build_root

        accel = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
        root = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accel}"
    return Path(root) / f"megatron_tfree_ops_{source_hash() or 'nosource'}"


def _module_name() -> str:
    return f"megatron_tfree_ops_{source_hash() or 'nosource'}"


def _import_prebuilt() -> Optional[ModuleType]:
    """The setup.py build, if importable and compiled from the current source."""
    try:
        mod = importlib.import_module(PREBUILT)
    except ImportError:
        return None
    current = source_hash()
    if current is not None and getattr(mod, "source_hash", None) != current:
        logger.info("megatron_tfree ops: prebuilt %s is stale (csrc/tfree_ops.cpp changed); using a JIT build "
                    "(re-run `pip install --no-build-isolation --no-deps -e .` to refresh it)", mod.__file__)
        return None
    return mod


def _import_cached(build_dir: Path) -> Optional[ModuleType]:
    """Import a finished JIT build from ``build_dir`` without invoking ninja (milliseconds)."""
    so = build_dir / f"{_module_name()}.so"
    if not so.is_file():
        return None
    spec = importlib.util.spec_from_file_location(_module_name(), so)
    if spec is None or spec.loader is None:
        return None
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except ImportError as e:  # e.g. built against another torch: rebuild
        logger.info("megatron_tfree ops: cached build %s does not load (%s); rebuilding", so, e)
        return None
    return mod


def _jit_build(build_dir: Path, verbose: bool) -> ModuleType:
    if source_hash() is None:
        raise ExtensionBuildError(
            f"megatron_tfree ops: {SOURCE} is missing (installed without the source tree?) and no prebuilt "
            f"{PREBUILT} exists. Reinstall from a checkout with `pip install --no-build-isolation --no-deps -e .`, "
            "or set MEGATRON_TFREE_OPS_BACKEND=reference.")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ExtensionBuildError(
            f"megatron_tfree ops: no C++ compiler ({compiler!r} not found) to build {SOURCE}. Install one "
            "(Debian/Ubuntu: `apt-get install g++`), or set MEGATRON_TFREE_OPS_BACKEND=reference to use the "
            "pure-PyTorch ops.")
    from torch.utils.cpp_extension import load as cpp_load

    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("megatron_tfree ops: JIT-building %s into %s (first time ~25 s, cached afterwards)", SOURCE, build_dir)
    t0 = time.time()
    try:
        mod = cpp_load(name=_module_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS + [f"-DTFREE_OPS_SOURCE_ID=h{source_hash()}"], extra_ldflags=LDFLAGS, build_directory=str(build_dir),
            verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        raise ExtensionBuildError(
            f"megatron_tfree ops: building {SOURCE} failed: {e}\nFix: install a C++ compiler with OpenMP "
            "(`apt-get install g++`) and ninja (`pip install ninja`), delete the build directory "
            f"{build_dir} and retry; or set MEGATRON_TFREE_OPS_BACKEND=reference.") from e
    logger.info("megatron_tfree ops: built the C++ extension in %.1f s", time.time() - t0)
    return mod


def load(build: bool = True, build_root: Optional[str | os.PathLike] = None, verbose: bool = False) -> Optional[ModuleType]:
    """The compiled module: prebuilt, else cached JIT build, else (``build=True``) a fresh JIT build.

    Returns None when nothing is built and ``build`` is False. Raises :class:`ExtensionBuildError`.
    """
    global _module, _origin
    if _module is not None:
        return _module
    mod = _import_prebuilt()
    origin = f"prebuilt {getattr(mod, '__file__', '')}"
    if mod is None:
        build_dir = build_directory(build_root)
        mod, origin = _import_cached(build_dir), f"cached JIT build {build_dir}"
        if mod is None:
            if not build:
                return None
            mod, origin = _jit_build(build_dir, verbose), f"JIT build {build_dir}"
    _module, _origin = mod, origin
    logger.info("megatron_tfree ops: C++ extension loaded (%s)", origin)
    return mod


def is_available() -> bool:
    """True when the extension is already built (prebuilt or cached); never compiles."""
    try:
        return load(build=False) is not None
    except Exception:  # noqa: BLE001 - availability probe: any failure means "not available"
        return False


def prepare() -> None:
    """Build/load the extension now (called when the ``cpp`` backend is selected explicitly)."""
    load(build=True)


def describe() -> str:
    """Where the active modules came from (for the backend log line)."""
    where = _origin or "not loaded"
    return f"{where}; CUDA: {cuda.describe()}" if cuda.describe() else where


def _ext() -> ModuleType:
    mod = load(build=True)
    assert mod is not None
    return mod


def _module_for(*tensors: torch.Tensor) -> Optional[ModuleType]:
    """The compiled module for these tensors' device (CPU module, CUDA kernels), or None: reference."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return None
    device = devices.pop()
    if device.type == "cpu":
        return _ext()
    if device.type == "cuda" and not any(t.dtype == torch.float64 for t in tensors):
        return cuda.module()
    return None


def _is_cuda_module(mod: ModuleType) -> bool:
    return getattr(mod, "device_type", "cpu") == "cuda"


# ----------------------------------------------------------------------------------- embedding bag
class _EmbeddingBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, offsets, ids, vocab_start, mod):
        ctx.save_for_backward(offsets, ids)
        ctx.vocab_start, ctx.num_weights, ctx.mod = vocab_start, weight.shape[0], mod
        return mod.embedding_bag_forward(weight.detach(), offsets, ids, vocab_start)

    @staticmethod
    def backward(ctx, grad):
        offsets, ids = ctx.saved_tensors
        args = (grad, offsets, ids, ctx.vocab_start, ctx.num_weights)
        if _is_cuda_module(ctx.mod):  # the CPU kernel is always deterministic
            args += (cuda.deterministic_backward(),)
        return ctx.mod.embedding_bag_backward(*args), None, None, None, None


def embedding_bag(weight: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """See :func:`reference.embedding_bag` (native forward; deterministic weight gradient on the CPU, and
    on CUDA unless ``MEGATRON_TFREE_EMBEDDING_BACKWARD=atomic``)."""
    mod = _module_for(weight, offsets, ids)
    if mod is None:
        return reference.embedding_bag(weight, offsets, ids, vocab_start)
    return _EmbeddingBag.apply(weight, offsets.long().contiguous(), ids.long().contiguous(), int(vocab_start), mod)


# ------------------------------------------------------------------------------------------ losses
class _SavedGradLoss(torch.autograd.Function):
    """A scalar loss whose gradients were computed with it (fused kernels): backward scales them."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.grads]
        return (None, None, *grads)


def _fused(loss: torch.Tensor, grads: list, inputs: tuple) -> torch.Tensor:
    """The kernel's loss (float32, or float64 for float64 inputs) wired to its precomputed gradients."""
    grads = [g if x.requires_grad else None for g, x in zip(grads, inputs)]
    return _SavedGradLoss.apply(loss, grads, *inputs)


def _bce_loss_exact(logits, target_offsets, target_ids, weights, pos_weight, loss_scale, mod=None):
    """:func:`tfree_bce_loss` in the compute dtype (float64 for float64 logits: for gradcheck)."""
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = (mod or _ext()).bce_loss(logits.detach(), target_offsets.long().contiguous(),
                                   target_ids.long().contiguous(), weights.detach(), float(pos_weight),
                                   float(loss_scale), 0, logits.shape[1], True, grad)
    return _fused(out[0], out[1:], (logits,)) if grad else out[0]


def _head_loss_exact(hidden, weight, target_offsets, target_ids, weights, pos_weight, loss_scale, vocab_start=0,
                     vocab_size=None, chunk_size=DEFAULT_CHUNK_SIZE, mod=None):
    """:func:`tfree_head_loss` in the compute dtype (float64 for float64 inputs: for gradcheck)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    v = weight.shape[0] if vocab_size is None else int(vocab_size)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = (mod or _ext()).head_loss(hidden.detach(), weight.detach(), target_offsets.long().contiguous(),
                                    target_ids.long().contiguous(), weights.detach(), float(pos_weight),
                                    float(loss_scale), int(vocab_start), v, int(chunk_size), grad)
    return _fused(out[0], out[1:], (hidden, weight)) if grad else out[0]


def tfree_bce_loss(logits: torch.Tensor, target_offsets: torch.Tensor, target_ids: torch.Tensor,
                   weights: torch.Tensor, pos_weight: float, loss_scale: float) -> torch.Tensor:
    """See :func:`reference.tfree_bce_loss`; no multi-hot matrix, the gradient comes with the loss."""
    mod = _module_for(logits, target_offsets, target_ids, weights)
    if mod is None:
        return reference.tfree_bce_loss(logits, target_offsets, target_ids, weights, pos_weight, loss_scale)
    return _bce_loss_exact(logits, target_offsets, target_ids, weights, pos_weight, loss_scale, mod).float()


def tfree_head_loss(hidden: torch.Tensor, weight: torch.Tensor, target_offsets: torch.Tensor,
                    target_ids: torch.Tensor, weights: torch.Tensor, pos_weight: float, loss_scale: float,
                    vocab_start: int = 0, vocab_size: Optional[int] = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """See :func:`reference.tfree_head_loss`: the fused kernel, ``chunk_size`` vocabulary rows at a time.

    The gradients of ``hidden`` and ``weight`` are computed in the forward (saved until backward), so the
    peak extra memory is one ``[N, chunk_size]`` fp32 chunk plus the two gradients. The loss is float32
    (computed in float64 for float64 inputs).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mod = _module_for(hidden, weight, target_offsets, target_ids, weights)
    if mod is not None and _is_cuda_module(mod) and hidden.dtype != weight.dtype:
        mod = None  # the CUDA matmuls need one dtype
    if mod is None:
        return reference.tfree_head_loss(hidden, weight, target_offsets, target_ids, weights, pos_weight, loss_scale,
                                         vocab_start, vocab_size, chunk_size)
    return _head_loss_exact(hidden, weight, target_offsets, target_ids, weights, pos_weight, loss_scale, vocab_start,
                            vocab_size, chunk_size, mod).float()


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference implementation (dense softmax is already a fused ATen kernel)."""
    return reference.cross_entropy_loss(logits, targets, weights)


# ------------------------------------------------------------------------------------------ decoding
def decode_scores(logits: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, edge: torch.Tensor,
                  c: torch.Tensor, vocab_population: int, edge_weight: float = 1.0) -> torch.Tensor:
    """``[B, v]`` logits -> ``[B, n_words]`` float32 spec-4 scores of CSR word patterns.

    ``offsets [n + 1]`` int64, ``ids [nnz]`` int32 distinct ids per word, ``edge [nnz]`` bool/uint8
    (edge trigram id), ``c [n]`` int32 distinct trigrams per word; same formula as
    :meth:`megatron_tfree.tokenizer.dictionary.DecodeDictionary.score`. CPU logits, or CUDA logits with
    the CUDA kernels built (:func:`decode_kernel`); the pattern arrays are moved to the logits' device.
    """
    if logits.device.type == "cuda" and logits.dtype == torch.float64:
        logits = logits.float()  # the CUDA kernels take float32 / float16 / bfloat16; scores are float32
    mod = _module_for(logits)
    if mod is None:
        raise ValueError(f"decode_scores: no kernel for {logits.device} {logits.dtype} logits (see decode_kernel)")
    dev = logits.device
    return mod.decode_scores(logits.detach(), offsets.to(dev, torch.long).contiguous(),
                             ids.to(dev, torch.int32).contiguous(), edge.to(dev, torch.uint8).contiguous(),
                             c.to(dev, torch.int32).contiguous(), int(vocab_population), float(edge_weight))


def decode_kernel(device: torch.device | str = "cpu") -> Optional[Callable[..., torch.Tensor]]:
    """:func:`decode_scores` where a compiled kernel serves logits on ``device``, else None."""
    kind = torch.device(device).type
    return decode_scores if kind == "cpu" or (kind == "cuda" and cuda.module() is not None) else None


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m megatron_tfree.ops.extension``: build (or find) the extension and print where it is."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        load(build=True, verbose="-v" in (argv if argv is not None else sys.argv[1:]))
    except ExtensionBuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"megatron_tfree C++ ops: {describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
