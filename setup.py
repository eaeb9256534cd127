"""megatron_tfree: a Megatron/DeepSpeed-style trainer for tokenizer-free (T-Free) LLMs.

`pip install --no-build-isolation -e .` installs the library, its console scripts and (when torch is
importable) the native ops of ``csrc/`` (see csrc/README.md; ``MEGATRON_TFREE_BUILD_EXT=0`` skips them, a
failed build only warns). Install torch==2.13.0 (or the CUDA build you need) first: this file never asks
pip for an unpinned torch.
"""

import glob
import hashlib
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
SKIP_HINT = ("set MEGATRON_TFREE_BUILD_EXT=0 to skip the native ops (the pure-PyTorch reference ops are used; "
             "a JIT build happens on demand with MEGATRON_TFREE_OPS_BACKEND=cpp)")


def _cuda_sources_hash() -> str:
    """``megatron_tfree.ops.cuda.sources_hash()``, read from that file without importing the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tfree_cuda_paths", ROOT / "megatron_tfree" / "ops" / "cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.sources_hash()


def _native_extensions():
    """The C++ ops (``csrc/tfree_ops.cpp`` -> ``megatron_tfree._tfree_ops_cpp``) when torch is importable, plus the
    CUDA ops (``csrc/*_kernels.cu`` + ``csrc/*_cuda.cpp`` -> ``megatron_tfree._tfree_ops_cuda``) when CUDA can be
    built. Returns ``(ext_modules, cmdclass)``; empty with ``MEGATRON_TFREE_BUILD_EXT=0`` or without torch."""
    if os.environ.get("MEGATRON_TFREE_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("megatron_tfree: torch is not importable, so the native ops are not built (install torch first and "
              "use `pip install --no-build-isolation -e .`)", file=sys.stderr)
        return [], {}
    source = ROOT / "csrc" / "tfree_ops.cpp"
    source_id = "h" + hashlib.sha256(source.read_bytes()).hexdigest()[:16]  # checked by ops/extension.py
    exts = [CppExtension("megatron_tfree._tfree_ops_cpp", ["csrc/tfree_ops.cpp"],
                         extra_compile_args=["-O3", "-fopenmp", f"-DTFREE_OPS_SOURCE_ID={source_id}"],
                         extra_link_args=["-fopenmp"])]
    cuda_sources = sorted(glob.glob("csrc/*_kernels.cu") + glob.glob("csrc/*_cuda.cpp"))
    if cuda_sources and CUDA_HOME is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"):
        cuda_id = "h" + _cuda_sources_hash()  # checked by ops/cuda.py
        exts.append(CUDAExtension("megatron_tfree._tfree_ops_cuda", cuda_sources,
                                  extra_compile_args={"cxx": ["-O3", f"-DTFREE_CUDA_SOURCE_ID={cuda_id}"],
                                                      "nvcc": ["-O3"]}))

    class OptionalBuildExtension(BuildExtension):
        """Builds each native extension; a failure warns (with the fix) instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler/linker failure
                self.failed = e
                print(f"\nmegatron_tfree: building the native ops failed: {e}\n  Fix: install a C++ compiler with "
                      f"OpenMP (`apt-get install g++`) and ninja (`pip install ninja`), or {SKIP_HINT}.\n",
                      file=sys.stderr)

        def get_outputs(self):  # nothing to install when the build failed
            return [] if getattr(self, "failed", None) else super().get_outputs()

        def get_output_mapping(self):
            return {} if getattr(self, "failed", None) else super().get_output_mapping()

    return exts, {"build_ext": OptionalBuildExtension}


EXT_MODULES, CMDCLASS = _native_extensions()

setup(
    name="megatron_tfree",
    version="0.1.0",
    description="Distributed trainer for tokenizer-free (T-Free) and classic-tokenizer LLMs",
    packages=find_packages(include=["megatron_tfree", "megatron_tfree.*"]),
    package_data={"megatron_tfree.hf": ["remote_code/*.py"], "megatron_tfree.toklab": ["probe/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is deliberately not listed: install the build for your machine first.
        "numpy",
        "pyyaml",
        "tqdm",
        "tokenizers",
        "safetensors",
    ],
    extras_require={
        "train": ["deepspeed==0.19.8", "tensorboard", "matplotlib"],
        "data": ["pyarrow"],
        "hf": ["transformers"],
        "eval": ["lm-eval[hf]==0.4.13", "transformers"],
        "lab": ["regex", "matplotlib"],
        "test": ["pytest", "hypothesis", "pyarrow", "tensorboard", "matplotlib", "regex", "transformers", "lm-eval[hf]==0.4.13"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "megatron-tfree-train=megatron_tfree.train:main",
            "megatron-tfree-generate=megatron_tfree.generate:main",
            "megatron-tfree-prepare=megatron_tfree.prepare:main",
            "megatron-tfree-prepare-data=megatron_tfree.data.convert:main",
            "megatron-tfree-convert2hf=megatron_tfree.convert2hf:main",
            "megatron-tfree-import=megatron_tfree.import_checkpoint:main",
            "megatron-tfree-eval=megatron_tfree.eval:main",
            "megatron-tfree-toklab=megatron_tfree.toklab.__main__:main",
            "megatron-tfree-inherit=megatron_tfree.inherit.__main__:main",
            "megatron-tfree-multiround=megatron_tfree.multiround.__main__:main",
            "megatron-tfree-compare=megatron_tfree.compare.__main__:main",
        ],
    },
)
