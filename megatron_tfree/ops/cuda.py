"""Where the CUDA kernels come from: the compiled ``csrc/*_kernels.cu`` + ``csrc/tfree_ops_cuda.cpp`` module.

The ``cpp`` ops backend (:mod:`megatron_tfree.ops.extension`) sends CUDA tensors to this module's
functions (same names, arguments and results as the CPU module, see ``csrc/README.md``) and CPU
tensors to the CPU module. The module is looked up once, at the first op on a CUDA tensor:

1. the prebuilt ``megatron_tfree._tfree_ops_cuda`` that ``setup.py`` builds on a machine where torch
   has CUDA (``pip install --no-build-isolation --no-deps -e .``), if it was built from the current
   sources (its ``source_hash`` is :func:`sources_hash`);
2. with ``MEGATRON_TFREE_CUDA_JIT=1`` (which also skips (1), to test edited sources), a JIT build
   (``torch.utils.cpp_extension.load``) into ``$TORCH_EXTENSIONS_DIR/megatron_tfree_cuda_ops_<hash>``
   (1-2 minutes once, then cached).

Without either, CUDA tensors run the PyTorch reference ops and one log line says so and how to build
the kernels. A failed JIT build raises :class:`CudaBuildError` naming the fix. float64 tensors (e.g.
gradcheck) always take the reference: the kernels are float32 / float16 / bfloat16.

``MEGATRON_TFREE_EMBEDDING_BACKWARD`` picks the CUDA embedding-bag weight gradient: ``deterministic``
(default: sorted segment sums, bitwise repeatable) or ``atomic`` (atomicAdd, faster, order-dependent
rounding); ``torch.use_deterministic_algorithms(True)`` always gets the deterministic one.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger("megatron_tfree")

CSRC = Path(__file__).resolve().parents[2] / "csrc"
PREBUILT = "megatron_tfree._tfree_ops_cuda"
JIT_ENV = "MEGATRON_TFREE_CUDA_JIT"
BACKWARD_ENV = "MEGATRON_TFREE_EMBEDDING_BACKWARD"

_module: Optional[ModuleType] = None
_origin = ""
_looked = False


class CudaBuildError(RuntimeError):
    """The CUDA extension could not be built or loaded; the message says how to fix or avoid it."""


def sources() -> list[Path]:
    """The CUDA extension's sources: the pure kernels and the ATen glue."""
    return sorted(CSRC.glob("*_kernels.cu")) + sorted(CSRC.glob("*_cuda.cpp"))


def sources_hash() -> str:
    """First 16 hex digits of the sha256 over the CUDA sources and the headers they include."""
    h = hashlib.sha256()
    for path in sources() + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _jit_build(build_root: Optional[str | os.PathLike]) -> ModuleType:
    from torch.utils.cpp_extension import CUDA_HOME, load

    srcs = sources()
    if not srcs:
        raise CudaBuildError(f"megatron_tfree CUDA ops: no sources under {CSRC} (installed without the source "
                             "tree?); reinstall from a checkout, or unset MEGATRON_TFREE_CUDA_JIT")
    if CUDA_HOME is None:
        raise CudaBuildError("megatron_tfree CUDA ops: no CUDA toolkit found (CUDA_HOME unset, no nvcc) to build "
                             f"{CSRC}/*_kernels.cu; install the toolkit matching torch {torch.version.cuda}, or unset "
                             "MEGATRON_TFREE_CUDA_JIT to use the reference ops on the GPU")
    if build_root is None:
        from torch.utils.cpp_extension import get_default_build_root

        build_root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    name = f"megatron_tfree_cuda_ops_{sources_hash()}"
    build_dir = Path(build_root) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("megatron_tfree ops: JIT-building the CUDA kernels into %s (1-2 min once, cached afterwards)",
                build_dir)
    try:
        return load(name=name, sources=[str(s) for s in srcs],
                    extra_cflags=["-O3", f"-DTFREE_CUDA_SOURCE_ID=h{sources_hash()}"], extra_cuda_cflags=["-O3"],
                    build_directory=str(build_dir), verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        raise CudaBuildError(f"megatron_tfree CUDA ops: building {CSRC}/*_kernels.cu failed: {e}\nFix: a CUDA "
                             f"toolkit matching torch's CUDA {torch.version.cuda} and ninja (`pip install ninja`); "
                             f"delete {build_dir} and retry, or unset MEGATRON_TFREE_CUDA_JIT") from e


def load(jit: Optional[bool] = None, build_root: Optional[str | os.PathLike] = None) -> Optional[ModuleType]:
    """The CUDA module (prebuilt, else a JIT build when ``jit`` / ``$MEGATRON_TFREE_CUDA_JIT=1``), or None.

    ``jit=True`` forces the JIT build even where a prebuilt module exists (what the cuda tests use to
    test the current sources). Raises :class:`CudaBuildError` when a JIT build was asked for and fails.
    """
    global _module, _origin, _looked
    if jit is None:
        if _looked:
            return _module
        jit = os.environ.get(JIT_ENV) == "1"
    mod, origin = None, ""
    if not jit:
        try:
            mod, origin = importlib.import_module(PREBUILT), "prebuilt"
        except ImportError:
            pass
        if mod is not None and sources() and getattr(mod, "source_hash", None) != sources_hash():
            logger.info("megatron_tfree ops: prebuilt %s is stale (csrc/ CUDA sources changed); not used (re-run "
                        "`pip install --no-build-isolation --no-deps -e .`, or set MEGATRON_TFREE_CUDA_JIT=1)",
                        mod.__file__)
            mod = None
    if mod is None and jit:
        mod, origin = _jit_build(build_root), "JIT build"
    if mod is not None:
        _module, _origin = mod, f"{origin} {getattr(mod, '__file__', '')}"
        logger.info("megatron_tfree ops: CUDA kernels loaded (%s)", _origin)
    elif not _looked:
        logger.info("megatron_tfree ops: no CUDA kernels built, CUDA tensors use the reference ops (build them "
                    "with `pip install --no-build-isolation --no-deps -e .` on a CUDA machine, or set "
                    "MEGATRON_TFREE_CUDA_JIT=1)")
    _looked = True
    return mod


def module() -> Optional[ModuleType]:
    """The loaded CUDA module, looking it up once (no JIT build unless ``$MEGATRON_TFREE_CUDA_JIT=1``)."""
    if not torch.cuda.is_available():
        return None
    return load()


def describe() -> str:
    """Where the CUDA module came from, for the backend log line ('' when none is loaded)."""
    return _origin


def deterministic_backward() -> bool:
    """Whether the CUDA embedding-bag weight gradient uses the deterministic sorted-segment kernel."""
    mode = os.environ.get(BACKWARD_ENV, "deterministic")
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"{BACKWARD_ENV} must be 'deterministic' or 'atomic', got {mode!r}")
    return mode == "deterministic" or torch.are_deterministic_algorithms_enabled()
