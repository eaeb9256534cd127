"""megatron_tfree: a Megatron/DeepSpeed-style trainer for tokenizer-free (T-Free) LLMs.

`pip install -e .` installs the library and its console scripts. Install torch==2.13.0 (or the
CUDA build you need) first: this file never asks pip for an unpinned torch.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_tfree",
    version="0.1.0",
    description="Distributed trainer for tokenizer-free (T-Free) and classic-tokenizer LLMs",
    packages=find_packages(include=["megatron_tfree", "megatron_tfree.*"]),
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
        "test": ["pytest", "hypothesis", "pyarrow", "tensorboard", "matplotlib", "transformers"],
    },
    entry_points={
        "console_scripts": [
            "megatron-tfree-train=megatron_tfree.train:main",
            "megatron-tfree-generate=megatron_tfree.generate:main",
            "megatron-tfree-prepare=megatron_tfree.prepare:main",
            "megatron-tfree-prepare-data=megatron_tfree.data.convert:main",
        ],
    },
)
