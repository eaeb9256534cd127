"""The CUDA kernels (``csrc/*_kernels.cu``) compile on their own with plain ``nvcc`` (no GPU, no torch).

Each file is compiled once for sm_90 (H100/H200) and sm_80 (A100) with the flags torch's CUDAExtension
adds (``__CUDA_NO_HALF_CONVERSIONS__`` & co.: the kernels must use explicit conversion intrinsics), and
must produce no warning. The launcher header ``csrc/tfree_kernels.h`` must also be valid C. These run on
CPU machines (CI); they skip cleanly when ``nvcc`` is missing. Whether the kernels are *right* is
``tests/ops/test_cuda_ops.py`` (GPU only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNELS = sorted(CSRC.glob("*_kernels.cu"))
# what torch.utils.cpp_extension passes to nvcc for a CUDAExtension
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
ARCHES = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc",
                      os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, $NVCC, /usr/local/cuda/bin or "
                                                       "$CUDA_HOME/bin): the CUDA kernels cannot be compile-checked")


def cuda_include() -> Path:
    """``include/`` of the toolkit that owns NVCC (resolving wrapper scripts such as /usr/local/bin/nvcc)."""
    for base in (Path(NVCC).resolve().parents[1], Path("/usr/local/cuda"), Path(os.environ.get("CUDA_HOME", "/x"))):
        if (base / "include" / "cuda_runtime.h").is_file():
            return base / "include"
    pytest.skip("cuda_runtime.h not found next to nvcc")


def test_kernel_sources_exist():
    names = {p.name for p in KERNELS}
    assert {"embedding_bag_kernels.cu", "tfree_head_kernels.cu", "decode_kernels.cu"} <= names, names
    assert (CSRC / "tfree_kernels.h").is_file()


@needs_nvcc
@pytest.mark.parametrize("source", KERNELS, ids=[p.stem for p in KERNELS])
def test_kernel_compiles_alone(source, tmp_path):
    obj = tmp_path / f"{source.stem}.o"
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *ARCHES, *TORCH_NVCC_FLAGS, str(source), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    assert obj.stat().st_size > 0


@needs_nvcc
def test_launcher_header_is_c(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "use_header.c"
    src.write_text('#include "tfree_kernels.h"\nint tfree_check(void) { return (int)TFREE_BF16 + TFREE_BCE_MAX_CHUNK; }\n')
    cmd = [cc, "-x", "c", "-std=c11", "-fsyntax-only", "-Wall", "-Werror", f"-I{CSRC}", f"-I{cuda_include()}", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
